"""`scan`: targets x ports -> flows -> engine -> NDJSON. The library side of `portmesh scan`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TextIO

from scanner.engine.engine import EngineConfig
from scanner.engine.output import NdjsonOutput
from scanner.engine.runner import RunSpec, run
from scanner.plan.targets import Target, count_flows, iter_flows


@dataclass
class ScanConfig:
    targets: list[Target]
    ports: list[tuple[str, int]]
    engine: EngineConfig = field(default_factory=EngineConfig)
    output: NdjsonOutput | None = None
    extra: tuple[str, ...] = ()  # port-less protocols: "icmp", "ipip"
    only: frozenset[str] | None = None
    progress: bool = False
    argv: list[str] = field(default_factory=list)
    loop: str = "uvloop"
    workers: int | None = None
    # -o FILE at a terminal (the lines go to the file only): one summary line here, and where
    # the lines went
    summary_to: TextIO | None = None
    summary_file: str | None = None


def run_scan(cfg: ScanConfig) -> int:
    """Run the scan; return the exit code (0 completed, 130 interrupted)."""
    planned = count_flows(cfg.targets, cfg.ports, len(cfg.extra))

    protos = tuple(dict.fromkeys([*(p for p, _ in cfg.ports), *cfg.extra]))
    cfg.engine = dataclasses.replace(cfg.engine, protos=protos)
    spec = RunSpec(
        flows=iter_flows(cfg.targets, cfg.ports, cfg.extra),
        planned=planned,
        engine=cfg.engine,
        argv=cfg.argv,
        output=cfg.output or NdjsonOutput(),
        only=cfg.only,
        progress=cfg.progress,
        loop=cfg.loop,
        workers=cfg.workers,
    )
    outcome = run(spec)
    if cfg.summary_to is not None:
        cfg.summary_to.write(summary_line(outcome.summary, cfg.summary_file))
    return 130 if outcome.interrupted else 0


def summary_line(summary: dict[str, Any], path: str | None) -> str:
    """``portmesh scan: 7/7 flows: 3 open, 4 closed (0.12s); NDJSON in FILE``."""
    from scanner.core.results import STATES

    states = summary.get("states") or {}
    order = [s for s in STATES if s in states] + [s for s in states if s not in STATES]
    counts = ", ".join(f"{states[s]} {s}" for s in order) or "none"
    more = ", interrupted" if summary.get("interrupted") else ""
    where = f"; NDJSON in {path}" if path else ""
    return (
        f"portmesh scan: {summary.get('results', 0)}/{summary.get('planned', 0)} flows: "
        f"{counts} ({summary.get('elapsed_s', 0):.2f}s{more}){where}\n"
    )
