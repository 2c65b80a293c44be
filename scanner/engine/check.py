"""`check`: the planned flows whose source is this host, probed, each with a verdict.

The library side of `portmesh check`: plan (pure, lazy) -> engine -> NDJSON with ``req`` and
``verdict`` per result, plus a human summary of the failures grouped by requirement and
destination on stderr.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

from scanner.core.flows import req_label
from scanner.core.model import natural_key
from scanner.core.ports import ports_text
from scanner.core.results import Result
from scanner.core.verdicts import verdict
from scanner.engine.engine import EngineConfig
from scanner.engine.output import NdjsonOutput
from scanner.engine.runner import RunSpec, run
from scanner.plan.planner import count_plan, legs, plan, plan_meta


@dataclass
class CheckConfig:
    catalog: Any
    site: Any
    selection: Any  # scanner.plan.selection.Selection, with sources = {this host}
    host: str  # the inventory name of this host
    engine: EngineConfig = field(default_factory=EngineConfig)
    output: NdjsonOutput | None = None
    expect: str = "reachable"
    only: frozenset[str] | None = None
    progress: bool = False
    argv: list[str] = field(default_factory=list)
    loop: str = "uvloop"
    workers: int | None = None
    summary_to: TextIO | None = None  # the human summary (stderr by default)
    emit: str = "all"  # or "failures": passing flows in tally records (scanner.core.tally)


class TokenWatch:
    """Did any TCP answer carry our responder's token? Fed every result record (check: the
    records written; mesh: the agents' lines). When responders were expected and TCP answers
    came back (syn-ack) but not one with the token, the responders most likely hold another
    secret - and then every UDP probe they ignore reads as a firewall's drop. Results are
    streamed, so the run's UDP verdicts stay as they are: ``warning`` says it on stderr."""

    __slots__ = ("token", "synack")

    def __init__(self) -> None:
        self.token = 0
        self.synack = 0

    def __call__(self, rec: dict[str, Any]) -> None:
        r = rec.get("reason")
        if r == "responder":  # a token (TCP) or a tagged reply (UDP): the secrets match
            self.token += 1
        elif r == "syn-ack":
            self.synack += 1

    def warning(self, who: str) -> str | None:
        if self.token or not self.synack:
            return None
        return (
            f"{who}: warning: responders were expected but not one of {self.synack} TCP "
            "answers carried their token (syn-ack only): the responders likely use another "
            "secret (--secret/--secret-file), so their UDP ports stay silent and fail falsely\n"
        )


class Failures:
    """Failed flows (and flows to a host name that does not resolve here, which are unknown)
    grouped by (requirement, destination, proto, state, reason) -> ports.

    Memory is bounded by requirements x destinations; ports are kept per group (a NodePort
    sweep has at most one range of them per destination).
    """

    def __init__(self) -> None:
        self.groups: dict[tuple, list[int]] = defaultdict(list)
        self.verdicts: dict[str, int] = {"pass": 0, "fail": 0, "unknown": 0}

    def __call__(self, rec: dict[str, Any]) -> None:
        v = rec.get("verdict") or "unknown"
        self.verdicts[v] = self.verdicts.get(v, 0) + 1
        if v == "fail" or (v == "unknown" and rec["reason"] == "unresolved"):
            key = (
                req_label(rec.get("req") or "-", rec.get("af")),  # "calico.vxlan over IPv6"
                rec.get("host") or rec["dst"],
                rec["dst"],
                rec["proto"],
                rec["state"],
                rec["reason"],
            )
            port = rec.get("port")
            self.groups[key].append(port if port is not None else -1)

    def with_tallied(self, tallied: int) -> dict[str, int]:
        """The verdict counts, with the passing flows that --emit failures only counted."""
        return {**self.verdicts, "pass": self.verdicts.get("pass", 0) + tallied}

    def lines(self) -> list[str]:
        out = []
        def key(item: tuple) -> tuple:
            req, host, dst, proto, state, reason = item[0]
            return (natural_key(req), natural_key(str(host)), str(dst), proto, state, reason)

        for (req, host, dst, proto, state, reason), ports in sorted(self.groups.items(), key=key):
            where = host if host == dst else f"{host} ({dst})"
            what = proto if ports == [-1] else f"{proto}/{ports_text(p for p in ports if p >= 0)}"
            word = "FAIL" if reason != "unresolved" else "UNKNOWN"  # a name that does not resolve
            out.append(f"{word} {req:<28} {what:<22} -> {where}: {state} ({reason})")
        return out


def route_sources(dsts: Iterable[str], bind: str | None = None) -> dict[str, str | None]:
    """destination -> the local address the kernel sends to it from (a UDP socket's connect()
    asks the routing table and sends nothing); ``bind`` (--source) when given; None when there
    is no route (the probes will say so)."""
    out: dict[str, str | None] = {}
    for dst in dsts:
        try:
            fam = socket.AF_INET6 if ipaddress.ip_address(dst).version == 6 else socket.AF_INET
        except ValueError:
            out[dst] = None
            continue
        try:
            with socket.socket(fam, socket.SOCK_DGRAM) as s:
                if bind:
                    s.bind((bind, 0))
                s.connect((dst, 9))
                out[dst] = str(ipaddress.ip_address(s.getsockname()[0]))
        except OSError:
            out[dst] = None
    return out


def run_check(cfg: CheckConfig) -> int:
    """Run the check; exit code 0 all pass, 1 any fail, 130 interrupted."""
    responder = cfg.engine.probe_options.secret is not None
    expect = cfg.expect
    err = cfg.summary_to or sys.stderr
    live_legs = [leg for leg in legs(cfg.catalog, cfg.site, cfg.selection) if leg.count()]
    # src is the address the packets really leave from (the kernel's routing decision, or
    # --source), not the inventory address of --from: run from another machine they differ
    real = route_sources(
        {addr for leg in live_legs for _, addr in leg.dsts if addr is not None},
        cfg.engine.probe_options.source,
    )
    inventory_srcs = {a for leg in live_legs for _, a in leg.srcs if a is not None}
    moved = {  # (a destination that is a local address, such as a VIP here, is no mismatch)
        src for dst, src in real.items() if src is not None and src not in inventory_srcs | {dst}
    }
    if inventory_srcs and moved:
        said = ", ".join(sorted(inventory_srcs))
        err.write(
            f"portmesh check: warning: packets leave from {', '.join(sorted(moved))}, not from "
            f"{cfg.host}'s inventory address {said}: this machine is not {cfg.host}, or it "
            "routes to some destinations through another of its addresses; results record the "
            "address they left from\n"
        )

    def annotate(r: Result) -> None:
        f = r.flow
        r.verdict = verdict(f.proto, r.state, expect, responder)
        src = real.get(f.dst)
        if src is not None and src != f.src:
            r.extra = {**r.extra, "src": src} if r.extra else {"src": src}

    failures = Failures()
    tokens = TokenWatch()

    def watched(rec: dict[str, Any]) -> None:
        failures(rec)
        tokens(rec)

    planned = count_plan(cfg.catalog, cfg.site, cfg.selection)
    protos = {leg.req.proto for leg in live_legs}
    cfg.engine = dataclasses.replace(cfg.engine, protos=tuple(sorted(protos)))
    meta = plan_meta(cfg.catalog, cfg.site, cfg.selection)
    spec = RunSpec(
        flows=plan(cfg.catalog, cfg.site, cfg.selection),
        planned=planned,
        engine=cfg.engine,
        argv=cfg.argv,
        output=cfg.output or NdjsonOutput(),
        annotate=annotate,
        only=cfg.only,
        progress=cfg.progress,
        start_extra={
            "check": {"host": cfg.host, "expect": expect, "responder": responder},
            "plan": meta,
        },
        summary_extra=lambda s: {"verdicts": failures.with_tallied(s.tallied)},
        loop=cfg.loop,
        workers=cfg.workers,
        on_record=watched,
        emit=cfg.emit,
    )
    outcome = run(spec)
    v = failures.with_tallied(outcome.stats.tallied)
    err.write(
        f"portmesh check from {cfg.host}: {planned} flows, {v.get('pass', 0)} pass, "
        f"{v.get('fail', 0)} fail, {v.get('unknown', 0)} unknown ({outcome.elapsed:.2f}s)\n"
    )
    for line in failures.lines():
        err.write(line + "\n")
    warn = tokens.warning("portmesh check") if responder else None
    if warn:
        err.write(warn)
    err.flush()
    if outcome.interrupted:
        return 130
    return 1 if v.get("fail", 0) else 0
