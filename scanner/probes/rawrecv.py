"""ICMP helpers shared by the udp, icmp and ipip probes: reason words, packet parsing, and one
raw ICMPv4 receiver per event loop that dispatches every packet to the probers subscribed to it.

A raw ``IPPROTO_ICMP`` socket receives a copy of every ICMP packet the host gets (with its IP
header). The icmp prober sends its echo requests through the same socket; the ipip prober only
listens on it for protocol unreachables quoting its packets. Subscribers match replies exactly
(identifier + sequence + nonce, or the quoted header); nothing is guessed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

from scanner.probes.base import Outcome, clock_ns, enable_rx_stamps, receipt_ns, rtt_ms
from scanner.probes.classify import errno_outcome

ICMP_ECHO_REPLY = 0
ICMP_ECHO = 8


def ip_header_len(pkt: bytes | memoryview, off: int = 0) -> int:
    """The IPv4 header length at ``off``, or 0 when it is not a plausible IPv4 header."""
    if len(pkt) < off + 20 or pkt[off] >> 4 != 4:
        return 0
    ihl = (pkt[off] & 0x0F) * 4
    return ihl if ihl >= 20 and len(pkt) >= off + ihl else 0


# A subscriber gets (packet with its IPv4 header, ip header length, receipt time: receipt_ns()).
Handler = Callable[[bytes, int, int], None]


class RawIcmp:
    """A raw ICMPv4 socket registered once with the loop; packets go to every subscriber."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self.sock.setblocking(False)
        # Bursts of thousands of replies must not overflow the default ~200 KiB buffer.
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        enable_rx_stamps(self.sock)
        self.handlers: list[Handler] = []
        self.users = 0
        loop.add_reader(self.sock.fileno(), self._readable)

    def drain(self) -> None:
        """Read until the socket is empty (a prober about to expire attempts: their answers
        may be queued, see probes/deadlines.py)."""
        self._readable(1 << 20)

    def _readable(self, cap: int = 256) -> None:
        recvmsg = self.sock.recvmsg
        for _ in range(cap):  # drain, but give the loop back now and then
            try:
                pkt, anc, _, _ = recvmsg(65535, 64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # a pending socket error (see send_to), consumed by this call
            now = receipt_ns(anc)
            ihl = ip_header_len(pkt)
            if not ihl or len(pkt) < ihl + 8:
                continue
            for h in self.handlers:
                h(pkt, ihl, now)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


_shared: dict[int, RawIcmp] = {}


def acquire(loop: asyncio.AbstractEventLoop, handler: Handler) -> RawIcmp:
    """The loop's shared raw ICMP receiver (opened on first use), with ``handler`` subscribed.

    Raises PermissionError without CAP_NET_RAW.
    """
    rx = _shared.get(id(loop))
    if rx is None or rx.loop is not loop or rx.sock.fileno() < 0:
        rx = _shared[id(loop)] = RawIcmp(loop)
    rx.handlers.append(handler)
    rx.users += 1
    return rx


def release(rx: RawIcmp, handler: Handler) -> None:
    with contextlib.suppress(ValueError):
        rx.handlers.remove(handler)
    rx.users -= 1
    if rx.users <= 0:
        rx.close()
        if _shared.get(id(rx.loop)) is rx:
            del _shared[id(rx.loop)]


def send_to(sock: socket.socket, data: bytes, addr: tuple) -> None:
    """sendto() that does not report an earlier packet's ICMP error as this packet's failure.

    A raw or ICMP datagram socket shared by many probes gets ``sk_err`` set when an ICMP error
    with a "fatal" code (admin-prohibited, protocol unreachable, ...) quotes ANY packet it sent;
    the next sendto() then fails with that errno (EHOSTUNREACH, ENOPROTOOPT, ...) and clears
    it, without sending. The error itself is matched by the receiver; here it is just retried.
    A genuine local error (no route) repeats every time and is raised.
    """
    for _ in range(3):
        try:
            sock.sendto(data, addr)
            return
        except (BlockingIOError, InterruptedError):
            raise
        except OSError as e:
            err = e
    raise err


# ---- one request, one reply: shared by the icmp and ipip probers ----------------------------


def next_free_seq(pending: dict, dst: str, seq: int) -> int | None:
    """The next 16-bit sequence after ``seq`` with no request in flight to ``dst``."""
    for _ in range(65536):
        seq = (seq + 1) & 0xFFFF
        if (dst, seq) not in pending:
            return seq
    return None


async def send_and_wait(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    data: bytes,
    addr: tuple,
    pending: dict,
    key: tuple,
    tag: bytes,
    timeout: float,
    silence: object,
) -> object:
    """Send ``data`` and wait for ``resolve`` to answer ``key`` (or ``silence`` at the timeout).

    ``pending[key] = (future, tag, send time in clock_ns())`` while it waits; a send error is an
    outcome.
    """
    fut = loop.create_future()
    pending[key] = (fut, tag, clock_ns())
    try:
        send_to(sock, data, addr)
    except OSError as e:
        del pending[key]
        return errno_outcome(e)
    timer = loop.call_later(timeout, _expire, pending, key, fut, silence)
    try:
        return await fut
    finally:
        timer.cancel()
        if pending.get(key, (None,))[0] is fut:
            del pending[key]


def _expire(pending: dict, key: tuple, fut: asyncio.Future, silence: object) -> None:
    if pending.get(key, (None,))[0] is fut:
        del pending[key]
    if not fut.done():
        fut.set_result(silence)


def resolve(pending: dict, key: tuple, now: int, outcome: object, echoed: bytes | None) -> None:
    """Answer the request waiting on ``key`` with ``outcome`` (an Outcome; its rtt is set here,
    from ``now``: the receipt's clock_ns()).

    ``echoed``: the payload that came back, when the reply quotes or echoes one; it must start
    with the request's tag, else the reply is stale or someone else's and is ignored.
    """
    entry = pending.get(key)
    if entry is None:
        return
    fut, tag, t0 = entry
    if echoed is not None and echoed[: len(tag)] != tag:
        return
    del pending[key]
    if not fut.done():
        assert isinstance(outcome, Outcome)
        rtt = rtt_ms(t0, now)
        fut.set_result(Outcome(outcome.state, outcome.reason, rtt, extra=outcome.extra))
