"""Raw SYN over IPv6 (``--method syn``, and ``auto`` with CAP_NET_RAW): the IPv6 twin of syn.py.

One ``AF_INET6``/``SOCK_RAW``/``IPPROTO_TCP`` socket. The kernel builds the IPv6 header (source
address from the routing table, or ``--source``) and, with ``IPV6_CHECKSUM`` set to 16 (the
TCP checksum's offset; RFC 3542 section 3.1), computes the TCP checksum over the IPv6
pseudo-header on every send and verifies it on every receipt: the 24-byte SYN template (TCP
header + MSS option, MSS 1440 for IPv6) leaves its checksum 0 and needs no source address.

Matching is syn.py's, stateless and keyed: the sequence number is ``syn.cookie`` of
(destination, destination port, source port), a SYN-ACK or RST is ours only if it acknowledges
cookie + 1. A raw IPv6 socket gets packets without their IPv6 header (the TCP header first, the
sender in the address), so syn.py's IPv4 BPF program does not fit; one here checks the TCP
header at offset 0. ICMPv6 errors quoting our SYNs come through the same socket's error queue
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
from collections.abc import Callable

from scanner.core.flows import Flow
from scanner.probes import classify
from scanner.probes.base import Outcome, ProbeOptions, local_address
from scanner.probes.deadlines import Deadlines
from scanner.probes.rawrecv import send_to
from scanner.probes.syn import (
    RCVBUF,
    SPORT_HI,
    SPORT_LO,
    TH_ACK,
    TH_RST,
    TH_SYN,
    _attach_filter,
    cookie,
    set_rcvbuf,
)

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


def bpf6_port_range(lo: int, hi: int) -> bytes:
    """A classic BPF program for a raw IPv6 TCP socket (the TCP header at offset 0): accept only
    packets whose destination port is in [lo, hi] and that carry SYN+ACK or RST."""
    ins = [
        (0x28, 0, 0, 2),  # ldh [2]: TCP destination port
        (0x35, 0, 6, lo),  # jge lo ? next : drop
        (0x25, 5, 0, hi),  # jgt hi ? drop : next
        (0x30, 0, 0, 13),  # ldb [13]: TCP flags
        (0x45, 2, 0, TH_RST),  # jset RST ? accept : next
        (0x54, 0, 0, TH_SYN | TH_ACK),  # and SYN|ACK
        (0x15, 0, 1, TH_SYN | TH_ACK),  # jeq SYN|ACK ? accept : drop
        (0x06, 0, 0, 0xFFFF),  # accept
        (0x06, 0, 0, 0),  # drop
    ]
    return b"".join(struct.pack("HBBI", *i) for i in ins)


def canonical6(addr: str) -> str:
    """The one spelling of an IPv6 address the kernel reports (what replies are keyed by)."""
    return socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, addr))


def _out(state: str, reason: str, rtt: float | None = None, extra: dict | None = None) -> Outcome:
    return Outcome(state, reason, rtt, False, {**extra, **METHOD} if extra else METHOD)


class Syn6Prober:
    proto = "tcp"
    needs_raw = True

    def __init__(self, opts: ProbeOptions | None = None) -> None:
        self.opts = opts or ProbeOptions()
        k, n = self.opts.shard
        span = (SPORT_HI - SPORT_LO + 1) // n
        self._lo = SPORT_LO + k * span
        self._hi = self._lo + span - 1
        self._next = self._lo
        self.loop: asyncio.AbstractEventLoop | None = None
        self.sock: socket.socket | None = None
        # (canonical destination, dport, sport) -> (future, t0)
        self._pending: dict[tuple[str, int, int], tuple[asyncio.Future, float]] = {}
        self._deadlines = Deadlines(self._expire, self._drain)
        self._fallback = None  # the connect prober (tcp6.py), for token samples

    @property
    def timeout_for(self) -> Callable[[str], float] | None:
        return self._deadlines.timeout_for

    @timeout_for.setter
    def timeout_for(self, fn: Callable[[str], float] | None) -> None:
        self._deadlines.timeout_for = fn
        if self._fallback is not None:
            self._fallback.timeout_for = fn

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
            _attach_filter(s, bpf6_port_range(self._lo, self._hi))
        self.sock = s
        loop.add_reader(s.fileno(), self._on_readable)

    def close(self) -> None:
        if self.sock is not None and self.loop is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        self._deadlines.close()
        for fut, _ in self._pending.values():
            if not fut.done():
                fut.set_result(None)
        self._pending.clear()
        if self._fallback is not None:
            self._fallback.close()

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
            if entry is None or ack != (cookie(*key) + 1) & 0xFFFFFFFF:
                continue
            flags = pkt[13]
            if flags & TH_RST:
                state, reason = "closed", "reset"
            elif flags & (TH_SYN | TH_ACK) == (TH_SYN | TH_ACK):
                state, reason = "open", "syn-ack"
            else:
                continue
            del pending[key]
            fut, t0 = entry
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
            if entry is None or seq != cookie(*key):
                continue
            for level, ctype, cdata in anc:
                if (level, ctype) != _RECVERR:
                    continue
                _ee, origin, typ, code, offender = classify.parse_extended_err(cdata)
                if origin != classify.SO_EE_ORIGIN_ICMP6:
                    break  # a local error (EMSGSIZE, ...): not an answer; the SYN times out
                fut, t0 = entry
                del self._pending[key]
                rtt = (time.perf_counter() - t0) * 1000.0
                out = classify.tcp_icmp_outcome(typ, code, True, rtt)
                local = bool(offender) and local_address(offender)  # type: ignore[arg-type]
                out = classify.attribute(out, offender, key[0], local)
                if not fut.done():
                    fut.set_result(_out(out.state, out.reason, rtt, out.extra))
                break

    def _expire(self, key: tuple[str, int, int], fut: asyncio.Future) -> None:
        self._pending.pop(key, None)
        fut.set_result(None)

    # -- sending ------------------------------------------------------------------------------
    def _sport(self, dst: str, dport: int) -> int:
        p = self._next
        for _ in range(self._hi - self._lo + 1):
            p = p + 1 if p < self._hi else self._lo
            if (dst, dport, p) not in self._pending:
                break
        self._next = p
        return p

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
        self._pending[key] = (fut, t0)
        try:
            send_to(sock, syn6_packet(sport, dport, cookie(*key)), (dst, 0))
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

    async def connect_prober(self):  # -> scanner.probes.tcp6.Tcp6Prober
        """The IPv6 connect prober beside this one (token samples read the responder's token,
        which needs a connection), started on first use; its outcomes say ``connect``."""
        if self._fallback is None:
            from scanner.probes.tcp6 import Tcp6Prober

            self._fallback = Tcp6Prober(self.opts)
            self._fallback.timeout_for = self.timeout_for
            assert self.loop is not None
            await self._fallback.start(self.loop)
        return self._fallback


def make_prober(opts: ProbeOptions | None = None) -> Syn6Prober:
    return Syn6Prober(opts)
