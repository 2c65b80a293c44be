"""Shard processes: one event loop per core, each probing every n-th flow of the same plan
(UDP flows by destination instead: see ``process.shard_flows``).

A TCP connect sweep is CPU-bound on one core (the kernel's work for the far end of a veth
runs in the prober's context too), so a large plan is split across forked shard processes.
Each shard streams complete NDJSON lines to the parent through a pipe and sends its counters
on a second pipe when it is done; the parent writes the start record, forwards the lines
(never a partial one), merges the counters and writes the one summary.

Shards sit in their own process group, so a terminal's Ctrl-C reaches only the parent, which
forwards it once per press: the first press is the graceful stop, the second the hard one.
If the parent dies, a shard's next write fails with EPIPE and the shard stops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import os
import selectors
import signal
import sys
import time
import traceback

import orjson

from scanner.core.privileges import raise_nofile
from scanner.core.results import start_record
from scanner.core.tally import Tallies
from scanner.engine.engine import Stats
from scanner.engine.output import NdjsonOutput
from scanner.engine.process import SHARD_SIGNALS, RunOutcome, _progress, run_shard, write_summary


def _shard_spec(spec, k: int, n: int):
    e = spec.engine

    def share(v):
        return None if v is None else max(1, math.ceil(v / n))

    eng = dataclasses.replace(
        e,
        probe_options=dataclasses.replace(e.probe_options, shard=(k, n)),
        concurrency=share(e.concurrency) if e.concurrency else None,
        rate=None if e.rate is None else e.rate / n,
        max_per_host=share(e.max_per_host),
    )
    # --only is applied by the parent, which must see every line for on_record
    return dataclasses.replace(spec, engine=eng, progress=False, only=None)


def run_sharded(spec, n: int):
    out: NdjsonOutput = spec.output
    # import before forking what every shard needs, so each does not pay for it again
    raise_nofile()
    if spec.loop == "uvloop":
        with contextlib.suppress(ImportError):
            # lazy: uvloop is optional and costs ~80 ms (measured); only --loop uvloop pays
            import uvloop  # noqa: F401
    for proto in ("tcp",):
        importlib.import_module(f"scanner.probes.{proto}")

    # Ctrl-C between here and the handler below must not be lost nor kill a half-started
    # shard: block it; the parent unblocks once `forward` is installed, a shard once its
    # event loop's handlers are (process._run).
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SHARD_SIGNALS)
    out.record(start_record(spec.scan_id, spec.argv, spec.planned, **spec.start_extra))
    out.flush()
    t0 = time.perf_counter()
    sys.stdout.flush()
    sys.stderr.flush()
    children: list[tuple[int, int, int]] = []  # (pid, data fd, stats fd)
    for k in range(n):
        r_data, w_data = os.pipe()
        r_stat, w_stat = os.pipe()
        pid = os.fork()
        if pid == 0:  # the shard
            code = 0
            try:
                os.setpgid(0, 0)
                os.close(r_data)
                os.close(r_stat)
                for _, d, s in children:
                    os.close(d)
                    os.close(s)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                child = _shard_spec(spec, k, n)
                child.output = NdjsonOutput(stdout=False, fd=w_data)
                stats = run_shard(child, k, n)
                d = dataclasses.asdict(stats)
                d["concurrency"] = getattr(stats, "concurrency", 0)
                os.write(w_stat, orjson.dumps(d))
            except BaseException:  # noqa: BLE001 - a shard must never unwind into the parent's code
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        os.close(w_data)
        os.close(w_stat)
        children.append((pid, r_data, r_stat))

    presses = 0
    told_quiet = False

    def quiet_stop() -> None:
        nonlocal told_quiet
        if not told_quiet:
            told_quiet = True
            for pid, _, _ in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGUSR1)

    def forward(signum: int, _frame: object) -> None:
        nonlocal presses
        presses += 1
        if presses == 1:
            sys.stderr.write(
                "\nportmesh: interrupted: finishing in-flight probes (Ctrl-C again to quit now)\n"
            )
        for pid, _, _ in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)

    old_int = signal.signal(signal.SIGINT, forward)
    old_term = signal.signal(signal.SIGTERM, forward)
    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    sel = selectors.DefaultSelector()
    bufs: dict[int, bytearray] = {}
    stats_raw: dict[int, bytearray] = {}
    for _, d, s in children:
        sel.register(d, selectors.EVENT_READ, "data")
        sel.register(s, selectors.EVENT_READ, "stats")
        bufs[d] = bytearray()
        stats_raw[s] = bytearray()
    open_fds = 2 * n
    lines = 0
    last_progress = 0.0
    on_record = spec.on_record
    only = spec.only
    loads = orjson.loads
    try:
        while open_fds:
            for key, _ in sel.select(timeout=0.2):
                fd = key.fd
                try:
                    chunk = os.read(fd, 1 << 17)
                except InterruptedError:
                    continue
                if not chunk:
                    sel.unregister(fd)
                    os.close(fd)
                    open_fds -= 1
                    continue
                if key.data == "stats":
                    stats_raw[fd] += chunk
                    continue
                buf = bufs[fd]
                buf += chunk
                cut = buf.rfind(b"\n")
                if cut >= 0:
                    data = bytes(buf[: cut + 1])
                    del buf[: cut + 1]
                    lines += data.count(b"\n")
                    if on_record is not None or only is not None:
                        data = _filter(data, on_record, only, loads)
                    if data:
                        out.write_raw(data)
                    if out.dead:
                        quiet_stop()
            if spec.progress:
                now = time.perf_counter()
                if now - last_progress > 0.2:
                    last_progress = now
                    _progress(lines, spec.planned, now - t0)
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
        for pid, _, _ in children:
            os.waitpid(pid, 0)
    elapsed = time.perf_counter() - t0
    if spec.progress:
        _progress(lines, spec.planned, elapsed)
        sys.stderr.write("\n")
    total = Stats()
    merged = Tallies()
    concurrency = 0
    for raw in stats_raw.values():
        if not raw:
            sys.stderr.write("portmesh: a shard process failed; its results may be incomplete\n")
            continue
        d = orjson.loads(bytes(raw))
        concurrency += d.pop("concurrency", 0)
        total.results += d["results"]
        for k, v in d["states"].items():
            total.states[k] = total.states.get(k, 0) + v
        total.attempts += d["attempts"]
        total.retries += d["retries"]
        total.late_answers += d["late_answers"]
        total.answered += d["answered"]
        for k, v in d["backoffs"].items():
            total.backoffs[k] = total.backoffs.get(k, 0) + v
        for k, v in d["skipped"].items():
            total.skipped[k] = total.skipped.get(k, 0) + v
        total.interrupted = total.interrupted or d["interrupted"]
        for af, method in (d.get("tcp_methods") or {}).items():
            total.note_tcp_method(af, method)
        if d.get("tallies"):
            for rec in d["tallies"]:
                merged.merge(rec)
        if d.get("neighbour"):
            total.neighbour = merge_neighbour(total.neighbour, d["neighbour"])
        if d.get("fd_limited"):
            lim = tuple(d["fd_limited"])
            total.fd_limited = lim if total.fd_limited is None else min(total.fd_limited, lim)  # type: ignore[assignment]
    total.tallied = merged.flows
    for rec in merged.records(spec.scan_id):
        out.record(rec)
    summary = write_summary(spec, total, elapsed, concurrency, n)
    return RunOutcome(total, elapsed, total.interrupted, summary)


def merge_neighbour(a: dict | None, b: dict) -> dict:
    """Two shards' neighbour-guard reports: counts add up, the kernel's counter does not."""
    if a is None:
        return dict(b)
    out = dict(a)
    for k in ("retried", "waited", "unknown"):
        out[k] = a.get(k, 0) + b.get(k, 0)
    if a.get("unresolved_retried") or b.get("unresolved_retried"):
        out["unresolved_retried"] = a.get("unresolved_retried", 0) + b.get("unresolved_retried", 0)
    for k in ("limit", "limit_end"):
        out[k] = {f: a.get(k, {}).get(f, 0) + v for f, v in b.get(k, {}).items()}
    out["table_fulls"] = {
        f: max(a.get("table_fulls", {}).get(f, 0), v) for f, v in b.get("table_fulls", {}).items()
    }
    return out


def _filter(data: bytes, on_record, only, loads) -> bytes:
    """Call on_record on every line; keep the lines --only asks for."""
    keep: list[bytes] = []
    for line in data.splitlines(keepends=True):
        rec = loads(line)
        if on_record is not None:
            on_record(rec)
        if only is None or rec.get("state") in only or rec.get("verdict") in only:
            keep.append(line)
    return b"".join(keep)
