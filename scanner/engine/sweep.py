"""The batch sweep: stateless probes (raw SYN) without a coroutine, a future or a timer per flow.

The worker pool (engine.py) runs one coroutine per flow in flight, a future per attempt and a
deadline per attempt: about a third of a raw SYN sweep's profile samples went there, a tenth
to waking the futures alone (benchmarks/RESULTS.md, py-spy). A stateless probe needs none of
it: this lane pulls flows from the plan, sends one
packet per attempt from the probe's template (``prober.send``), reads the answers in the
probe's socket callback (``on_answer``), and expires silent attempts from a deadline wheel
(slots of TICK seconds, swept by one timer that first drains the probe's sockets). Results are
emitted in the order of answer. A flow the probe cannot batch (an IPv6 destination, another
protocol in a mixed plan) runs as one task through the engine's per-flow path, inside the same
window.

Everything the worker pool guarantees holds: the same retries (engine._retries_allowed: the
prior, then the observed loss), adaptive timeouts per destination (re-read when an attempt's
slot comes due), the per-destination cap, the global rate, back-off on resource errors, the
graceful and the hard stop, exactly one result per flow. Memory is O(window): the in-flight
attempts, the wheel's entries for them, flows parked behind a per-host cap.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from scanner.core.flows import Flow
from scanner.core.results import Result
from scanner.engine.neigh import PAUSES as NEIGH_PAUSES
from scanner.engine.neigh import REASON as NEIGH_FULL
from scanner.engine.neigh import RETRIES as NEIGH_RETRIES
from scanner.probes.base import Outcome

# Deadline wheel granularity (s). The adaptive timeouts are >= 50 ms (EngineConfig.min_timeout),
# so an attempt expires at most 10% late; the probe's sockets are drained before each sweep.
TICK = 0.005
# SYNs sent per loop callback before the loop gets to read answers: 256 SYNs are ~2 ms of
# sendto() (~7 us each on loopback, cProfile), so answers are read (and RTTs taken) without a
# long stall.
SEND_BATCH = 256


class _Attempt:
    __slots__ = ("flow", "hs", "t0", "limit", "attempts", "counted", "mark", "nhits", "settled")

    def __init__(self, flow: Flow, hs: Any) -> None:  # hs: engine.HostState
        self.flow = flow
        self.hs = hs
        self.t0 = 0.0
        self.limit = 0.0  # the timeout it was sent with
        self.attempts = 0  # attempts that went out (as engine._attempts counts them)
        self.counted = False  # in hs.retrying
        self.mark = 0  # the neighbour table's overflow counter when the attempt left
        self.nhits = 0  # attempts a neighbour-table overflow may have eaten
        self.settled = False  # had its one attempt sent before the neighbour entry resolved


class Sweep:
    def __init__(self, engine: Any, prober: Any, window: int) -> None:
        """engine: the scanner.engine.engine.Engine running this lane (not imported: it imports
        this module); prober: a probe with the batch interface (see usable())."""
        self.engine = engine
        self.prober = prober
        self.window = max(1, window)
        self.loop = asyncio.get_running_loop()
        self.inflight: dict[object, _Attempt] = {}  # the probe's key -> attempt
        self.tasks = 0  # flows running through the per-flow path
        self.noted = False  # tcp_method reported
        self.neigh_wait: set[_Attempt] = set()  # pausing after a neighbour-table overflow
        # destination -> silent attempts waiting for its neighbour entry to settle (one task
        # per destination, not per flow: NeighGuard.settle)
        self.settling: dict[str, list[_Attempt]] = {}
        self.parked: dict[str, deque[Flow]] = {}  # per-host cap reached: waiting flows
        self.nparked = 0
        self.resend: deque[_Attempt] = deque()  # silent attempts due for a retry
        self.wheel: dict[int, list[tuple[object, float]]] = {}
        self.cursor = int(time.perf_counter() / TICK)
        self.timer: asyncio.TimerHandle | None = None
        self.fill_handle: asyncio.Handle | None = None
        self.backoff = 0  # consecutive resource errors from send()
        self.paused_until = 0.0
        self.flows: Iterator[Flow] | None = None
        self.exhausted = False
        self.ended = False  # run() has returned or raised
        self.done: asyncio.Future | None = None
        self.batchable = prober.batchable
        # the probe queues its packets and sends them many per system call (flush)
        self.batched = hasattr(prober, "flush")
        self.flush_at = getattr(prober, "BATCH", 1)
        # a thread sends the probe's batches (SynProber.unsent_since): their failures come
        # back later (reap), and a SYN still waiting for the thread is not silent yet
        self.threaded = self.batched and prober.threaded
        self.limits: dict[Any, float] = {}  # host -> its timeout, within one fill
        self.sent_seen = 0  # the probe's count of SYNs that left, when last looked at
        self.dst_ok: dict[str, bool] = {}  # destination -> batchable (by address alone)
        self.token_sample = engine.cfg.token_sample > 0
        self.cap = engine.cfg.max_per_host

    # -- the run ---------------------------------------------------------------------------
    async def run(self, flows: Iterator[Flow]) -> None:
        self.flows = flows
        self.done = self.loop.create_future()
        if self.batched:
            self.prober.batch(self._answer, self._late)
        else:
            self.prober.batch(self._answer)
        try:
            self._fill()
            await self.done
        except asyncio.CancelledError:
            # the hard stop: every flow in flight still gets its one line (tasks say their own)
            self._interrupt_all()
            raise
        finally:
            # over: a callback still to come (a per-flow task's end, a neighbour pause, a
            # settle) must not send again after the engine closes the probe
            self.ended = True
            for h in (self.timer, self.fill_handle):
                if h is not None:
                    h.cancel()

    def _busy(self) -> int:
        return (
            len(self.inflight) + self.tasks + self.nparked + len(self.resend) + len(self.neigh_wait)
        )

    def _finish_if_idle(self) -> None:
        if self.exhausted and not self._busy() and self.done is not None and not self.done.done():
            self.done.set_result(None)

    def _schedule_fill(self, delay: float = 0.0) -> None:
        if self.fill_handle is not None or self.ended:
            return
        if delay > 0:
            self.fill_handle = self.loop.call_later(delay, self._fill)
        else:
            self.fill_handle = self.loop.call_soon(self._fill)

    def _fill(self) -> None:
        """Send retries, then new flows, while the window has room (SEND_BATCH per call)."""
        self.fill_handle = None
        if self.ended:
            return
        self._reap()
        now = time.perf_counter()
        if now < self.paused_until:
            self._schedule_fill(self.paused_until - now)
        else:
            self._send_some()
            if self.batched and self.prober.queued:
                self._flush()
        self._arm()
        self._finish_if_idle()

    def _send_some(self) -> None:
        eng = self.engine
        self.limits.clear()  # timeouts move with the answers read since the last fill
        rate = eng.cfg.rate
        resend = self.resend
        budget = SEND_BATCH
        while resend and budget:
            a = resend.popleft()
            if eng.stopping:
                # a graceful stop: no more retries; a flow waiting for one was cut short (and a
                # parked flow never went out): interrupted, not its last silence
                self._final(a, _INTERRUPTED)
                continue
            if rate and self._rate_wait():
                resend.appendleft(a)
                return
            if not self._send(a):
                return
            budget -= 1
        if self.exhausted:
            return
        if eng.stopping or eng._check_stop():
            self.exhausted = True
            return
        # each new flow takes at most one place in the window (in flight, parked or a task)
        room = min(budget, self.window - self._busy())
        flows, start = self.flows, self._start
        for _ in range(room):
            if rate and self._rate_wait():
                return
            flow = next(flows, None)  # type: ignore[call-overload]
            if flow is None:
                self.exhausted = True
                return
            if not start(flow):
                return
        if room == budget:
            self._schedule_fill()  # more to send: after the loop has read what came back

    def _rate_wait(self) -> bool:
        """Take a send slot of --rate; False when it is now, else schedule the fill at it."""
        eng = self.engine
        now = self.loop.time()
        t = eng._next_slot if eng._next_slot > now else now
        if t > now:
            self._schedule_fill(t - now)
            return True
        eng._next_slot = t + 1.0 / eng.cfg.rate  # type: ignore[operator]
        return False

    def _start(self, flow: Flow) -> bool:
        """The first attempt of a new flow; False when sending must pause."""
        ok = self.dst_ok.get(flow.dst)
        if ok is None:  # batchable() parses the address: once per destination, not per flow
            if len(self.dst_ok) >= 65536:
                self.dst_ok.clear()
            ok = self.dst_ok[flow.dst] = self.batchable(flow)
        if flow.proto != "tcp" or not ok:
            self._task(flow, None)  # another protocol, or IPv6: the per-flow path
            return True
        eng = self.engine
        if not self.noted:  # the summary's tcp_method: IPv4 TCP went by raw SYN (token
            self.noted = True  # samples, a connect each, are part of that method)
            eng.stats.note_tcp_method("ipv4", "syn")
        if self.token_sample and eng._token_due(flow):
            self._task(flow, self.prober.connect_prober())
            return True
        hs = eng.hosts.get(flow.dst) or eng._host(flow.dst)
        cap = self.cap
        if cap and hs.inflight >= cap:
            q = self.parked.get(flow.dst)
            if q is None:
                q = self.parked[flow.dst] = deque()
            q.append(flow)
            self.nparked += 1
            return True
        hs.inflight += 1
        return self._send(_Attempt(flow, hs))

    def _task(self, flow: Flow, prober: Any) -> None:
        """A flow the batch cannot carry: the engine's per-flow path, in the window."""
        self.tasks += 1
        self.loop.create_task(self._per_flow(flow, prober))

    async def _per_flow(self, flow: Flow, prober: Any) -> None:
        eng = self.engine
        try:
            if prober is not None:
                prober = await prober  # the connect prober's start (a token sample)
            r = await eng._probe_flow(flow, prober)
        except asyncio.CancelledError:
            eng._emit(Result(flow, "error", "interrupted", None, 0))
            raise
        finally:
            self.tasks -= 1
        eng._emit(r)
        self._unpark(flow.dst)
        self._schedule_fill()

    def _send(self, a: _Attempt) -> bool:
        """One attempt of ``a``; False when sending must pause (a resource error)."""
        st = self.engine.stats
        t0 = time.perf_counter()
        r = self.prober.send(a.flow, t0)
        st.attempts += 1
        if isinstance(r, Outcome):
            if r.state == "error" and r.reason in _RESOURCE:
                return self._back_off([(a, r)])
            a.attempts += 1
            self._final(a, r)
            return True
        a.attempts += 1
        a.t0 = t0
        hs = a.hs
        guard = self.engine.neigh
        if guard is not None and hs.fam:
            a.mark = guard.mark(hs.fam)
        self.inflight[r] = a
        limit = self.limits.get(hs)
        if limit is None:
            limit = self.limits[hs] = hs.timeout(self.engine.cfg)
        a.limit = limit
        slot = int((t0 + limit) / TICK) + 1
        w = self.wheel.get(slot)
        if w is None:
            self.wheel[slot] = [(r, t0)]
        else:
            w.append((r, t0))
        if self.batched:
            queued = self.prober.queued
            if queued >= self.flush_at:
                return self._flush()
            if queued:
                return True  # not sent yet: _flush says whether it left
        self.backoff = 0  # it left (one sendto: the probe has no sendmmsg here)
        return True

    def _flush(self) -> bool:
        """Send what the probe has queued; its packets that did not leave are handled as
        _send handles a failed send. False when sending must pause (a resource error).

        The back-off counts as with one sendto per packet: a packet that left resets it, and a
        batch the kernel refused (part of) is one back-off, not one per refused packet (else
        a buffer that fills on every batch while SYNs still leave gave flows up in ~4 batches)."""
        return self._sent(self.prober.flush())

    def _reap(self) -> None:
        """The batches the probe's thread has sent since: their SYNs that did not leave."""
        if self.threaded and self.prober.sending:
            self._sent(self.prober.reap())

    def _sent(self, failed: list[tuple[object, Outcome]]) -> bool:
        """The SYNs of flushed batches that did not leave (flush(), or reap() of the batches
        the probe's thread sent since); False when sending must pause."""
        sent = self.prober.sent
        if sent != self.sent_seen:
            self.sent_seen = sent
            self.backoff = 0  # SYNs left
        if not failed:
            return True
        back: list[tuple[_Attempt, Outcome]] = []
        for key, out in failed:
            a = self.inflight.pop(key, None)
            if a is None:
                continue
            if out.state == "error" and out.reason in _RESOURCE:
                a.attempts -= 1  # it never left (as _send counts a resource error)
                back.append((a, out))
            else:
                self._final(a, out)
        if not back:
            return True
        return self._back_off(back)

    def _back_off(self, back: list[tuple[_Attempt, Outcome]]) -> bool:
        """Attempts the socket refused for want of resources (its send queue is full): the
        engine's back-off, for the whole lane, and they go out again first after the pause;
        after 200 back-offs in a row with not one packet out, the first is given up. False
        when sending must pause."""
        st = self.engine.stats
        reason = back[0][1].reason
        st.backoffs[reason] = st.backoffs.get(reason, 0) + 1
        self.backoff += 1
        if self.backoff > 200:
            a, out = back.pop(0)
            self._final(a, out)
            self.backoff = 0
            if not back:
                return True
        self.resend.extendleft(reversed([a for a, _ in back]))
        pause = min(0.005 * self.backoff, 0.2)
        self.paused_until = time.perf_counter() + pause
        self._schedule_fill(pause)
        return False

    # -- answers and deadlines -------------------------------------------------------------
    def _answer(self, key: object, out: Outcome) -> None:
        a = self.inflight.pop(key, None)
        if a is None:
            return
        eng = self.engine
        st = eng.stats
        hs = a.hs
        if out.state == "filtered":
            hs.note_icmp()  # UDP pacing must know this host's ICMP allowance is being spent
        if out.rtt_ms is not None:
            hs.update(out.rtt_ms / 1000.0)
            hs.answered += 1
            st.answered += 1
            if a.attempts > 1 or out.resent:
                hs.late += 1
                st.late_answers += 1
        eng._emit(
            Result(
                a.flow, out.state, out.reason, out.rtt_ms, a.attempts, time.time(), None, out.extra
            )
        )
        self._release(a)
        self._schedule_fill()

    def _late(self, keys: list[object], t: float) -> None:
        """These attempts' SYNs were sent late, by ``t``: their deadlines start then (the wheel
        entry of the old start is skipped: its t0 no longer matches). Never in a slot the tick
        has swept already: the loop ticks on while the probe's thread sends, and a deadline
        already past there was never expired (no line for the flow, no end to the run)."""
        inflight, wheel, cursor = self.inflight, self.wheel, self.cursor
        for key in keys:
            a = inflight.get(key)
            if a is None or a.t0 >= t:
                continue
            a.t0 = t
            slot = max(int((t + a.limit) / TICK) + 1, cursor)
            w = wheel.get(slot)
            if w is None:
                wheel[slot] = [(key, t)]
            else:
                w.append((key, t))

    def _arm(self) -> None:
        if self.timer is None and self.inflight:
            self.timer = self.loop.call_later(TICK, self._tick)

    def _tick(self) -> None:
        self.timer = None
        if self.ended:
            return
        now = time.perf_counter()
        upto = int(now / TICK)
        wheel = self.wheel
        self._reap()  # may restamp late attempts (_late)
        if self.cursor <= upto and any(s in wheel for s in range(self.cursor, upto + 1)):
            # answers already queued are answers, not timeouts (uvloop runs timers before I/O)
            self.prober.drain()
            now = time.perf_counter()
        unsent = self.prober.unsent_since if self.threaded else _NEVER
        eng = self.engine
        cfg = eng.cfg
        inflight = self.inflight
        expired = False
        for s in range(self.cursor, upto + 1):
            entries = wheel.pop(s, None)
            if not entries:
                continue
            for key, t0 in entries:
                a = inflight.get(key)
                if a is None or a.t0 != t0:
                    continue  # answered, or re-sent since
                limit = a.hs.timeout(cfg)
                if t0 >= unsent:  # its SYN may not have left yet (the probe's thread)
                    wheel.setdefault(upto + 1, []).append((key, t0))
                    continue
                if now - t0 < limit:
                    slot = int((t0 + limit) / TICK) + 1  # its host's timeout grew: later
                    wheel.setdefault(max(slot, upto + 1), []).append((key, t0))
                    continue
                del inflight[key]
                self.prober.forget(key)
                self._silent(a)
                expired = True
        self.cursor = upto + 1
        if expired:
            self._fill()
        self._arm()
        self._finish_if_idle()

    def _silent(self, a: _Attempt) -> None:
        eng = self.engine
        hs = a.hs
        guard = eng.neigh
        if guard is not None and hs.fam and guard.hit(hs.fam, a.mark, "filtered", "", True):
            # the neighbour table overflowed while this SYN was out: it may never have left
            # the host, so its silence proves nothing (as in engine._attempts). Try again after
            # a pause; in the end unknown, never fail.
            a.attempts -= 1
            if a.nhits >= NEIGH_RETRIES or eng.stopping:
                guard.unknown += 1
                self._final(a, Outcome("error", NEIGH_FULL))
                return
            pause = NEIGH_PAUSES[a.nhits]
            a.nhits += 1
            self.neigh_wait.add(a)

            def again() -> None:
                if a in self.neigh_wait:  # else a hard stop reported it already
                    self.neigh_wait.discard(a)
                    self.resend.append(a)
                    self._fill()

            self.loop.call_later(pause, again)
            return
        if guard is not None and hs.fam and not a.settled and guard.suspect(hs, a.t0, a.limit):
            self._settle(a)
            return
        self._counted(a)

    def _settle(self, a: _Attempt) -> None:
        """A silent SYN sent before its destination's neighbour entry was seen resolved: wait
        for the kernel to resolve it (or give up), then decide (as engine._attempts does)."""
        hs = a.hs
        if hs.l2_at is not None:
            self._settled_one(a)
            return
        dst = a.flow.dst
        waiting = self.settling.get(dst)
        self.neigh_wait.add(a)
        if waiting is not None:
            waiting.append(a)
            return
        self.settling[dst] = [a]
        task = self.loop.create_task(self.engine.neigh.settle(hs, dst))

        def done(t: asyncio.Task) -> None:
            for w in self.settling.pop(dst, ()):
                if w in self.neigh_wait:  # else a hard stop reported it already
                    self.neigh_wait.discard(w)
                    if t.cancelled() or t.exception() is not None:
                        self._counted(w)
                    else:
                        self._settled_one(w)
            self._fill()

        task.add_done_callback(done)

    def _settled_one(self, a: _Attempt) -> None:
        hs = a.hs
        if self.engine.neigh.cut(hs, a.t0, a.limit):
            # it may have left after its deadline, or never: once more, not counted
            a.settled = True
            a.attempts -= 1
            self.engine.neigh.settled += 1
            self.resend.append(a)
            return
        self._counted(a)

    def _counted(self, a: _Attempt) -> None:
        """A silent attempt that counts: a retry while allowed, else the flow's result."""
        eng = self.engine
        hs = a.hs
        if a.attempts <= eng._retries_allowed(hs, a.flow.proto):
            if eng.stopping:
                self._final(a, _INTERRUPTED)  # retries cut short: no result yet
                return
            eng.stats.retries += 1
            if a.attempts == 1:
                hs.retrying += 1
                a.counted = True
            self.resend.append(a)
            return
        self._final(a, _SILENT)

    def _final(self, a: _Attempt, out: Outcome) -> None:
        self.engine._emit(
            Result(a.flow, out.state, out.reason, None, a.attempts, time.time(), None, out.extra)
        )
        self._release(a)

    def _release(self, a: _Attempt) -> None:
        hs = a.hs
        if a.counted:
            hs.retrying -= 1
            a.counted = False
        hs.inflight -= 1
        if hs.waiters:  # a per-flow task waiting for the per-host cap
            w = hs.waiters.pop(0)
            if not w.done():
                w.set_result(None)
        if self.nparked:
            self._unpark(a.flow.dst)

    def _unpark(self, dst: str) -> None:
        """A slot of dst's per-host cap is free: its next parked flow goes out."""
        q = self.parked.get(dst)
        if not q:
            return
        hs = self.engine._host(dst)
        cap = self.engine.cfg.max_per_host
        if cap and hs.inflight >= cap:
            return
        self.nparked -= 1
        flow = q.popleft()
        if not q:
            del self.parked[dst]
        hs.inflight += 1
        self.resend.append(_Attempt(flow, hs))
        self._schedule_fill()

    def _interrupt_all(self) -> None:
        eng = self.engine
        # as the worker pool does: an interrupted flow reports attempts 0 (no outcome counted)
        for a in list(self.inflight.values()) + list(self.resend) + list(self.neigh_wait):
            eng._emit(Result(a.flow, "error", "interrupted", None, 0))
        self.inflight.clear()
        self.resend.clear()
        self.neigh_wait.clear()
        for q in self.parked.values():
            for flow in q:
                eng._emit(Result(flow, "error", "interrupted", None, 0))
        self.parked.clear()
        self.nparked = 0


_SILENT = Outcome("filtered", "no-response", None, True)
_NEVER = float("inf")
_INTERRUPTED = Outcome("error", "interrupted")
_RESOURCE = frozenset({"fd-exhausted", "no-buffers", "ephemeral-exhausted"})


def usable(prober) -> bool:
    """The probe offers the batch interface (send / batch / drain / forget / batchable)."""
    return all(hasattr(prober, m) for m in ("send", "batch", "drain", "forget", "batchable"))
