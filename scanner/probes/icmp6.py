"""ICMPv6 echo probe: the IPv6 twin of ``icmp.py`` (the engine sends IPv6 ``icmp`` flows here).

Sockets, in order of preference:

- raw (``AF_INET6``/``SOCK_RAW``/``IPPROTO_ICMPV6``, needs CAP_NET_RAW): the kernel fills the
  ICMPv6 checksum (it always does on raw ICMPv6 sockets, RFC 3542) and hands us every ICMPv6
  message without the IPv6 header; an ``ICMP6_FILTER`` lets only echo replies, destination
  unreachables and time exceeded through. Requests carry this prober's identifier, a 16-bit
  sequence and our tag. An echo reply matches on (source, identifier, sequence) and must echo
  the tag; an error matches on the request it quotes (quoted destination, identifier, sequence,
  tag).
- the unprivileged ICMPv6 datagram socket (``SOCK_DGRAM``/``IPPROTO_ICMPV6``, allowed by the
  same ``net.ipv4.ping_group_range`` as IPv4's): the kernel owns the identifier and delivers only
  our replies; errors come through IPV6_RECVERR's error queue (``SO_EE_ORIGIN_ICMP6``) with the
  quoted request and the original destination.
- neither: ``error``/``needs-cap-net-raw``.

Outcomes as for IPv4 (``scanner.probes.classify``): ``open``/``echo-reply``; an error is
``filtered`` with the ICMPv6 code's reason (``admin-prohibited`` for code 1, what nftables'
``reject with icmpx admin-prohibited`` sends over IPv6); silence is ``filtered``/``no-response``.
Matching keys use the packed 16-byte address, so no two spellings of one address can differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct

from scanner.core import privileges, tags
from scanner.core.flows import Flow
from scanner.probes import classify, rawrecv
from scanner.probes.base import (
    NO_RESPONSE_FILTERED,
    Outcome,
    ProbeOptions,
    enable_rx_stamps,
    local_address,
    receipt_ns,
)
from scanner.probes.icmp import EchoProber

ICMP6_ECHO_REQUEST = 128
ICMP6_ECHO_REPLY = 129
ICMP6_FILTER = 1  # <netinet/icmp6.h>, level IPPROTO_ICMPV6
TAG_OFF = 8
TAG_LEN = tags.TAG_LEN
PAYLOAD_LEN = 48  # like ping's 56 bytes of data, minus nothing we need; the tag comes first
IPV6_HDR = 40
NEEDS_RAW = Outcome("error", "needs-cap-net-raw")
OPEN = Outcome("open", "echo-reply")
_HDR = struct.Struct("!BBHHH")


def echo_request(ident: int, seq: int, tag: bytes) -> bytes:
    """An ICMPv6 echo request with a zero checksum (the kernel computes it)."""
    pad = bytes(max(0, PAYLOAD_LEN - len(tag)))
    return _HDR.pack(ICMP6_ECHO_REQUEST, 0, 0, ident & 0xFFFF, seq & 0xFFFF) + tag + pad


def icmp6_filter(*allowed: int) -> bytes:
    """struct icmp6_filter (256 bits, a set bit BLOCKS that type) passing only ``allowed``."""
    words = [0xFFFFFFFF] * 8
    for t in allowed:
        words[t >> 5] &= ~(1 << (t & 31))
    return struct.pack("=8I", *words)


def _packed(addr: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, addr.split("%")[0])


class Icmp6Prober(EchoProber):
    """The set-up (identifier, sequence, pending requests keyed by the packed destination,
    close) is icmp.py's; the sockets and the parsing are ICMPv6's."""

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        modes = [self.forced_mode] if self.forced_mode else ["raw", "dgram"]
        if self.forced_mode is None and not privileges.can_raw():
            modes = ["dgram"]
        for mode in modes:
            if mode == "none":
                break
            try:
                self.sock = self._open(mode)
            except OSError:
                continue
            self.mode = mode
            loop.add_reader(self.sock.fileno(), self._on_raw if mode == "raw" else self._on_dgram)
            return

    def _open(self, mode: str) -> socket.socket:
        kind = socket.SOCK_RAW if mode == "raw" else socket.SOCK_DGRAM
        s = socket.socket(socket.AF_INET6, kind, socket.IPPROTO_ICMPV6)
        try:
            s.setblocking(False)
            enable_rx_stamps(s)  # RTTs from the kernel's receipt, as icmp.py's
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            if mode == "raw":
                allowed = (
                    ICMP6_ECHO_REPLY,
                    classify.ICMP6_DEST_UNREACH,
                    classify.ICMP6_TIME_EXCEEDED,
                )
                s.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, icmp6_filter(*allowed))
            else:
                s.setsockopt(classify.SOL_IPV6, classify.IPV6_RECVERR, 1)
            if self.opts.source and ":" in self.opts.source:
                s.bind((self.opts.source, 0))
        except OSError:
            s.close()
            raise
        return s

    async def probe(self, flow: Flow, timeout: float) -> Outcome:
        if self.mode == "none" or self.sock is None or self.loop is None:
            return NEEDS_RAW
        try:
            dst = _packed(flow.dst)
        except OSError:
            return Outcome("error", "not-ipv6")
        tag = tags.make_tag(self.secret, os.urandom(8))
        seq = rawrecv.next_free_seq(self.pending, dst, self.seq)
        if seq is None:
            return Outcome("error", "too-many-in-flight", silent=True)
        self.seq = seq
        data = echo_request(self.ident, seq, tag)
        return await rawrecv.send_and_wait(  # type: ignore[return-value]
            self.loop,
            self.sock,
            data,
            (flow.dst, 0),
            self.pending,
            (dst, seq),
            tag,
            timeout,
            NO_RESPONSE_FILTERED,
        )

    # ---- receiving ----------------------------------------------------------------------------

    def _on_raw(self) -> None:
        sock, loop = self.sock, self.loop
        if sock is None or loop is None:
            return
        for _ in range(256):
            try:
                msg, anc, _, addr = sock.recvmsg(2048, 64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            self.on_message(msg, addr[0], receipt_ns(anc))

    def on_message(self, msg: bytes, src: str, now: int) -> None:
        """One ICMPv6 message (no IPv6 header) from ``src``, received at ``now`` (receipt_ns;
        public for the tests)."""
        if len(msg) < 8:
            return
        typ, code = msg[0], msg[1]
        if typ == ICMP6_ECHO_REPLY:
            ident, seq = struct.unpack_from("!HH", msg, 4)
            if ident == self.ident:
                rawrecv.resolve(self.pending, (_packed(src), seq), now, OPEN, msg[TAG_OFF:])
        elif typ in (classify.ICMP6_DEST_UNREACH, classify.ICMP6_TIME_EXCEEDED):
            q = 8  # the quoted IPv6 header, then our echo request
            if len(msg) < q + IPV6_HDR + 8 or msg[q] >> 4 != 6 or msg[q + 6] != 58:
                return  # not a quoted IPv6 packet whose next header is ICMPv6
            e = q + IPV6_HDR
            if msg[e] != ICMP6_ECHO_REQUEST:
                return
            ident, seq = struct.unpack_from("!HH", msg, e + 4)
            if ident != self.ident:
                return
            dst = msg[q + 24 : q + 40]
            quoted = msg[e + TAG_OFF :]
            out = _error_outcome(typ, code, src, socket.inet_ntop(socket.AF_INET6, dst))
            rawrecv.resolve(
                self.pending, (dst, seq), now, out, quoted if len(quoted) >= TAG_LEN else None
            )

    def _on_dgram(self) -> None:
        sock, loop = self.sock, self.loop
        if sock is None or loop is None:
            return
        self._drain_errors(
            (classify.SOL_IPV6, classify.IPV6_RECVERR, classify.SO_EE_ORIGIN_ICMP6,
             ICMP6_ECHO_REQUEST),
            _error_outcome,
            _packed,
        )  # fmt: skip
        for _ in range(256):
            try:
                data, anc, _, addr = sock.recvmsg(2048, 64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # an error the queue above reports; keep draining
            now = receipt_ns(anc)
            if len(data) >= 8 and data[0] == ICMP6_ECHO_REPLY:
                seq = struct.unpack_from("!H", data, 6)[0]
                rawrecv.resolve(self.pending, (_packed(addr[0]), seq), now, OPEN, data[TAG_OFF:])

    def close(self) -> None:
        self._end_pending()
        self._close_sock()


def _error_outcome(typ: int, code: int, offender: str | None, dst: str) -> Outcome:
    out = Outcome("filtered", classify.icmp_reason(typ, code, v6=True))
    local = bool(offender) and local_address(offender)  # type: ignore[arg-type]
    return classify.attribute(out, offender, dst, local)


def make_prober(opts: ProbeOptions) -> Icmp6Prober:
    return Icmp6Prober(opts)
