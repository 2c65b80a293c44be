"""``run(spec)``: the entry every command uses (scan, check, mesh agents). It runs the flows in
this process (``scanner.engine.process``) or in forked shards (``scanner.engine.shards``).
"""

from __future__ import annotations

import os

from scanner.engine.process import RunOutcome, RunSpec, run_single
from scanner.engine.shards import run_sharded

__all__ = ["RunOutcome", "RunSpec", "default_workers", "run"]


def default_workers(planned: int) -> int:
    """Shard processes for a run: one per core (at most 4) once the plan is big enough.

    One process spends ~40 us of CPU per TCP flow on this lab (half in the kernel: the veth
    peer's SYN handling runs in our context), so a 2,768-port sweep is CPU-bound on one core;
    a second shard halves that. Below ~1,000 flows the fork is not worth it.
    """
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    if planned < 1000 or cores < 2:
        return 1
    return min(cores, 4)


def run(spec: RunSpec) -> RunOutcome:
    workers = spec.workers if spec.workers is not None else default_workers(spec.planned)
    if workers > 1:
        return run_sharded(spec, workers)
    return run_single(spec)
