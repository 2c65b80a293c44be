"""ICMP echo probe: one socket for every attempt, replies matched by identifier, sequence and nonce.

Sockets, in order of preference:

- raw (``SOCK_RAW``/``IPPROTO_ICMP``, needs CAP_NET_RAW): the loop's shared receiver in
  ``rawrecv``; requests carry this prober's identifier and a 16-bit sequence, the payload starts
  with our tag. An echo reply matches on (source, identifier, sequence) and must echo the tag; a
  destination unreachable / time exceeded matches on the request it quotes (destination,
  identifier, sequence).
- the unprivileged ICMP datagram socket (``SOCK_DGRAM``/``IPPROTO_ICMP``, allowed when the
  process's group is in ``net.ipv4.ping_group_range``): the kernel rewrites the identifier to the
  socket's own and delivers only our replies, so matching is on (source, sequence) and the tag;
  ICMP errors come through IP_RECVERR's error queue with the quoted request.
- neither: every attempt is ``error``/``needs-cap-net-raw``.

Outcomes: ``open``/``echo-reply``; ``filtered`` with the unreachable code's reason; silence is
``filtered``/``no-response`` (silent, the engine retries). Flow.port is None. IPv4 only: an IPv6
flow is ``error``/``ipv6-unsupported``.

Echo replies are not rate limited by Linux (icmp_ratemask leaves type 0 out), so a sweep of
thousands of hosts needs no pacing beyond the engine's global rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

from scanner.core import privileges, tags
from scanner.core.flows import Flow
from scanner.probes import classify, payloads, rawrecv
from scanner.probes.base import (
    NO_RESPONSE_FILTERED,
    Outcome,
    ProbeOptions,
    enable_rx_stamps,
    receipt_ns,
)

IP_RECVERR = 11
TAG_OFF = 8  # the tag's offset inside the ICMP message (right after the echo header)
TAG_LEN = tags.TAG_LEN
NEEDS_RAW = Outcome("error", "needs-cap-net-raw")
OPEN = Outcome("open", "echo-reply")


class EchoProber:
    """What the ICMP (here) and ICMPv6 (icmp6.py) echo probers share: the socket mode, this
    prober's identifier and sequence, the requests in flight, and how close() ends them."""

    proto = "icmp"
    needs_raw = False  # the datagram socket serves when raw sockets are not allowed

    def __init__(self, opts: ProbeOptions, mode: str | None = None) -> None:
        self.opts = opts
        self.secret = opts.secret or b""
        self.forced_mode = mode  # "raw" | "dgram" | "none" (tests); None: decide in start()
        self.mode = "none"
        self.ident = int.from_bytes(os.urandom(2), "big")
        self.seq = int.from_bytes(os.urandom(2), "big")
        # (destination: str for IPv4, packed for IPv6, sequence) -> (future, tag, send time)
        self.pending: dict[tuple[str | bytes, int], tuple[asyncio.Future, bytes, int]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.sock: socket.socket | None = None

    def _end_pending(self) -> None:
        for fut, _, _ in self.pending.values():
            if not fut.done():
                fut.set_result(Outcome("error", "closed"))
        self.pending.clear()

    def _close_sock(self) -> None:
        if self.sock is not None and self.loop is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
        self.sock = None
        self.mode = "none"

    def _drain_errors(
        self,
        want: tuple[int, int, int, int],
        outcome: Callable[[int, int, str | None, str], Outcome],
        key_of: Callable[[str], Any],
    ) -> None:
        """Read the datagram socket's error queue: each ICMP(v6) error quoting one of our
        echo requests resolves it. ``want``: (cmsg level, cmsg type, error origin, echo
        request type) of the family; ``key_of``: the destination as ``pending`` keys it."""
        sock = self.sock
        assert sock is not None
        level, ctype, origin_want, echo_type = want
        for _ in range(256):
            try:
                data, anc, _, addr = sock.recvmsg(2048, 512, socket.MSG_ERRQUEUE)
            except OSError:  # empty (BlockingIOError) or gone: nothing more to read now
                break
            now = receipt_ns(anc)
            for lvl, typ_, cdata in anc:
                if lvl != level or typ_ != ctype or len(data) < 8:
                    continue
                _, origin, typ, code, offender = classify.parse_extended_err(cdata)
                if origin != origin_want or data[0] != echo_type:
                    continue
                seq = struct.unpack_from("!H", data, 6)[0]
                quoted = data[TAG_OFF:]
                rawrecv.resolve(
                    self.pending,
                    (key_of(addr[0]), seq),
                    now,
                    outcome(typ, code, offender, addr[0]),
                    quoted if len(quoted) >= TAG_LEN else None,
                )


class IcmpProber(EchoProber):
    def __init__(self, opts: ProbeOptions, mode: str | None = None) -> None:
        super().__init__(opts, mode)
        self.rx: rawrecv.RawIcmp | None = None
        self.template: payloads.Template | None = None

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.template = payloads.icmp_echo_template()
        mode = self.forced_mode
        if mode is None:
            mode = (
                "raw"
                if privileges.can_raw()
                else "dgram"
                if privileges.can_ping_dgram()
                else "none"
            )
        self.mode = mode
        try:
            if mode == "raw":
                self.rx = rawrecv.acquire(loop, self._on_raw)
                self.sock = self.rx.sock
            elif mode == "dgram":
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
                s.setblocking(False)
                s.setsockopt(socket.SOL_IP, IP_RECVERR, 1)
                enable_rx_stamps(s)
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                if self.opts.source:
                    s.bind((self.opts.source, 0))
                self.sock = s
                loop.add_reader(s.fileno(), self._on_dgram)
        except OSError:
            self.mode = "none"

    async def probe(self, flow: Flow, timeout: float) -> Outcome:
        if self.mode == "none" or self.sock is None or self.loop is None:
            return NEEDS_RAW
        if ":" in flow.dst:
            return Outcome("error", "ipv6-unsupported")
        loop = self.loop
        nonce = payloads.new_nonce()
        tag = tags.make_tag(self.secret, nonce)
        # the next sequence whose slot for this destination is free
        seq = rawrecv.next_free_seq(self.pending, flow.dst, self.seq)
        if seq is None:
            return Outcome("error", "too-many-in-flight", silent=True)
        self.seq = seq
        key = (flow.dst, seq)
        assert self.template is not None
        data = payloads.render_echo(self.template, tag, self.ident, self.seq)
        return await rawrecv.send_and_wait(  # type: ignore[return-value]
            loop,
            self.sock,
            data,
            (flow.dst, 0),
            self.pending,
            key,
            tag,
            timeout,
            NO_RESPONSE_FILTERED,
        )

    # ---- receiving ----------------------------------------------------------------------------

    def _resolve(
        self, key: tuple[str, int], now: int, outcome: Outcome, echoed: bytes | None
    ) -> None:
        rawrecv.resolve(self.pending, key, now, outcome, echoed)

    def _on_raw(self, pkt: bytes, ihl: int, now: int) -> None:
        typ = pkt[ihl]
        if typ == rawrecv.ICMP_ECHO_REPLY:
            ident, seq = struct.unpack_from("!HH", pkt, ihl + 4)
            if ident == self.ident:
                src = socket.inet_ntoa(pkt[12:16])
                self._resolve((src, seq), now, OPEN, pkt[ihl + TAG_OFF :])
        elif typ in (classify.ICMP_DEST_UNREACH, classify.ICMP_TIME_EXCEEDED):
            q = ihl + 8
            qihl = rawrecv.ip_header_len(pkt, q)
            if not qihl or pkt[q + 9] != socket.IPPROTO_ICMP or len(pkt) < q + qihl + 8:
                return
            if pkt[q + qihl] != rawrecv.ICMP_ECHO:
                return
            ident, seq = struct.unpack_from("!HH", pkt, q + qihl + 4)
            if ident != self.ident:
                return
            dst = socket.inet_ntoa(pkt[q + 16 : q + 20])
            quoted = pkt[q + qihl + TAG_OFF :]
            src = socket.inet_ntoa(pkt[12:16])
            out = _error_outcome(typ, pkt[ihl + 1], src, dst)
            self._resolve((dst, seq), now, out, quoted if len(quoted) >= TAG_LEN else None)

    def _on_dgram(self) -> None:
        sock, loop = self.sock, self.loop
        if sock is None or loop is None:
            return
        self._drain_errors(
            (socket.SOL_IP, IP_RECVERR, classify.SO_EE_ORIGIN_ICMP, rawrecv.ICMP_ECHO),
            _error_outcome,
            str,
        )
        for _ in range(256):
            try:
                data, anc, _, addr = sock.recvmsg(2048, 64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # an error the queue above reports; keep draining
            now = receipt_ns(anc)
            if len(data) >= 8 and data[0] == rawrecv.ICMP_ECHO_REPLY:
                seq = struct.unpack_from("!H", data, 6)[0]
                self._resolve((addr[0], seq), now, OPEN, data[TAG_OFF:])

    def close(self) -> None:
        self._end_pending()
        if self.rx is not None:  # the loop's shared receiver owns the socket
            rawrecv.release(self.rx, self._on_raw)
            self.rx = None
            self.sock = None
        self._close_sock()


def _error_outcome(typ: int, code: int, offender: str | None, dst: str) -> Outcome:
    extra = {"icmp_from": offender} if offender and offender != dst else None
    return Outcome("filtered", classify.icmp_reason(typ, code), extra=extra)


def make_prober(opts: ProbeOptions) -> IcmpProber:
    return IcmpProber(opts)
