"""IP-in-IP probe (IP protocol 4, Calico's IPIP mode): does an encapsulated packet reach the host?

Each attempt sends one IPv4 packet of protocol 4 whose inner packet is what a tunnel peer would
send: IPv4 from our address to the far host's address, an ICMP echo request (this prober's
identifier, a per-attempt sequence that is also the inner IP id) whose payload is our tag. A
tunnel endpoint decapsulates it and answers the inner echo like any ping; a host without one
answers the outer packet with an ICMP error that quotes it.

    ICMP protocol unreachable (3/2) quoting our packet   closed   proto-unreach
        (no IP-in-IP handler: the packet passed every firewall, there is just no tunnel yet)
    ICMP port unreachable (3/3) quoting our packet       closed   port-unreach
        (the ipip module is loaded but no tunnel matched: Linux's tunnel4 answers that way)
    other ICMP errors quoting it                         filtered with the code's reason
    an echo reply carrying our identifier, sequence and tag   open   echo-reply
    silence                                              open|filtered   no-response (silent)

Matching uses the quoted outer destination and the quoted inner IP id (always inside the 8
bytes RFC 792 guarantees), and the tag when the quote is long enough (Linux quotes the whole
packet); echo replies use (source, identifier, sequence) and the echoed tag.

Sending uses an ``IPPROTO_RAW`` socket (we write the outer header, the kernel fills in source,
id and checksum), NOT ``socket(AF_INET, SOCK_RAW, IPPROTO_IPIP)``: a raw socket of protocol 4
would receive every IP-in-IP packet arriving at this host, and a host with such a socket no
longer sends "protocol unreachable" (``ip_protocol_deliver_rcu`` only answers when no raw socket
took the packet), so an agent probing its peers would hide from their probes. Receiving is the
loop's shared raw ICMP socket (``rawrecv``). Both need CAP_NET_RAW; without it every attempt is
``error``/``needs-cap-net-raw``. IPv4 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct

from scanner.core import privileges, tags
from scanner.core.flows import Flow
from scanner.probes import classify, payloads, rawrecv
from scanner.probes.base import NO_RESPONSE_OPEN_FILTERED, Outcome, ProbeOptions

IPPROTO_IPIP = 4
NEEDS_RAW = Outcome("error", "needs-cap-net-raw")
OPEN = Outcome("open", "echo-reply")
INNER_TAG_OFF = 28  # inside the inner packet: IPv4 header (20) + ICMP echo header (8)


def classify_error(icmp_type: int, code: int) -> Outcome:
    """The outcome of an ICMP error quoting our IP-in-IP packet (pure)."""
    if icmp_type == classify.ICMP_DEST_UNREACH and code in (2, 3):
        return Outcome("closed", classify.icmp_reason(icmp_type, code))
    return Outcome("filtered", classify.icmp_reason(icmp_type, code))


class IpipProber:
    proto = "ipip"
    needs_raw = True

    def __init__(self, opts: ProbeOptions) -> None:
        self.opts = opts
        self.secret = opts.secret or b""
        self.ident = int.from_bytes(os.urandom(2), "big")
        self.seq = int.from_bytes(os.urandom(2), "big")
        self.pending: dict[tuple[str, int], tuple[asyncio.Future, bytes, int]] = {}
        self.sources: dict[str, bytes] = {}  # destination -> our packed source address
        self.loop: asyncio.AbstractEventLoop | None = None
        self.sock: socket.socket | None = None
        self.rx: rawrecv.RawIcmp | None = None
        self.template: payloads.Template | None = None

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.template = payloads.ipip_outer_template()
        if not privileges.can_raw():
            return
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            s.setblocking(False)
            self.rx = rawrecv.acquire(loop, self._on_icmp)
            self.sock = s
        except OSError:
            self.sock = None

    def _source_for(self, dst: str) -> bytes:
        """Our address towards ``dst`` (the inner packet's source), from a route lookup."""
        src = self.sources.get(dst)
        if src is None:
            if self.opts.source:
                src = socket.inet_aton(self.opts.source)
            else:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.connect((dst, 9))  # no packet is sent: this only selects a route
                    src = socket.inet_aton(s.getsockname()[0])
            self.sources[dst] = src
        return src

    async def probe(self, flow: Flow, timeout: float) -> Outcome:
        if self.sock is None or self.loop is None or self.template is None:
            return NEEDS_RAW
        if ":" in flow.dst:
            return Outcome("error", "ipv6-unsupported")
        loop = self.loop
        try:
            src = self._source_for(flow.dst)
        except OSError as e:
            return classify.errno_outcome(e)
        seq = rawrecv.next_free_seq(self.pending, flow.dst, self.seq)
        if seq is None:
            return Outcome("error", "too-many-in-flight", silent=True)
        self.seq = seq
        key = (flow.dst, seq)
        nonce = payloads.new_nonce()
        tag = tags.make_tag(self.secret, nonce)
        dst = socket.inet_aton(flow.dst)
        buf = bytearray(
            self.template.render(
                tag, src, dst, ip_id=self.seq, icmp_id=self.ident, icmp_seq=self.seq
            )
        )
        buf[16:20] = dst  # the outer destination
        return await rawrecv.send_and_wait(  # type: ignore[return-value]
            loop,
            self.sock,
            bytes(buf),
            (flow.dst, 0),
            self.pending,
            key,
            tag,
            timeout,
            NO_RESPONSE_OPEN_FILTERED,
        )

    def _resolve(
        self, key: tuple[str, int], now: int, outcome: Outcome, echoed: bytes | None
    ) -> None:
        rawrecv.resolve(self.pending, key, now, outcome, echoed)

    def _on_icmp(self, pkt: bytes, ihl: int, now: int) -> None:
        typ = pkt[ihl]
        if typ == rawrecv.ICMP_ECHO_REPLY:
            ident, seq = struct.unpack_from("!HH", pkt, ihl + 4)
            if ident == self.ident:
                src = socket.inet_ntoa(pkt[12:16])
                self._resolve((src, seq), now, OPEN, pkt[ihl + 8 :])
            return
        if typ not in (classify.ICMP_DEST_UNREACH, classify.ICMP_TIME_EXCEEDED):
            return
        q = ihl + 8
        qihl = rawrecv.ip_header_len(pkt, q)
        if not qihl or pkt[q + 9] != IPPROTO_IPIP or len(pkt) < q + qihl + 8:
            return
        inner = q + qihl
        if pkt[inner] >> 4 != 4:
            return
        seq = struct.unpack_from("!H", pkt, inner + 4)[0]
        dst = socket.inet_ntoa(pkt[q + 16 : q + 20])
        echoed = pkt[inner + INNER_TAG_OFF :]
        out = classify_error(typ, pkt[ihl + 1])
        offender = socket.inet_ntoa(pkt[12:16])
        if offender != dst:
            out = Outcome(out.state, out.reason, extra={"icmp_from": offender})
        self._resolve((dst, seq), now, out, echoed if len(echoed) >= tags.TAG_LEN else None)

    def close(self) -> None:
        for fut, _, _ in self.pending.values():
            if not fut.done():
                fut.set_result(Outcome("error", "closed"))
        self.pending.clear()
        if self.rx is not None:
            rawrecv.release(self.rx, self._on_icmp)
            self.rx = None
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None


def make_prober(opts: ProbeOptions) -> IpipProber:
    return IpipProber(opts)
