"""One process's run: flows through the engine to NDJSON. The one place that owns the event
loop, signals, batching, progress and the start/summary records. ``scanner.engine.runner``
decides between this (one process) and ``scanner.engine.shards`` (forked shards, each of which
runs ``run_shard`` from here); both sit above this module, so neither imports the other.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol
from zlib import crc32

from scanner.core.flows import Flow
from scanner.core.results import (
    Result,
    encode_results,
    new_scan_id,
    result_dict,
    start_record,
    summary_record,
)
from scanner.core.tally import Tallies
from scanner.engine.engine import Engine, EngineConfig, Stats
from scanner.engine.neigh import advice
from scanner.engine.output import NdjsonOutput

SHARD_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1}
BATCH = 512  # results per write; a flush also happens every FLUSH_INTERVAL seconds
FLUSH_INTERVAL = 0.2


@dataclass
class RunSpec:
    flows: Iterator[Flow]
    planned: int
    engine: EngineConfig
    argv: list[str]
    output: NdjsonOutput
    annotate: Callable[[Result], None] | None = None  # e.g. check's verdict
    only: frozenset[str] | None = None  # print only these states (counts cover everything)
    progress: bool = False
    start_extra: dict[str, Any] = field(default_factory=dict)
    summary_extra: Callable[[Stats], dict[str, Any]] | None = None
    scan_id: str = field(default_factory=new_scan_id)
    loop: str = "uvloop"  # or "asyncio"
    # sees every result record as the dict that is written (after annotate, before --only);
    # in sharded runs the parent calls it on the parsed lines it forwards
    on_record: Callable[[dict[str, Any]], None] | None = None
    workers: int | None = None  # shard processes; None = default_workers(planned)
    # "failures": a passing flow (verdict pass) is counted in a tally record instead of
    # written (scanner.core.tally); on_record sees only the lines that are written
    emit: str = "all"
    # a mesh agent's passing results under emit "all" (scanner.mesh.wire.PassBlocks): added
    # here instead of written one by one; ``take()`` is written when ``add`` says the block
    # is full and at every flush. Only with workers=1, on_record None and only None
    passes: PassSink | None = None


class PassSink(Protocol):
    def add(self, r: Result) -> bool: ...

    def take(self) -> bytes: ...


@dataclass
class RunOutcome:
    stats: Stats
    elapsed: float
    interrupted: bool
    summary: dict[str, Any]


def new_loop(kind: str = "uvloop") -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        try:
            # lazy: uvloop is optional, and `--loop asyncio` must not load it (~8 ms after
            # asyncio, measured; tests/test_scan_cli.py checks a small scan imports none)
            import uvloop

            return uvloop.new_event_loop()
        except ImportError:
            sys.stderr.write("portmesh: uvloop is not available; using asyncio's event loop\n")
    return asyncio.new_event_loop()


def run_loop(kind: str, coro: Any) -> None:
    """``asyncio.run`` on the loop ``--loop`` names (``new_loop``; asyncio.Runner's
    loop_factory needs Python 3.11). The mesh coordinator runs on it: uvloop's transports read
    1,000 agents' pipes for less CPU than asyncio's own."""
    loop = new_loop(kind)
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(coro)
    finally:
        try:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def run_single(spec: RunSpec) -> RunOutcome:
    """The whole run in this process's own event loop."""
    loop = new_loop(spec.loop)
    try:
        return loop.run_until_complete(_run(spec))
    finally:
        loop.close()


# Protocols whose prober paces attempts per destination (UdpProber.per_host_pps: a far kernel
# sends ~1 ICMP error per second to us). The pacing state lives in each shard's engine, so if
# shards shared a destination's flows, N shards would send N times the rate it answers and its
# closed ports would go silent. All flows of such a protocol to one destination go to one shard.
PACED_PER_DESTINATION = frozenset({"udp"})


def shard_flows(flows: Iterator[Flow], index: int, count: int) -> Iterator[Flow]:
    """The flows of shard ``index`` (of ``count``): a paced protocol's flows
    (PACED_PER_DESTINATION) go to the shard of their destination (crc32 of the address), the
    others are dealt round-robin. Each flow is in exactly one shard, in the plan's order."""
    paced = PACED_PER_DESTINATION
    home: dict[str, int] = {}  # destination -> its shard (bounded: cleared when large)
    dealt = 0  # flows dealt round-robin so far
    for flow in flows:
        if flow.proto in paced:
            k = home.get(flow.dst)
            if k is None:
                if len(home) >= 65536:
                    home.clear()
                k = home[flow.dst] = crc32(flow.dst.encode()) % count
            if k == index:
                yield flow
        else:
            if dealt % count == index:
                yield flow
            dealt += 1


def run_shard(spec: RunSpec, index: int, count: int) -> Stats:
    """In a shard process: probe this shard's flows (``shard_flows``); no start/summary."""
    spec.flows = shard_flows(spec.flows, index, count)
    loop = new_loop(spec.loop)
    try:
        return loop.run_until_complete(_run(spec, shard=True)).stats
    finally:
        loop.close()


async def _run(spec: RunSpec, shard: bool = False) -> RunOutcome:
    loop = asyncio.get_running_loop()
    out = spec.output
    scan_id = spec.scan_id
    pending: list[Result] = []
    only = spec.only
    annotate = spec.annotate
    on_record = None if shard else spec.on_record
    tallies = Tallies() if spec.emit == "failures" else None
    passes = spec.passes if tallies is None else None
    if passes is not None and (shard or only is not None or on_record is not None):
        raise ValueError("RunSpec.passes needs one process, no --only and no on_record")

    def flush() -> None:
        if pending:
            out.write(encode_results(pending, scan_id))
            pending.clear()
        if passes is not None:
            block = passes.take()
            if block:
                out.write(block)
        out.flush()

    def emit(r: Result) -> None:
        if annotate is not None:
            annotate(r)
        if tallies is not None and r.verdict == "pass":
            f = r.flow
            tallies.add(f.src_host, f.src, f.host, f.dst, f.req, f.proto, f.port, r.state, f.af)
            return
        if passes is not None and r.verdict == "pass":
            if passes.add(r):
                out.write(passes.take())
            return
        if on_record is not None:
            on_record(result_dict(r, scan_id))
        if only is None or r.state in only or (r.verdict is not None and r.verdict in only):
            pending.append(r)
            if len(pending) >= BATCH:
                out.write(encode_results(pending, scan_id))
                pending.clear()

    engine = Engine(spec.engine, emit, should_stop=lambda: out.dead)
    interrupts = 0

    def on_sigint() -> None:
        nonlocal interrupts
        interrupts += 1
        engine.stop()
        if interrupts == 1 and not shard:  # a shard's parent has said it already
            sys.stderr.write(
                "\nportmesh: interrupted: finishing in-flight probes (Ctrl-C again to quit now)\n"
            )
        else:
            # second Ctrl-C: stop waiting; complete lines only, then the summary
            for t in asyncio.all_tasks(loop):
                if t is not asyncio.current_task(loop):
                    t.cancel()

    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_sigint)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    if shard:
        # the parent's quiet stop (its stdout went away), then let through the signals the
        # parent blocked around fork() (see scanner.engine.shards): they reach the handlers above
        loop.add_signal_handler(signal.SIGUSR1, engine.stop, False)
        installed.append(signal.SIGUSR1)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SHARD_SIGNALS)

    if not shard:
        out.record(start_record(scan_id, spec.argv, spec.planned, **spec.start_extra))
        out.flush()
    t0 = time.perf_counter()

    async def ticker() -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            flush()
            if spec.progress and not shard:
                _progress(engine.stats.results, spec.planned, time.perf_counter() - t0)

    tick = loop.create_task(ticker())
    run_task = loop.create_task(engine.run(spec.flows))
    try:
        stats = await run_task
    except asyncio.CancelledError:
        stats = engine.stats
        _fill_interrupted(engine, spec.flows)
    finally:
        tick.cancel()
        if shard:
            # late signals stay pending until the shard exits, never a KeyboardInterrupt
            signal.pthread_sigmask(signal.SIG_BLOCK, SHARD_SIGNALS)
        for sig in installed:
            loop.remove_signal_handler(sig)
    elapsed = time.perf_counter() - t0
    if tallies is not None:
        stats.tallied = tallies.flows
    if shard:
        flush()
        if tallies is not None:
            stats.tallies = list(tallies.records(scan_id))  # merged by the parent
        out.close()
        stats.concurrency = engine.concurrency  # type: ignore[attr-defined]
        return RunOutcome(stats, elapsed, stats.interrupted, {})
    if spec.progress:
        _progress(stats.results, spec.planned, elapsed)
        sys.stderr.write("\n")
    flush()
    if tallies is not None:
        for rec in tallies.records(scan_id):
            out.record(rec)
    summary = write_summary(spec, stats, elapsed, engine.concurrency, 1)
    return RunOutcome(stats, elapsed, stats.interrupted, summary)


def write_summary(
    spec: RunSpec, stats: Stats, elapsed: float, concurrency: int, workers: int
) -> dict[str, Any]:
    """The one summary record of a run (single process or merged shards)."""
    extra: dict[str, Any] = {
        "attempts": stats.attempts,
        "retries": stats.retries,
        "loss_observed": round(stats.loss(), 4),
        "concurrency": concurrency,
        "workers": workers,
    }
    if stats.backoffs:
        extra["backoffs"] = stats.backoffs
    if stats.skipped:
        extra["skipped"] = stats.skipped
    if stats.interrupted:
        extra["interrupted"] = True
    if stats.tcp_method:
        extra["tcp_method"] = stats.tcp_method
        extra["tcp_methods"] = stats.tcp_methods
    if stats.fd_limited:
        asked, allowed = stats.fd_limited
        extra["fd_limited"] = {"asked": asked, "allowed": allowed}
        sys.stderr.write(
            f"portmesh: the file-descriptor limit allowed {allowed} probes in flight per process "
            f"(asked {asked}); raise it with `ulimit -n` for more\n"
        )
    if stats.neighbour:
        extra["neighbour"] = stats.neighbour
        if stats.neighbour.get("unknown"):
            sys.stderr.write(neighbour_advice(stats.neighbour))
    if spec.emit == "failures":
        extra["emit"] = "failures"
        extra["tallied"] = stats.tallied
    if spec.summary_extra is not None:
        extra.update(spec.summary_extra(stats))
    summary = summary_record(
        spec.scan_id,
        spec.planned,
        stats.results - stats.tallied,  # lines written: results + tallied == planned
        dict(stats.states),
        elapsed,
        **extra,
    )
    spec.output.record(summary)
    spec.output.close()
    return summary


def neighbour_advice(nb: dict[str, Any]) -> str:
    """The one stderr line for flows given up on because the neighbour table was full."""
    fams = {int(f) for f, n in (nb.get("table_fulls") or {}).items() if n} or {4}
    th = {int(f): v for f, v in (nb.get("gc_thresh3") or {}).items()}
    return advice(th, fams, int(nb.get("unknown", 0)))


def _fill_interrupted(engine: Engine, flows: Iterator[Flow]) -> None:
    """After a hard stop, every flow without a result still gets one (error/interrupted)."""
    # In-flight flows were cancelled mid-attempt; the engine lost track of which ones, so the
    # count tells how many: results so far + the rest of the generator must equal planned.
    now = time.time()
    for flow in flows:
        engine._emit(Result(flow, "error", "interrupted", None, 0, now))


def _progress(done: int, total: int, elapsed: float) -> None:
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else float("inf")
    pct = 100.0 * done / total if total else 100.0
    eta_s = f"{eta:5.1f}s" if eta != float("inf") else "  -  "
    sys.stderr.write(f"\r{done}/{total} ({pct:5.1f}%)  {rate:8.0f} flows/s  ETA {eta_s}  ")
    sys.stderr.flush()
