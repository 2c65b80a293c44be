"""Many packets per system call: ``sendmmsg(2)`` and ``recvmmsg(2)`` through ctypes (Linux).

Python's socket module has neither; one ``sendto``/``recv`` per packet costs a sweep a system
call's entry and exit, an argument parse and a bytes object per packet. The raw SYN sweep
(probes/syn.py) builds its SYNs straight into a ``SendBatch``'s buffer and sends up to
``size`` of them with one call; it reads the answers into a ``RecvBatch``'s buffer, many per
call. Issue 16 measured it: ~3 us less per flow in a minimal sweep loop (benchmarks/RESULTS.md).

Where libc has no sendmmsg/recvmmsg (not Linux, an old libc) ``available()`` is False and the
probe sends and reads one packet per call, as before. Nothing here raises on a send error: a
batch reports which packets did not leave and why (their errno), for the probe to turn into
outcomes, exactly as a failed ``sendto`` would have been.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import queue
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable

MSG_DONTWAIT = 0x40


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_void_p),
        ("namelen", ctypes.c_uint32),
        ("iov", ctypes.c_void_p),
        ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p),
        ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    ]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", _Msghdr), ("len", ctypes.c_uint)]


_LEN_AT = _Mmsghdr.len.offset  # type: ignore[attr-defined]
_STRIDE = ctypes.sizeof(_Mmsghdr)
LEN_STRIDE, LEN_AT = _STRIDE // 4, _LEN_AT // 4  # RecvBatch.lens: in 32-bit words


def _libc() -> tuple[object, object] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        send, recv = libc.sendmmsg, libc.recvmmsg
    except (OSError, AttributeError):
        return None
    send.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    send.restype = ctypes.c_int
    recv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    recv.restype = ctypes.c_int
    return send, recv


_FUNCS = _libc()


def available() -> bool:
    """Does this libc offer sendmmsg and recvmmsg?"""
    return _FUNCS is not None


def sockaddr_in(addr: str) -> ctypes.Array:
    """A struct sockaddr_in for an IPv4 literal, port 0 (a raw socket's destination)."""
    return ctypes.create_string_buffer(
        struct.pack("=HH4s8x", socket.AF_INET, 0, socket.inet_aton(addr)), 16
    )


def _vectors(count: int, slot: int, length: int) -> tuple[ctypes.Array, ctypes.Array, ctypes.Array]:
    """A buffer of ``count`` slots of ``slot`` bytes, and the mmsghdr array whose message k has
    one iovec: ``length`` bytes at slot k (the arrays point into each other: keep all three)."""
    buf = ctypes.create_string_buffer(count * slot)
    iov = (_Iovec * count)()
    msgs = (_Mmsghdr * count)()
    base = ctypes.addressof(buf)
    for k in range(count):
        iov[k].base = base + k * slot
        iov[k].len = length
        h = msgs[k].hdr
        h.iov = ctypes.addressof(iov[k])
        h.iovlen = 1
    return buf, iov, msgs


class SendBatch:
    """Up to ``size`` packets of at most ``slot`` bytes each, sent with one sendmmsg call.

    ``slot_for(dst)`` reserves the next packet's place and returns its offset in ``buf`` (the
    caller packs the packet there, e.g. ``struct.pack_into``; every packet is ``length`` bytes);
    ``flush()`` sends what is queued and returns ``[(index, errno), ...]`` for the packets that
    did not leave (index: the order of ``slot_for`` calls since the last flush)."""

    def __init__(self, fd: int, size: int = 64, slot: int = 64, length: int = 24) -> None:
        assert _FUNCS is not None, "available() first"
        self.fd = fd
        self.size = size
        self.slot = slot
        self.queued = 0
        self.buf, self._iov, self._msgs = _vectors(size, slot, length)
        self._at = ctypes.addressof(self._msgs)
        self._names: dict[str, ctypes.Array] = {}  # dst -> its sockaddr (kept alive here)
        self._slot_dst: list[str | None] = [None] * size  # the name each message points at
        for k in range(size):
            self._msgs[k].hdr.namelen = 16

    def slot_for(self, dst: str) -> int:
        k = self.queued
        if self._slot_dst[k] != dst:
            name = self._names.get(dst)
            if name is None:
                name = self._names[dst] = sockaddr_in(dst)
            self._msgs[k].hdr.name = ctypes.addressof(name)
            self._slot_dst[k] = dst
        self.queued = k + 1
        return k * self.slot

    def flush(self) -> list[tuple[int, int]]:
        n = self.queued
        self.queued = 0
        failed: list[tuple[int, int]] = []
        send = _FUNCS[0]  # type: ignore[index]
        i = 0
        while i < n:
            r = send(self.fd, self._at + i * _STRIDE, n - i, 0)  # type: ignore[operator]
            if r > 0:
                i += r
                continue
            e = ctypes.get_errno() or errno.EIO
            if e == errno.EINTR:
                continue
            failed.append((i, e))  # this message did not leave; the next ones are tried
            i += 1
        if len(self._names) > 4096:  # bounded; nothing is queued now, so none is in use
            self._names.clear()
            self._slot_dst = [None] * self.size
        return failed


class RecvBatch:
    """Read up to ``count`` packets (each cut to ``slot`` bytes) with one recvmmsg call:
    ``read()`` returns how many (0: none queued; -errno: a socket error, consumed), packet k is
    ``buf[k * slot : k * slot + length(k)]``."""

    def __init__(self, fd: int, count: int = 256, slot: int = 128) -> None:
        assert _FUNCS is not None, "available() first"
        self.fd = fd
        self.count = count
        self.slot = slot
        self.buf, self._iov, self._msgs = _vectors(count, slot, slot)
        self._at = ctypes.addressof(self._msgs)
        # msg_len of packet k: lens[k * LEN_STRIDE + LEN_AT] (native 32-bit words)
        self.lens = memoryview(self._msgs).cast("B").cast("I")

    def read(self) -> int:
        recv = _FUNCS[1]  # type: ignore[index]
        while True:
            n = recv(self.fd, self._at, self.count, MSG_DONTWAIT, None)  # type: ignore[operator]
            if n >= 0:
                return n
            e = ctypes.get_errno()
            if e == errno.EINTR:
                continue
            if e in (errno.EAGAIN, errno.EWOULDBLOCK):
                return 0
            return -(e or errno.EIO)

    def length(self, k: int) -> int:
        return self.lens[k * LEN_STRIDE + LEN_AT]


# batches per Sender: one being filled, the others with the thread
BUFFERS = 3


class Sender:
    """A thread that makes the sendmmsg calls, so that the caller fills one ``SendBatch``
    while the thread sends the ones handed to it, in order.

    ctypes lets go of the GIL for the call, and the call is where a raw sweep's kernel work
    is: on a lab pair, ~14 us per SYN, where the peer's stack, its SYN-ACK and our kernel's
    RST all run in the sender's system call. In the thread, that runs on another core beside
    the caller's Python (the plan, the bookkeeping, reading the answers).

    - ``free()``: an empty batch to fill, or None when every batch is out (then
      ``reap(block=True)`` waits, the GIL let go, for the oldest).
    - ``submit(batch, tag_t, tag)``: hand a filled batch to the thread; ``tag_t`` is when
      its first packet was queued, ``tag`` the caller's own. Just before it sends the batch,
      the thread calls ``stamp(tag)`` (with the GIL).
    - ``reap()``: the batches the thread has sent since, in order, as ``(tag_t, t_done,
      failed, tag)``: ``t_done`` when the call returned (every packet of the batch had left
      by then; the thread may be starved inside the call), ``failed`` what
      ``SendBatch.flush`` reports (the packets that did not leave, with their errno).
    - ``unsent_since``: the ``tag_t`` of the oldest batch not yet reaped (inf: none). A
      packet queued at or after it may not have left yet.
    - ``close()``: stop the thread; what it has not begun to send is not sent."""

    def __init__(
        self,
        fd: int,
        size: int,
        slot: int,
        length: int,
        stamp: Callable[[object], float],
        buffers: int = 0,
    ) -> None:
        assert _FUNCS is not None, "available() first"
        self._stamp = stamp
        n = max(2, buffers or BUFFERS)
        self._free = [SendBatch(fd, size, slot, length) for _ in range(n)]
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._out: deque[tuple[SendBatch, float, object]] = deque()  # submitted, not reaped
        self._tags: dict[int, object] = {}  # id(batch) -> its tag, while the thread has it
        self._thread = threading.Thread(target=self._run, name="sendmmsg", daemon=True)
        self._thread.start()
        self._closed = False

    def _run(self) -> None:
        jobs, done, stamp = self._jobs, self._done, self._stamp
        while True:
            batch = jobs.get()
            if batch is None:
                return
            n = batch.queued
            try:
                stamp(self._tags[id(batch)])
                failed = batch.flush()
            except Exception:  # noqa: BLE001 - never leave the caller waiting for a batch
                failed = [(k, errno.EIO) for k in range(n)]
                batch.queued = 0
            done.put((batch, time.perf_counter(), failed))

    @property
    def outstanding(self) -> int:
        return len(self._out)

    @property
    def unsent_since(self) -> float:
        return self._out[0][1] if self._out else float("inf")

    def submit(self, batch: SendBatch, tag_t: float, tag: object) -> None:
        self._out.append((batch, tag_t, tag))
        self._tags[id(batch)] = tag
        self._jobs.put(batch)

    def reap(self, block: bool = False) -> list[tuple[float, float, list, object]]:
        got = []
        done = self._done
        block = block and not self._closed  # a closed thread sends nothing more
        while self._out:
            try:
                batch, t, failed = done.get(block and not got)
            except queue.Empty:
                break
            b, tag_t, tag = self._out.popleft()
            assert b is batch, "batches come back in the order they went"
            del self._tags[id(batch)]
            self._free.append(batch)
            got.append((tag_t, t, failed, tag))
        return got

    def free(self) -> SendBatch | None:
        """An empty batch, or None when every batch is out (reap(block=True) first)."""
        return self._free.pop() if self._free else None

    def close(self) -> bool:
        """Stop the thread; False when it did not end within 5 s (starved of CPU): it may
        still make a call, so the caller must not close (and free for reuse) the socket."""
        if self._closed:
            return not self._thread.is_alive()
        self._closed = True
        try:  # batches not yet sent stay unsent (a stop: the attempts in them are reported)
            while True:
                self._jobs.get_nowait()
        except queue.Empty:
            pass
        self._jobs.put(None)
        self._thread.join(5.0)
        return not self._thread.is_alive()
