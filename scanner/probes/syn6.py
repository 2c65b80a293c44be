"""Raw SYN over IPv6 (``--method syn``, and ``auto`` with CAP_NET_RAW): the IPv6 twin of syn.py.

One ``AF_INET6``/``SOCK_RAW``/``IPPROTO_TCP`` socket. The kernel builds the IPv6 header (source
address from the routing table, or ``--source``) and, with ``IPV6_CHECKSUM`` set to 16 (the
TCP checksum's offset; RFC 3542 section 3.1), computes the TCP checksum over the IPv6
pseudo-header on every send and verifies it on every receipt: the 24-byte SYN template (TCP
header + MSS option, MSS 1440 for IPv6) leaves its checksum 0 and needs no source address.

Matching is syn.py's, stateless and keyed: the sequence number is ``syn.cookie`` of
(destination, destination port, source port), a SYN-ACK or RST is ours only if it acknowledges
cookie + 1. A raw IPv6 socket gets packets without their IPv6 header (the TCP header first, the
sender in the address), so syn.py's BPF program reads the TCP header at offset 0 here. ICMPv6 errors quoting our SYNs come through the same socket's error queue
(``IPV6_RECVERR``): the quoted TCP header (ports, sequence: the cookie), the original
destination, the ICMPv6 type/code and its sender. ``classify`` turns them into outcomes exactly
as for IPv4 and for connect(): any unreachable is ``filtered`` with the code's reason
(``admin-prohibited`` for type 1 code 1), and one sent by this host itself (our own output
chain's reject) is ``local-prohibited``, as is a send refused by it (EPERM).

States: open/syn-ack, closed/reset, filtered/<ICMPv6 reason>, filtered/no-response; every
outcome carries ``tcp_method: syn`` (the record says how it was probed, as tcp6.py's connect
outcomes say ``connect``). Source ports are syn.py's range and shard split (the keys include the
destination, so the two families never collide). Per-flow ``probe()`` only: the engine's batch
lane (engine/sweep.py) carries IPv4; IPv6 flows run through its per-flow path.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
import time

from scanner.core.flows import Flow
from scanner.probes import classify
from scanner.probes.base import Outcome, ProbeOptions, local_address
from scanner.probes.rawrecv import send_to
from scanner.probes.syn import (
    RCVBUF,
    TH_ACK,
    TH_RST,
    TH_SYN,
    SynProber,
    _attach_filter,
    bpf_port_range,
    cookie,
    set_rcvbuf,
)
from scanner.probes.tcp6 import Tcp6Prober

MSS6 = 1440  # 1500 - 40 (IPv6) - 20 (TCP)
IPV6_CHECKSUM = 7  # <linux/in6.h>, level IPPROTO_IPV6
CSUM_OFFSET = 16  # the TCP checksum's offset in the TCP header
METHOD = {"tcp_method": "syn"}
_SYN = struct.Struct("!HHIIBBHHHBBH")
_WINDOW = 64240
_SILENT = Outcome("filtered", "no-response", None, True, METHOD)
_ERR_OUTCOMES = {
    errno.EPERM: ("filtered", "local-prohibited"),
    errno.EACCES: ("filtered", "local-prohibited"),
    errno.EHOSTUNREACH: ("filtered", "host-unreach"),
    errno.ENETUNREACH: ("filtered", "net-unreach"),
    errno.EADDRNOTAVAIL: ("filtered", "net-unreach"),
}
_RESOURCE = {errno.ENOBUFS: "no-buffers", errno.EAGAIN: "no-buffers", errno.ENOMEM: "no-buffers"}
_RECVERR = (classify.SOL_IPV6, classify.IPV6_RECVERR)


def syn6_packet(sport: int, dport: int, seq: int) -> bytes:
    """A SYN (TCP header + MSS option) with checksum 0: the kernel fills it (IPV6_CHECKSUM)."""
    return _SYN.pack(sport, dport, seq, 0, 6 << 4, TH_SYN, _WINDOW, 0, 0, 2, 4, MSS6)


def canonical6(addr: str) -> str:
    """The one spelling of an IPv6 address the kernel reports (what replies are keyed by)."""
    return socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, addr))


def _out(state: str, reason: str, rtt: float | None = None, extra: dict | None = None) -> Outcome:
    return Outcome(state, reason, rtt, False, {**extra, **METHOD} if extra else METHOD)


class Syn6Prober(SynProber):
    """syn.py's prober for IPv6 destinations: its source ports, pending table, deadlines,
    close() and timeout plumbing are the IPv4 prober's (inherited); the socket, the template,
    the receiver and probe() are IPv6's. No batch interface: ``batchable`` says no to every
    flow, so a lane given this prober would run each flow through probe()."""

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._deadlines.loop = loop
        s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_TCP)
        try:
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_CHECKSUM, CSUM_OFFSET)
            s.setsockopt(*_RECVERR, 1)
            if self.opts.source and ":" in self.opts.source:
                s.bind((self.opts.source, 0))
        except OSError:
            s.close()
            raise
        set_rcvbuf(s, RCVBUF)
        with contextlib.suppress(OSError):
            _attach_filter(s, bpf_port_range(self._lo, self._hi, ipv6=True))
        self.sock = s
        loop.add_reader(s.fileno(), self._on_readable)

    @staticmethod
    def batchable(flow: Flow) -> bool:
        return False

    # -- receiving ----------------------------------------------------------------------------
    def _drain(self) -> None:
        if self.sock is not None:
            self._on_readable()

    def _on_readable(self) -> None:
        sock = self.sock
        assert sock is not None
        pending = self._pending
        now = time.perf_counter()
        errors = 0
        while True:
            try:
                pkt, addr = sock.recvfrom(128)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                # an ICMPv6 error for one of our SYNs is queued (sk_err, consumed by this call)
                errors += 1
                if errors > 64:
                    break
                self._read_errors()
                continue
            if len(pkt) < 14:
                continue
            sport, dport, _seq, ack = struct.unpack_from("!HHII", pkt)
            key = (addr[0], sport, dport)
            entry = pending.get(key)
            if entry is None or ack != (entry[2] + 1) & 0xFFFFFFFF:
                continue
            flags = pkt[13]
            if flags & TH_RST:
                state, reason = "closed", "reset"
            elif flags & (TH_SYN | TH_ACK) == (TH_SYN | TH_ACK):
                state, reason = "open", "syn-ack"
            else:
                continue
            del pending[key]
            fut, t0, _ = entry
            if not fut.done():
                fut.set_result(_out(state, reason, (now - t0) * 1000.0))
        self._read_errors()

    def _read_errors(self) -> None:
        """Every queued ICMPv6 error: the quoted SYN (ports, cookie) and its destination."""
        sock = self.sock
        assert sock is not None
        for _ in range(1024):
            try:
                data, anc, _flags, addr = sock.recvmsg(64, 512, socket.MSG_ERRQUEUE)
            except OSError:  # EAGAIN: the queue is empty
                return
            if len(data) < 8 or not addr:
                continue
            sport, dport, seq = struct.unpack_from("!HHI", data)
            key = (addr[0], dport, sport)
            entry = self._pending.get(key)
            if entry is None or seq != entry[2]:
                continue
            for level, ctype, cdata in anc:
                if (level, ctype) != _RECVERR:
                    continue
                _ee, origin, typ, code, offender = classify.parse_extended_err(cdata)
                if origin != classify.SO_EE_ORIGIN_ICMP6:
                    break  # a local error (EMSGSIZE, ...): not an answer; the SYN times out
                fut, t0, _ = entry
                del self._pending[key]
                rtt = (time.perf_counter() - t0) * 1000.0
                out = classify.tcp_icmp_outcome(typ, code, True, rtt)
                local = bool(offender) and local_address(offender)  # type: ignore[arg-type]
                out = classify.attribute(out, offender, key[0], local)
                if not fut.done():
                    fut.set_result(_out(out.state, out.reason, rtt, out.extra))
                break

    # -- sending ------------------------------------------------------------------------------
    async def probe(self, flow: Flow, timeout: float) -> Outcome:
        loop, sock = self.loop, self.sock
        assert loop is not None and sock is not None, "start() first"
        if flow.port is None:
            return _out("error", "no-port")
        try:
            dst = canonical6(flow.dst)
        except OSError:
            return _out("error", "not-ipv6")
        dport = flow.port
        sport = self._sport(dst, dport)
        key = (dst, dport, sport)
        fut = loop.create_future()
        t0 = time.perf_counter()
        seq = cookie(*key)
        self._pending[key] = (fut, t0, seq)
        try:
            send_to(sock, syn6_packet(sport, dport, seq), (dst, 0))
        except OSError as e:
            self._pending.pop(key, None)
            res = _RESOURCE.get(e.errno or 0)
            if res is not None:
                return Outcome("error", res)
            state, reason = _ERR_OUTCOMES.get(e.errno or 0, ("error", f"send-{e.errno}"))
            return _out(state, reason)
        self._deadlines.add(key, fut, t0, timeout, flow.dst)
        out = await fut
        return _SILENT if out is None else out

    @staticmethod
    def _connect_class() -> type[Tcp6Prober]:
        """connect_prober()'s class (token samples need a connection): tcp6.py's, whose
        outcomes say ``tcp_method: connect``."""
        return Tcp6Prober


def make_prober(opts: ProbeOptions | None = None) -> Syn6Prober:
    return Syn6Prober(opts)
