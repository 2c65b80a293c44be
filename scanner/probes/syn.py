"""Raw SYN probe (``--method syn``): a half-open scan with stateless, keyed matching.

Per attempt: one SYN, built from a 24-byte template (TCP header + MSS option) with the
destination port, a source port and a sequence number patched in and the checksum completed,
sent from one raw socket. Replies are matched without per-connection kernel state:

  - the sequence number is a keyed hash of (destination, destination port, source port), so a
    SYN-ACK or RST is ours only if its acknowledgement number is that cookie + 1 (masscan and
    zmap do the same);
  - SYN-ACK -> open (``syn-ack``), RST -> closed (``reset``, nmap's word for -sS), an ICMP
    unreachable quoting our SYN -> filtered with the exact code (``admin-prohibited`` is
    readable here, unlike with connect()), silence -> filtered (``no-response``).

No socket owns our source port, so this host's kernel answers the far end's SYN-ACK with an
RST: the far service never sees a connection (nothing to accept(), no TIME_WAIT anywhere).
Source ports come from 61000-65535 (above Linux's default ephemeral range), split between
shard processes; a classic BPF filter on the raw socket lets through only TCP packets to
this prober's ports, so a busy host's other traffic is not parsed in Python.

Needs CAP_NET_RAW and IPv4; IPv6 destinations and runs with a scan secret (whose responder
token needs a full connection) use the connect probe. The template is packed by hand with
struct (24 bytes; importing scapy would cost ~0.5 s of start-up); tests decode it with scapy.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import socket
import struct
import time
from collections.abc import Callable

from scanner.core.flows import Flow
from scanner.probes import classify, mmsg, rawrecv
from scanner.probes.base import Outcome, ProbeOptions, local_address
from scanner.probes.deadlines import Deadlines
from scanner.probes.tcp import TcpProber

SPORT_LO = 61000
SPORT_HI = 65535
MSS = 1460
TH_SYN = 0x02
TH_RST = 0x04
TH_ACK = 0x10

_HDR = struct.Struct("!HHIIBBHHH")  # sport dport seq ack off flags window csum urg
_OPT_MSS = struct.pack("!BBH", 2, 4, MSS)
_SILENT = Outcome("filtered", "no-response", None, True)
_ERR_OUTCOMES = {
    errno.EPERM: Outcome("filtered", "local-prohibited"),
    errno.EACCES: Outcome("filtered", "local-prohibited"),
    errno.EHOSTUNREACH: Outcome("filtered", "host-unreach"),
    errno.ENETUNREACH: Outcome("filtered", "net-unreach"),
}
_RESOURCE = {errno.ENOBUFS: "no-buffers", errno.EAGAIN: "no-buffers", errno.ENOMEM: "no-buffers"}


# SYNs per sendmmsg call, and answers per recvmmsg call (scanner.probes.mmsg). A thread that
# sends (mmsg.Sender) takes bigger batches: each costs it a hand-over and the GIL twice, and the
# loop reads the answers meanwhile (benchmarks/RESULTS.md, seventh pass: an agent alone sweeps
# ~42,000 flows/s with 64, ~54,000 with 256; in the loop's own thread, 256 gained nothing)
BATCH = 64
THREAD_BATCH = 256
RECV_BATCH = 256
# A batch whose sendmmsg call returned this long (s) after its first SYN was queued was sent
# late: its SYNs' deadlines start when the call returned (SynProber._reaped), their RTTs when
# it began (_stamp). A SYN leaves somewhere inside the call, and a sender starved of CPU
# inside it (the loop's thread or its own) must not have its SYNs' silence counted early.
LATE = 0.002
_ANSWER = struct.Struct("!HHII")  # sport dport seq ack
_LEN_STRIDE, _LEN_AT = mmsg.LEN_STRIDE, mmsg.LEN_AT

# The SYN as one struct: TCP header (ack 0, data offset 6 words, SYN, window 64240, urgent 0)
# and the MSS option. Only the ports, the sequence number and the checksum vary.
_SYN = struct.Struct("!HHIIBBHHHBBH")
_WINDOW = 64240


def pseudo_sum(src: bytes, dst: bytes) -> int:
    """The unfolded one's-complement sum of everything in a SYN from src to dst (packed IPv4)
    except its ports and sequence number: the IPv4 pseudo-header and the constant fields.
    The checksum is linear, so a probe adds three numbers instead of summing 36 bytes."""
    a = struct.unpack("!4H", src + dst)
    return (
        sum(a) + socket.IPPROTO_TCP + 24  # pseudo-header: addresses, protocol, TCP length
        + ((6 << 4) << 8 | TH_SYN) + _WINDOW + (2 << 8 | 4) + MSS  # offset+flags, window, MSS
    )  # fmt: skip


def syn_packet(base: int, sport: int, dport: int, seq: int) -> bytes:
    """A SYN from the template: ``base`` from pseudo_sum, the varying fields patched in."""
    s = base + sport + dport + (seq >> 16) + (seq & 0xFFFF)
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return _SYN.pack(sport, dport, seq, 0, 6 << 4, TH_SYN, _WINDOW, ~s & 0xFFFF, 0, 2, 4, MSS)


def build_syn(src: bytes, dst: bytes, sport: int, dport: int, seq: int) -> bytes:
    """A TCP SYN header with an MSS option and a correct checksum (src/dst: packed IPv4)."""
    return syn_packet(pseudo_sum(src, dst), sport, dport, seq)


def cookie(dst: str, dport: int, sport: int) -> int:
    """The keyed sequence number of a probe. Python's str/tuple hash is SipHash keyed per
    process (forked shards share the key), which is what a stateless match needs."""
    return hash((dst, dport, sport, "portmesh-syn")) & 0xFFFFFFFF


def bpf_port_range(lo: int, hi: int, ipv6: bool = False) -> bytes:
    """A classic BPF program for a raw TCP socket: accept only packets whose TCP destination
    port is in [lo, hi] and that carry SYN+ACK or RST. IPv4 packets come with their IP header
    (the TCP header after it); a raw IPv6 socket's come without (``ipv6``: TCP at offset 0)."""
    # struct sock_filter { u16 code; u8 jt; u8 jf; u32 k; }
    ldh, ldb = (0x28, 0x30) if ipv6 else (0x48, 0x50)  # ld [k] or ld [x+k]
    ins = [] if ipv6 else [(0xB1, 0, 0, 0)]  # ldxb 4*([0]&0xf): IP header length
    ins += [
        (ldh, 0, 0, 2),  # ldh: TCP destination port
        (0x35, 0, 6, lo),  # jge lo ? next : drop
        (0x25, 5, 0, hi),  # jgt hi ? drop : next
        (ldb, 0, 0, 13),  # ldb: TCP flags
        (0x45, 2, 0, TH_RST),  # jset RST ? accept : next
        (0x54, 0, 0, TH_SYN | TH_ACK),  # and SYN|ACK
        (0x15, 0, 1, TH_SYN | TH_ACK),  # jeq SYN|ACK ? accept : drop
        (0x06, 0, 0, 0xFFFF),  # accept
        (0x06, 0, 0, 0),  # drop
    ]
    return b"".join(struct.pack("HBBI", *i) for i in ins)


# The raw socket's receive buffer: a stalled loop (CPU load) must find every answer to the
# in-flight SYNs still queued (~770 bytes of skb truesize per RST or SYN-ACK on loopback and
# veth; 4 MiB holds ~5,000 of them against 1,024 in flight per shard). SO_RCVBUFFORCE (root)
# passes net.core.rmem_max; SO_RCVBUF is capped by it.
RCVBUF = 4 << 20


def set_rcvbuf(sock: socket.socket, size: int) -> None:
    for opt in (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
            return
        except OSError:
            continue


def _attach_filter(sock: socket.socket, prog: bytes) -> None:
    SO_ATTACH_FILTER = 26
    buf = ctypes.create_string_buffer(prog)
    fprog = struct.pack("HL", len(prog) // 8, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def _cores() -> int:
    """The cores this process may run on (its CPU affinity, where the OS has one)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


class SynProber:
    proto = "tcp"
    needs_raw = True
    BATCH = BATCH  # the sweep flushes (sendmmsg) when this many SYNs are queued
    # a thread for the sendmmsg calls (mmsg.Sender): None: where this process's shards leave a
    # core to spare (a mesh agent on two cores; not the shards of a scan, one per core)
    SEND_THREAD: bool | None = None

    def __init__(self, opts: ProbeOptions | None = None) -> None:
        self.opts = opts or ProbeOptions()
        shard = self.opts.shard
        self.loop: asyncio.AbstractEventLoop | None = None
        self.sock: socket.socket | None = None
        self._rx: rawrecv.RawIcmp | None = None
        # (dst, dport, sport) -> (future, t0, seq); the future is None for a batch attempt, seq
        # the SYN's cookie (kept: an answer is matched without hashing the key again)
        self._pending: dict[tuple[str, int, int], tuple[asyncio.Future | None, float, int]] = {}
        self._on_answer: Callable[[tuple[str, int, int], Outcome], None] | None = None
        self._deadlines = Deadlines(self._expire, self._drain)
        k, n = shard
        span = (SPORT_HI - SPORT_LO + 1) // n
        self._lo = SPORT_LO + k * span
        self._hi = self._lo + span - 1
        self._next = self._lo
        self._base: dict[str, int] = {}  # dst -> pseudo_sum(source, dst)
        self._fallback = None  # the connect prober, for IPv6
        # batch attempts (send()) go out BATCH at a time with sendmmsg, answers are read many
        # per recvmmsg (scanner.probes.mmsg), where libc has them
        self._tx: mmsg.SendBatch | None = None
        self._rxb: mmsg.RecvBatch | None = None
        self._queued: list[tuple[tuple[str, int, int], int]] = []  # (key, seq) per queued SYN
        # with two cores or more, a thread makes the sendmmsg calls (mmsg.Sender)
        self._sender: mmsg.Sender | None = None
        self._kept: socket.socket | None = None  # see close()
        self._first_t0 = 0.0  # send()'s t0 of the first SYN queued in _tx
        self._on_late: Callable[[list[tuple[str, int, int]], float], None] | None = None
        self.sent = 0  # SYNs that left (the caller's back-off: did any leave?)

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
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
        s.setblocking(False)
        set_rcvbuf(s, RCVBUF)
        with contextlib.suppress(OSError):
            _attach_filter(s, bpf_port_range(self._lo, self._hi))
        self.sock = s
        if mmsg.available():
            threaded = self.SEND_THREAD
            if threaded is None:  # a core to spare beside this process's shards
                threaded = _cores() > max(1, self.opts.shard[1])
            if threaded:
                self.BATCH = THREAD_BATCH
                self._sender = mmsg.Sender(s.fileno(), THREAD_BATCH, 32, _SYN.size, self._stamp)
                self._tx = self._sender.free()
            else:
                self._tx = mmsg.SendBatch(s.fileno(), BATCH, 32, _SYN.size)
            self._rxb = mmsg.RecvBatch(s.fileno(), RECV_BATCH, 128)
        loop.add_reader(s.fileno(), self._on_tcp)
        self._rx = rawrecv.acquire(loop, self._on_icmp)

    def close(self) -> None:
        self._queued.clear()
        if self._tx is not None:
            self._tx.queued = 0
        # a sending thread that did not end may still send on the socket: it is left open
        # (its descriptor never reused for another file), not closed
        keep = self._sender is not None and not self._sender.close()
        if self.sock is not None and self.loop is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.sock.fileno())
            if keep:
                self._kept = self.sock
            else:
                self.sock.close()
            self.sock = None
        if self._rx is not None:
            rawrecv.release(self._rx, self._on_icmp)
            self._rx = None
        self._deadlines.close()
        for entry in self._pending.values():
            fut = entry[0]
            if fut is not None and not fut.done():
                fut.set_result(None)
        self._pending.clear()
        if self._fallback is not None:
            self._fallback.close()

    # -- receiving ------------------------------------------------------------------------------
    def _drain(self) -> None:
        """Read every answer already queued (TCP and ICMP) before attempts are expired."""
        if self.sock is not None:
            self._on_tcp()
        if self._rx is not None:
            self._rx.drain()

    def _on_tcp(self) -> None:
        """Read until the socket is empty. No cap per callback: a capped reader falls behind
        a sweep for good under load (the rest waits a loop iteration, after the deadline
        sweep), and the queue is bounded by what we sent (the BPF filter admits nothing else)."""
        assert self.sock is not None
        if self._rxb is not None:
            self._on_tcp_batch(self._rxb)
            return
        recv = self.sock.recv
        answer = self._answer_at
        now = time.perf_counter()
        errors = 0
        while True:
            try:
                pkt = recv(128)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # a pending socket error (an ICMP error for one of our SYNs), consumed by
                # this call; never an endless loop
                errors += 1
                if errors > 64:
                    return
                continue
            answer(pkt, 0, len(pkt), now)

    def _on_tcp_batch(self, rb: mmsg.RecvBatch) -> None:
        """_on_tcp with recvmmsg: many answers per system call, parsed in place."""
        answer = self._answer_at
        mv = memoryview(rb.buf).cast("B")
        lens = rb.lens
        slot = rb.slot
        count = rb.count
        errors = 0
        while True:
            n = rb.read()
            if n <= 0:
                if n == 0:
                    return
                # a pending socket error (an ICMP error for one of our SYNs), consumed by
                # this call; never an endless loop
                errors += 1
                if errors > 64:
                    return
                continue
            now = time.perf_counter()
            for k in range(n):
                answer(mv, k * slot, lens[k * _LEN_STRIDE + _LEN_AT], now)
            if n < count:
                return  # the queue was empty when read

    def _answer_at(self, buf: bytes | memoryview, o: int, length: int, now: float) -> None:
        """The packet at ``buf[o : o + length]`` (IPv4 header, then TCP), if it answers one of
        our pending SYNs: matched by its addresses, ports and cookie, and delivered."""
        if length < 20:
            return
        ihl = (buf[o] & 0x0F) * 4
        if length < ihl + 14:
            return
        sport, dport, _seq, ack = _ANSWER.unpack_from(buf, o + ihl)
        key = (socket.inet_ntoa(buf[o + 12 : o + 16]), sport, dport)
        pending = self._pending
        entry = pending.get(key)
        if entry is None:
            return
        fut, t0, seq = entry
        if ack != (seq + 1) & 0xFFFFFFFF:
            return  # not an answer to our SYN (a stray or forged segment)
        flags = buf[o + ihl + 13]
        if flags & TH_RST:
            out = Outcome("closed", "reset", (now - t0) * 1000.0)
        elif flags & (TH_SYN | TH_ACK) == (TH_SYN | TH_ACK):
            out = Outcome("open", "syn-ack", (now - t0) * 1000.0)
        else:
            return  # the BPF filter admits nothing else
        del pending[key]
        if fut is None:
            self._on_answer(key, out)  # type: ignore[misc]
        elif not fut.done():
            fut.set_result(out)

    def _on_icmp(self, pkt: bytes, ihl: int, now_loop: float) -> None:
        """An ICMP unreachable quoting one of our SYNs."""
        icmp_type, code = pkt[ihl], pkt[ihl + 1]
        if icmp_type not in (classify.ICMP_DEST_UNREACH, classify.ICMP_TIME_EXCEEDED):
            return
        q = ihl + 8
        qihl = rawrecv.ip_header_len(pkt, q)
        if not qihl or pkt[q + 9] != socket.IPPROTO_TCP or len(pkt) < q + qihl + 8:
            return
        sport, dport, seq = struct.unpack_from("!HHI", pkt, q + qihl)
        key = (socket.inet_ntoa(pkt[q + 16 : q + 20]), dport, sport)
        entry = self._pending.get(key)
        if entry is None or seq != entry[2]:
            return
        fut, t0, _ = entry
        del self._pending[key]
        rtt = (time.perf_counter() - t0) * 1000.0
        out = Outcome("filtered", classify.icmp_reason(icmp_type, code), rtt)
        offender = socket.inet_ntoa(pkt[12:16])  # who sent the error: the host, or a router
        if offender != key[0]:
            out = classify.attribute(out, offender, key[0], local_address(offender))
        if fut is None:
            self._on_answer(key, out)  # type: ignore[misc]
        elif not fut.done():
            fut.set_result(out)

    def _expire(self, key: tuple[str, int, int], fut: asyncio.Future) -> None:
        self._pending.pop(key, None)
        fut.set_result(None)

    # -- sending ----------------------------------------------------------------------------
    def _source(self, dst: str) -> int:
        """pseudo_sum(our source address for dst, dst), cached per destination."""
        base = self._base.get(dst)
        if base is None:
            if self.opts.source:
                addr = self.opts.source
            else:
                # the address the routing table would use for dst (no packet is sent)
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                    u.connect((dst, 9))
                    addr = u.getsockname()[0]
            base = pseudo_sum(socket.inet_aton(addr), socket.inet_aton(dst))
            if len(self._base) > 65536:
                self._base.clear()
            self._base[dst] = base
        return base

    def _sport(self, dst: str, dport: int) -> int:
        p = self._next
        for _ in range(self._hi - self._lo + 1):
            p = p + 1 if p < self._hi else self._lo
            if (dst, dport, p) not in self._pending:
                break
        self._next = p
        return p

    async def probe(self, flow: Flow, timeout: float) -> Outcome:
        loop = self.loop
        sock = self.sock
        assert loop is not None and sock is not None, "start() first"
        dst, dport = flow.dst, flow.port
        if ":" in dst:
            return await self._connect(flow, timeout)
        try:
            base = self._source(dst)
        except OSError as e:
            return _ERR_OUTCOMES.get(e.errno or 0, Outcome("error", f"route-{e.errno}"))
        sport = self._sport(dst, dport)  # type: ignore[arg-type]
        key = (dst, dport, sport)
        seq = cookie(*key)  # type: ignore[arg-type]
        pkt = syn_packet(base, sport, dport, seq)  # type: ignore[arg-type]
        fut = loop.create_future()
        t0 = time.perf_counter()
        self._pending[key] = (fut, t0, seq)  # type: ignore[index]
        try:
            sock.sendto(pkt, (dst, 0))
        except OSError as e:
            self._pending.pop(key, None)  # type: ignore[arg-type]
            res = _RESOURCE.get(e.errno or 0)
            if res is not None:
                return Outcome("error", res)
            return _ERR_OUTCOMES.get(e.errno or 0, Outcome("error", f"send-{e.errno}"))
        self._deadlines.add(key, fut, t0, timeout, dst)
        out = await fut
        return _SILENT if out is None else out

    # -- the batch interface (scanner.engine.sweep): no future, timer or task per attempt ----
    def batch(
        self,
        on_answer: Callable[[tuple[str, int, int], Outcome], None],
        on_late: Callable[[list[tuple[str, int, int]], float], None] | None = None,
    ) -> None:
        """Deliver answers to attempts made with send() to ``on_answer(key, outcome)``; and
        ``on_late(keys, t)`` for queued SYNs whose sendmmsg call returned at ``t`` (they had
        left by then), more than LATE after the first of their batch was queued (the process
        or its sending thread was starved of CPU): their deadlines start then."""
        self._on_answer = on_answer
        self._on_late = on_late

    @property
    def unsent_since(self) -> float:
        """The send() t0 from which on a SYN may still be waiting for the sending thread (inf:
        none is). A deadline counts from when its SYN left, so an attempt with a t0 at or
        after this is not yet silent, whatever the clock says."""
        return self._sender.unsent_since if self._sender is not None else float("inf")

    @property
    def threaded(self) -> bool:
        """A thread of the probe's own makes the sendmmsg calls (mmsg.Sender)."""
        return self._sender is not None

    @property
    def sending(self) -> int:
        """Batches handed to the sending thread and not yet reaped (reap())."""
        return self._sender.outstanding if self._sender is not None else 0

    @staticmethod
    def batchable(flow: Flow) -> bool:
        """send() takes flows to an IPv4 address; the rest go through the engine's per-flow
        path: a host name is resolved there first, IPv6 is probed by connect."""
        try:
            socket.inet_pton(socket.AF_INET, flow.dst)
        except OSError:
            return False
        return True

    @property
    def queued(self) -> int:
        """SYNs from send() not yet sent: the caller calls flush() at ``BATCH`` (send() never
        queues more) and whenever it stops sending."""
        return len(self._queued)

    def flush(self) -> list[tuple[tuple[str, int, int], Outcome]]:
        """Send the queued SYNs (one sendmmsg per BATCH); the (key, outcome) of each that did
        not leave, as send() would have returned it. They become pending here, their RTTs
        starting when they are sent (_stamp). A batch's source ports follow one another, so
        none of them is taken by another queued SYN; send() checked them against those in
        flight.

        Where a thread sends, the batch is handed to it and this returns the SYNs that did not
        leave of the batches it has sent since (reap()); it waits for the oldest only when
        every batch is out."""
        queued = self._queued
        sender = self._sender
        if not queued:
            return self.reap() if sender is not None and sender.outstanding else []
        self._queued = []
        if sender is not None:
            # pending now (send() checks source ports against it); the thread stamps them
            # again just before it sends them: their RTTs start then
            self._stamp(queued)
            sender.submit(self._tx, self._first_t0, queued)  # type: ignore[arg-type]
            tx = sender.free()
            out = self._reaped(sender.reap(block=tx is None))
            self._tx = tx if tx is not None else sender.free()
            return out
        self._stamp(queued)
        failed = self._tx.flush()  # type: ignore[union-attr]
        return self._reaped([(self._first_t0, time.perf_counter(), failed, queued)])

    def reap(self) -> list[tuple[tuple[str, int, int], Outcome]]:
        """The SYNs that did not leave, of the batches the sending thread has sent since the
        last call (without waiting); [] where no thread sends."""
        if self._sender is None:
            return []
        return self._reaped(self._sender.reap())

    def _reaped(self, done: list) -> list[tuple[tuple[str, int, int], Outcome]]:
        out: list[tuple[tuple[str, int, int], Outcome]] = []
        pending = self._pending
        for t_queued, t_done, failed, queued in done:
            self.sent += len(queued) - len(failed)
            if failed:
                out += self._failed(queued, failed)
            if t_done - t_queued > LATE and self._on_late is not None:
                # sent late (the process, or its sending thread, starved of CPU): the deadlines
                # of its SYNs still in flight start when the call returned (all had left)
                late = [key for key, _ in queued if key in pending]
                if late:
                    self._on_late(late, t_done)
        return out

    def _stamp(self, queued: list[tuple[tuple[str, int, int], int]]) -> float:
        """Just before these SYNs are sent (in the sending thread, where there is one): they
        become pending with their RTTs starting now, which is returned."""
        t = time.perf_counter()
        pending = self._pending
        for key, seq in queued:
            pending[key] = (None, t, seq)
        return t

    def _failed(self, queued: list, failed: list) -> list[tuple[tuple[str, int, int], Outcome]]:
        pending = self._pending
        out = []
        for k, e in failed:
            key = queued[k][0]
            pending.pop(key, None)
            res = _RESOURCE.get(e)
            out.append(
                (key, Outcome("error", res) if res is not None
                 else _ERR_OUTCOMES.get(e, Outcome("error", f"send-{e}")))
            )  # fmt: skip
        return out

    def send(self, flow: Flow, t0: float) -> tuple[str, int, int] | Outcome:
        """One SYN for ``flow`` at ``t0`` (perf_counter, the RTT's start): the attempt's key
        (its answer comes to on_answer) or, when the packet could not be sent, the outcome
        (a resource error is for the caller to retry later, as the engine does for probe()).
        With sendmmsg the SYN is queued: ``flush()`` sends it and reports it if it fails."""
        dst, dport = flow.dst, flow.port
        base = self._base.get(dst)
        if base is None:
            try:
                base = self._source(dst)
            except OSError as e:
                return _ERR_OUTCOMES.get(e.errno or 0, Outcome("error", f"route-{e.errno}"))
        pending = self._pending
        sport = self._next + 1 if self._next < self._hi else self._lo
        key = (dst, dport, sport)
        if key in pending:  # rare: that source port is still in flight to this port
            sport = self._sport(dst, dport)  # type: ignore[arg-type]
            key = (dst, dport, sport)
        else:
            self._next = sport
        # syn_packet() and cookie() inlined: this is the per-SYN hot path
        seq = hash((dst, dport, sport, "portmesh-syn")) & 0xFFFFFFFF
        c = base + sport + dport + (seq >> 16) + (seq & 0xFFFF)  # type: ignore[operator]
        c = (c & 0xFFFF) + (c >> 16)
        c = (c & 0xFFFF) + (c >> 16)
        tx = self._tx
        if tx is not None:
            if tx.queued >= tx.size:
                raise RuntimeError("SynProber.send: flush() first (BATCH SYNs are queued)")
            if not tx.queued:
                self._first_t0 = t0
            _SYN.pack_into(
                tx.buf, tx.slot_for(dst), sport, dport, seq, 0, 6 << 4, TH_SYN, _WINDOW,
                ~c & 0xFFFF, 0, 2, 4, MSS,
            )  # fmt: skip
            self._queued.append((key, seq))  # type: ignore[arg-type]  # pending at flush()
            return key  # type: ignore[return-value]
        pending[key] = (None, t0, seq)  # type: ignore[index]
        pkt = _SYN.pack(sport, dport, seq, 0, 6 << 4, TH_SYN, _WINDOW, ~c & 0xFFFF, 0, 2, 4, MSS)
        try:
            self.sock.sendto(pkt, (dst, 0))  # type: ignore[union-attr]
        except OSError as e:
            del pending[key]  # type: ignore[arg-type]
            res = _RESOURCE.get(e.errno or 0)
            if res is not None:
                return Outcome("error", res)
            return _ERR_OUTCOMES.get(e.errno or 0, Outcome("error", f"send-{e.errno}"))
        return key  # type: ignore[return-value]

    def forget(self, key: tuple[str, int, int]) -> None:
        """A batch attempt timed out: a late answer to it is ignored."""
        self._pending.pop(key, None)

    def drain(self) -> None:
        self._drain()

    async def connect_prober(self):  # -> scanner.probes.tcp.TcpProber
        """The connect prober beside this one (same options: it reads the responder's token
        when there is a secret), started on first use: IPv6 flows and token samples."""
        if self._fallback is None:
            self._fallback = self._connect_class()(self.opts)
            self._fallback.timeout_for = self.timeout_for
            assert self.loop is not None
            await self._fallback.start(self.loop)
        return self._fallback

    @staticmethod
    def _connect_class() -> type[TcpProber]:  # syn6.py's is tcp6.Tcp6Prober
        return TcpProber

    async def _connect(self, flow: Flow, timeout: float) -> Outcome:
        return await (await self.connect_prober()).probe(flow, timeout)


def make_prober(opts: ProbeOptions | None = None) -> SynProber:
    return SynProber(opts)
