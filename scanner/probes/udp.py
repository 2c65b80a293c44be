"""UDP probe: one connected datagram socket per attempt, ICMP errors read from the error queue.

Each attempt opens a non-blocking UDP socket, turns on IP_RECVERR (IPV6_RECVERR), connects it
to the flow and sends one payload (``scanner.probes.payloads``: VXLAN, WireGuard, memberlist or a
short tag, each carrying our tag). The kernel matches whatever comes back to the socket by its
4-tuple, so nothing is guessed: a datagram is a reply from that port, and an ICMP error quoting
our datagram is queued on the socket's error queue with its exact type and code
(``sock_extended_err``), readable without any privilege. Classification, as nmap does it:

    UDP reply                       open            udp-response (responder: our tag checked)
    ICMP port unreachable           closed          port-unreach
    other ICMP unreachable          filtered        admin-prohibited, host-unreach, ...
    silence until the timeout       open|filtered   no-response (silent: the engine retries)

ICMP error rate limits, and what they cost
------------------------------------------
Linux limits the ICMP errors a host sends (Documentation/networking/ip-sysctl.rst):
``net.ipv4.icmp_ratelimit`` (default 1000 ms) is a per-destination token bucket
(``inet_peer_xrlim_allow``: one token per 1000 ms, at most 6 banked) for the types in
``icmp_ratemask`` (destination unreachable, source quench, time exceeded, parameter problem),
and ``icmp_msgs_per_sec``/``icmp_msgs_burst`` (1000/s, burst 50) caps all ICMP a host sends.
Both apply to nftables ``reject`` too. Loopback is exempt from the per-destination bucket, which
is why a closed-port sweep of 127.0.0.1 looks instant and one of a real host does not.

So a far host tells us about at most ~6 closed ports at once and then ONE per second; every
other closed port looks exactly like a dropped one (silence). Measured in the lab (kernel 6.18,
defaults, 198.18.x host reached over veth, 200 closed ports): sending all 200 at once gave 6
``closed`` and 194 silent; paced at 1 probe/s per host after a burst of 6, all 200 ``closed``
in ~195 s. nmap -sU meets the same wall (it detects the drops and slows to ~1 probe/s):
``benchmarks/udp_icmp.py`` (200 closed + 20 echo ports on one lab host, kernel defaults):
portmesh 194.1 s, nmap -sU 207.5 s, both 220/220 right.
The engine therefore paces UDP per destination host at ``UDP_PER_HOST_PPS`` after
``UDP_PER_HOST_BURST`` (different hosts run in parallel, so a cluster sweep costs ~1 s per UDP
port per host pair, not per flow overall). A silent attempt is retried by the engine as usual;
pacing, not retries, is what keeps closed ports from being called open|filtered. Pacing only
the retries of silent flows (first attempts at full speed) costs the same for closed ports and
nothing for answering ones; that is what the benchmark's driver does.
"""

from __future__ import annotations

import asyncio
import socket

from scanner.core import tags
from scanner.core.flows import Flow
from scanner.probes import payloads
from scanner.probes.base import (
    NO_RESPONSE_OPEN_FILTERED,
    SELF_CONNECT,
    SELF_CONNECT_TRIES,
    Outcome,
    ProbeOptions,
    clock_ns,
    enable_rx_stamps,
    local_address,
    receipt_ns,
    rtt_ms,
    self_connected,
)
from scanner.probes.classify import (
    IP_RECVERR,
    IPV6_RECVERR,
    SOL_IPV6,
    attribute,
    classify_icmp,
    errno_outcome,
    parse_extended_err,
)

# Per-destination pacing the engine honours for UDP (see the module docstring): the far
# kernel's icmp_ratelimit default (1000 ms) allows one ICMP error per second after a burst of 6.
UDP_PER_HOST_PPS = 1.0
UDP_PER_HOST_BURST = 6


class _Attempt:
    __slots__ = ("loop", "sock", "fut", "nonce", "t0", "dst")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        fut: asyncio.Future,
        nonce: bytes,
        t0: int,
        dst: str,
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.fut = fut
        self.nonce = nonce
        self.t0 = t0
        self.dst = dst


class UdpProber:
    proto = "udp"
    needs_raw = False
    # the engine paces attempts to a destination at this rate once that destination has left
    # a UDP attempt unanswered (its ICMP errors are being rate-limited; see the docstring)
    per_host_pps = UDP_PER_HOST_PPS

    def __init__(self, opts: ProbeOptions) -> None:
        self.opts = opts
        self.secret = opts.secret or b""
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stamps: socket.socket | None = None

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        # Kernel receive stamps (probes.base.receipt_ns) are switched on host-wide by the first
        # socket that asks, after a delay (a work queue), and off when the last one closes; one
        # socket held for the prober's life keeps them on between the attempts' sockets.
        try:
            self._stamps = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            enable_rx_stamps(self._stamps)
        except OSError:
            self._stamps = None
        # Build every template now (struct, well under a millisecond; scapy once took ~0.5 s),
        # not lazily in the middle of a sweep while other attempts' timers run.
        kinds = set(payloads.DEFAULT_PORT_KINDS.values()) | {"tag"}
        kinds |= set((self.opts.udp_payloads or {}).values())
        for kind in kinds:
            payloads.udp_template(kind, self.opts.vxlan_vni)

    def payload(self, flow: Flow, tag: bytes, src: str | None) -> bytes:
        """The datagram for one attempt (public for the benchmark and the tests)."""
        assert flow.port is not None
        kind = payloads.kind_for_port(flow.port, self.opts.udp_payloads)
        tpl = payloads.udp_template(kind, self.opts.vxlan_vni)
        if tpl.ip_off is None:
            return tpl.render(tag)
        inner_src = inner_dst = None
        if src and ":" not in src and ":" not in flow.dst:
            inner_src, inner_dst = socket.inet_aton(src), socket.inet_aton(flow.dst)
        seq = int.from_bytes(tag[8:12], "big")
        return tpl.render(
            tag, inner_src, inner_dst, ip_id=seq, icmp_id=seq >> 16, icmp_seq=seq & 0xFFFF
        )

    async def probe(self, flow: Flow, timeout: float) -> Outcome:
        loop = asyncio.get_running_loop()
        if flow.port is None:
            return Outcome("error", "no-port")
        held: list[socket.socket] = []
        try:
            for _ in range(SELF_CONNECT_TRIES):
                sock = self._connected(flow)
                if isinstance(sock, Outcome):
                    # no other source port (a one-port ephemeral range, held by our own):
                    # the kernel picked this port, so nothing is bound there
                    return SELF_CONNECT if held else sock
                if sock.getsockname()[1] != flow.port or not self_connected(sock):
                    break
                # its own port (a local destination where nothing is bound): our datagram
                # would come back to us, a false open. Kept bound while the kernel picks
                # another source port for the next socket
                held.append(sock)
            else:
                return SELF_CONNECT
        finally:
            for x in held:
                x.close()
        src = sock.getsockname()[0]
        nonce = payloads.new_nonce()
        data = self.payload(flow, tags.make_tag(self.secret, nonce), src)
        fut = loop.create_future()
        fd = sock.fileno()
        att = _Attempt(loop, sock, fut, nonce, 0, flow.dst)
        loop.add_reader(fd, self._readable, att)
        timer = None
        try:
            try:
                att.t0 = clock_ns()
                sock.send(data)
            except OSError as e:
                return errno_outcome(e)
            timer = loop.call_later(timeout, self._expire, att)
            return await fut
        finally:
            if timer is not None:
                timer.cancel()
            loop.remove_reader(fd)
            sock.close()

    def _connected(self, flow: Flow) -> socket.socket | Outcome:
        """A non-blocking datagram socket connected to the flow, reporting ICMP errors."""
        v6 = ":" in flow.dst
        try:
            sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
        except OSError as e:
            return errno_outcome(e)
        try:
            sock.setblocking(False)
            if v6:
                sock.setsockopt(SOL_IPV6, IPV6_RECVERR, 1)
            else:
                sock.setsockopt(socket.SOL_IP, IP_RECVERR, 1)
            enable_rx_stamps(sock)
            if self.opts.source:
                sock.bind((self.opts.source, 0))
            sock.connect((flow.dst, flow.port))
        except OSError as e:
            sock.close()
            return errno_outcome(e)
        return sock

    def _expire(self, att: _Attempt) -> None:
        # the socket first: under load the timer can run before an answer already queued is
        # read (uvloop runs timers before I/O), and that answer is the truth
        self._readable(att)
        if not att.fut.done():
            att.fut.set_result(NO_RESPONSE_OPEN_FILTERED)

    def _readable(self, att: _Attempt) -> None:
        if att.fut.done():
            return
        sock = att.sock
        try:
            _, anc, _, _ = sock.recvmsg(0, 512, socket.MSG_ERRQUEUE)
        except (BlockingIOError, InterruptedError):
            anc = None
        except OSError:
            anc = None
        if anc:
            rtt = rtt_ms(att.t0, receipt_ns(anc))
            for level, ctype, cdata in anc:
                if (level, ctype) in ((socket.SOL_IP, IP_RECVERR), (SOL_IPV6, IPV6_RECVERR)):
                    ee_errno, origin, typ, code, offender = parse_extended_err(cdata)
                    out = classify_icmp(origin, typ, code, ee_errno, rtt)
                    local = bool(offender) and local_address(offender)  # type: ignore[arg-type]
                    att.fut.set_result(attribute(out, offender, att.dst, local))
                    return
        try:
            reply, anc, _, _ = sock.recvmsg(65535, 64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            att.fut.set_result(errno_outcome(e, rtt_ms(att.t0, clock_ns())))
            return
        rtt = rtt_ms(att.t0, receipt_ns(anc))
        reason = "udp-response"
        if self.secret and tags.check_reply(reply, self.secret) == att.nonce:
            reason = "responder"
        att.fut.set_result(Outcome("open", reason, rtt))

    def close(self) -> None:
        self.loop = None
        if self._stamps is not None:
            self._stamps.close()
            self._stamps = None


def make_prober(opts: ProbeOptions) -> UdpProber:
    return UdpProber(opts)


__all__ = [
    "UDP_PER_HOST_BURST",
    "UDP_PER_HOST_PPS",
    "UdpProber",
    "make_prober",
]
