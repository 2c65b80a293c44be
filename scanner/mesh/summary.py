"""What a mesh says at the end: verdict counts and the run as ``portmesh report`` prints it.

``Matrix`` counts verdicts as results stream in and keeps what the report's grouping of
faults needs (failing and undecided results as they come; the passes are read back from the
pair join once, at the end: ``fold``). ``human`` writes the totals line and the report's text
of the run on stderr; ``progress`` the one-line progress.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import Any, TextIO

from scanner.engine.process import neighbour_advice
from scanner.mesh.pairs import _is_v6
from scanner.plan.planner import legs
from scanner.report.aggregate import IPV6_SUFFIX, Aggregate
from scanner.report.text import render_run


class Matrix:
    """Verdict counts, and what the human summary needs (bounded: hosts^2 x requirements).

    The summary is the text of ``portmesh report`` (scanner.report): the same grouping into
    faults ("node11 drops tcp/10250 from every peer", one-way lines) and the same matrix. A
    failing or undecided result is folded into the report's Aggregate as it comes (rare). A
    passing one only counts a verdict: its direction's passes are in the pair join already
    (``folded``), read back from there once at the end (``fold``); only a passing flow the join
    did not take (a destination outside the mesh) is counted here per direction.
    """

    def __init__(self) -> None:
        self.verdicts: dict[str, int] = {}
        # passing flows the pair join did not fold: (req, src_host, host, over IPv6) -> passes;
        # the rest of a direction's identity, once per key. The family is part of the key: a
        # dual-stack direction is two directions, reported apart ("calico.vxlan" and
        # "calico.vxlan over IPv6"), as portmesh report does.
        self.passes: dict[tuple[Any, Any, Any, bool], int] = {}
        self.ends: dict[tuple[Any, Any, Any, bool], tuple[Any, Any, Any]] = {}
        self.agg = Aggregate()

    def add(self, rec: dict[str, Any], folded: bool = False) -> None:
        """One result; ``folded``: the pair join took it (its passes are counted there)."""
        get = rec.get
        v = get("verdict") or "unknown"
        vs = self.verdicts
        vs[v] = vs.get(v, 0) + 1
        if v != "pass":
            self.agg.add(rec)
            return
        if not folded:
            self._unfolded(rec, 1)

    def add_passes(self, rec: dict[str, Any], n: int = 1, folded: bool = False) -> None:
        """``n`` passing flows of one direction that did not come through ``add``: tally
        records (``folded``: the pair join took it)."""
        self.verdicts["pass"] = self.verdicts.get("pass", 0) + n
        if not folded:
            self._unfolded(rec, n)

    def _unfolded(self, rec: dict[str, Any], n: int) -> None:
        get = rec.get
        key = (get("req"), get("src_host"), get("host"), _is_v6(rec))
        p = self.passes
        if key in p:
            p[key] += n
        else:
            p[key] = n
            self.ends[key] = (get("proto"), get("src"), get("dst"))

    def fold(self, mesh: Any, summary: dict[str, Any]) -> Any:
        """The report's Run of this mesh: passes merged, port labels from the plan."""
        agg = self.agg
        run = agg.run(mesh.scan_id)
        run.argv, run.planned, run.summary, run.starts = mesh.cfg.argv, mesh.planned, summary, 1
        addr = {h.name: h.address + (f" / {h.address6}" if h.address6 else "") for h in mesh.hosts}
        hosts = [(name, addr.get(name)) for name in mesh.join.names]
        for req, v6, proto, cells in mesh.join.passes():
            # an IPv6 direction is its own requirement in the report, as its failures are
            agg.add_pass_cells(run, req + IPV6_SUFFIX if v6 else req, proto, hosts, cells)
        for key, n in self.passes.items():
            req, sh, host, v6 = key
            proto, src, dst = self.ends[key]
            src_name = sh or src or "(local)"
            name = (req or f"{proto}") + (IPV6_SUFFIX if v6 else "")
            agg.add_passes(run, name, str(proto), (src_name, src), (host or dst, dst), n)
        for name, reason in mesh.unreachable.items():
            run.unreachable[name] = reason
            run.host(name)
        for leg in legs(mesh.cfg.catalog, mesh.cfg.site, mesh.selection):
            r = run.reqs.get(leg.req.id + (IPV6_SUFFIX if leg.af == "ipv6" else ""))
            if r is not None and leg.srcs and leg.dsts:
                for p in leg.ports:
                    if p is not None:
                        r.ports.add(p)
        return run


def progress(mesh: Any) -> None:
    el = time.perf_counter() - mesh.t0
    rate = mesh.results / el if el > 0 else 0.0
    live = len(mesh.live())
    sys.stderr.write(f"\r{mesh.results}/{mesh.planned} flows  {rate:8.0f} flows/s  {live} agents  ")
    sys.stderr.flush()


def human(
    err: TextIO, mesh: Any, pairs: Counter[str], summary: dict[str, Any], elapsed: float
) -> None:
    """The totals, then the run as ``portmesh report`` prints it (grouped faults, matrix)."""
    v = mesh.matrix.verdicts
    w = err.write
    w(
        f"portmesh mesh: {len(mesh.hosts)} hosts, {mesh.results + mesh.tallied}/{mesh.planned} "
        "flows: "
        f"{v.get('pass', 0)} pass, {v.get('fail', 0)} fail, {v.get('unknown', 0)} unknown; "
        f"pairs: {pairs.get('pass', 0)} pass, {pairs.get('one-way', 0)} one-way, "
        f"{pairs.get('fail', 0)} fail, {pairs.get('unknown', 0)} unknown ({elapsed:.1f}s)\n"
    )
    if mesh.interrupted:
        w("INTERRUPTED: flows not probed are reported as error (interrupted)\n")
    if mesh.neigh_full:
        w(neighbour_advice({"unknown": mesh.neigh_full}).replace("this host's", "the agents'"))
    addr = {h.name: h.address + (f" / {h.address6}" if h.address6 else "") for h in mesh.hosts}
    for name, srcs in sorted(mesh.moved.items()):
        w(
            f"WARNING {name}: its probes left from {', '.join(sorted(srcs))}, not its inventory "
            f"address {addr.get(name)}: its agent runs on another machine than the inventory "
            "names (check --exec), or the host routes through another of its addresses; results "
            "record the address they left from\n"
        )
    for line in render_run(mesh.matrix.fold(mesh, summary), header=False):
        w(line + "\n")
    err.flush()
