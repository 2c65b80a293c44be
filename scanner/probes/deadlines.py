"""One timer for all in-flight attempts of a prober: a heap of deadlines swept by one loop timer.

A per-attempt ``loop.call_later`` costs a timer handle per flow; this costs a heap push. Each
attempt's limit is re-read from the engine's ``timeout_for(dst)`` while it waits, so the first
wave of probes to a host (started with the initial --timeout, before any RTT sample) expires
as soon as the host's adaptive timeout says so.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable

# How often a waiting attempt re-reads its destination's current timeout (seconds).
RECHECK = 0.02
# The sweep never runs more often than this.
TICK = 0.005


class Deadlines:
    def __init__(
        self,
        on_expire: Callable[[int, asyncio.Future], None],
        drain: Callable[[], None] | None = None,
    ) -> None:
        """``on_expire(key, fut)`` runs for an attempt whose time is up (fut not yet done).

        ``drain()`` runs before any attempt is expired: it must read every answer already
        queued on the prober's sockets. uvloop (like asyncio) runs due timers before it polls
        for I/O, so after a stall (CPU load) the sweep would otherwise expire attempts whose
        answer is sitting in a socket queue (issue 19: 10 false `filtered` in a full sweep of
        127.0.0.1 beside two busy loops).
        """
        self.on_expire = on_expire
        self.drain = drain
        self.loop: asyncio.AbstractEventLoop | None = None
        self.timeout_for: Callable[[str], float] | None = None
        self._heap: list[tuple[float, int, object, asyncio.Future, float, float, str]] = []
        self._seq = 0
        self._timer: asyncio.TimerHandle | None = None

    def add(self, key: object, fut: asyncio.Future, t0: float, timeout: float, dst: str) -> None:
        """Expire ``fut`` ``timeout`` seconds after ``t0`` (perf_counter), or sooner."""
        self._seq += 1
        deadline = t0 + (timeout if timeout < RECHECK else RECHECK)
        heapq.heappush(self._heap, (deadline, self._seq, key, fut, t0, timeout, dst))
        if self._timer is None and self.loop is not None:
            self._timer = self.loop.call_later(max(deadline - t0, TICK), self._tick)

    def _tick(self) -> None:
        self._timer = None
        heap = self._heap
        now = time.perf_counter()
        timeout_for = self.timeout_for
        if heap and heap[0][0] <= now and self.drain is not None:
            self.drain()
        while heap and heap[0][0] <= now:
            _, seq, key, fut, t0, timeout, dst = heapq.heappop(heap)
            if fut.done():
                continue
            limit = timeout if timeout_for is None else min(timeout, timeout_for(dst))
            if now - t0 >= limit:
                self.on_expire(key, fut)  # type: ignore[arg-type]
            else:
                heapq.heappush(
                    heap, (min(t0 + limit, now + RECHECK), seq, key, fut, t0, timeout, dst)
                )
        if heap and self.loop is not None:
            self._timer = self.loop.call_later(max(heap[0][0] - now, TICK), self._tick)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._heap.clear()
