"""`scan`: targets x ports -> flows -> engine -> NDJSON. The library side of `portmesh scan`."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field

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
    if spec.output.file_only:
        # -o FILE at a terminal: the screen got no line, so it gets the summary's counts
        s = outcome.summary
        states = ", ".join(f"{n} {k}" for k, n in s.get("states", {}).items())
        sys.stderr.write(
            f"portmesh scan: {s.get('results')}/{s.get('planned')} flows: {states or 'none'}"
            f" ({outcome.elapsed:.2f}s); NDJSON in {spec.output.file_only}\n"
        )
        sys.stderr.flush()
    return 130 if outcome.interrupted else 0
