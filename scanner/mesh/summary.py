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
from collections.abc import Iterator, MutableMapping
from itertools import compress
from typing import Any, TextIO

from scanner.engine.process import neighbour_advice
from scanner.mesh.pairs import ABSENT, SPARSE, V6_KEY, PairJoin, _is_v6, _Req
from scanner.plan.planner import legs
from scanner.report.aggregate import IPV6_SUFFIX, STRIDE, Aggregate, Requirement
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
        self.agg = Aggregate(samples=False)  # the text summary shows none

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
        fold_passes(agg, run, mesh.join, hosts)
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


class TableCells(MutableMapping[int, Any]):
    """A requirement's cells (``Requirement.cells``: run host key -> pass count or Cell) whose
    all-passing directions stay in the pair join's table (two 4-byte arrays), read through
    here, instead of a dict entry each (13 million at 1,000 hosts: most of the summary's
    memory and time). ``own``: the other cells, as the report's Aggregate made them (every
    direction with a non-passing flow, and passes the join did not take). Same contents,
    same answers as the dict the report would have built."""

    def __init__(
        self, own: dict[int, Any], t: _Req, n: int, jmap: list[int], rmap: list[int]
    ) -> None:
        self.own = own
        self.sig, self.passed = t.sig, t.passed
        self.n = n
        self.jmap = jmap  # run host index -> join host index (-1: not a mesh host)
        self.rmap = rmap  # join host index -> run host index (-1: not in the run)
        self.skip: set[int] = set()  # table entries whose cell is in ``own`` instead
        self.table = len(self.sig) - self.sig.count(ABSENT) - self.sig.count(SPARSE)
        self._peers: tuple[dict[int, int], dict[int, int]] | None = None

    def _tk(self, ck: int) -> int:
        """The join's table index of run cell key ``ck`` when the table holds it, else -1."""
        s, d = divmod(ck, STRIDE)
        jmap = self.jmap
        if s >= len(jmap) or d >= len(jmap):
            return -1
        js, jd = jmap[s], jmap[d]
        if js < 0 or jd < 0:
            return -1
        k = js * self.n + jd
        v = self.sig[k]
        if v in (ABSENT, SPARSE) or k in self.skip:
            return -1
        return k

    def __getitem__(self, ck: int) -> Any:
        v = self.own.get(ck)
        if v is not None:
            return v
        k = self._tk(ck)
        if k < 0:
            raise KeyError(ck)
        return self.passed[k]

    def get(self, ck: int, default: Any = None) -> Any:  # type: ignore[override]
        v = self.own.get(ck)
        if v is not None:
            return v
        k = self._tk(ck)
        return default if k < 0 else self.passed[k]

    def __contains__(self, ck: object) -> bool:
        return ck in self.own or (isinstance(ck, int) and self._tk(ck) >= 0)

    def __setitem__(self, ck: int, v: Any) -> None:
        k = self._tk(ck)
        if k >= 0:
            self.skip.add(k)
            self.table -= 1
        self.own[ck] = v
        self._peers = None

    def __delitem__(self, ck: int) -> None:
        if ck in self.own:
            del self.own[ck]
        else:
            k = self._tk(ck)
            if k < 0:
                raise KeyError(ck)
            self.skip.add(k)
            self.table -= 1
        self._peers = None

    def __len__(self) -> int:
        return len(self.own) + self.table

    def __iter__(self) -> Iterator[int]:
        yield from self.own
        n, rmap, sig, skip = self.n, self.rmap, self.sig, self.skip
        for k in compress(range(len(sig)), sig):
            if sig[k] != SPARSE and k not in skip:
                s, d = divmod(k, n)
                yield rmap[s] * STRIDE + rmap[d]

    def peer_counts(self) -> tuple[dict[int, int], dict[int, int]]:
        """``Requirement.peer_counts`` from the table's rows and columns (array counts)."""
        if self._peers is not None:
            return self._peers
        n_srcs: dict[int, int] = {}
        n_dsts: dict[int, int] = {}
        for k in self.own:
            s, d = divmod(k, STRIDE)
            n_srcs[d] = n_srcs.get(d, 0) + 1
            n_dsts[s] = n_dsts.get(s, 0) + 1
        n, sig, rmap = self.n, self.sig, self.rmap
        for j in range(n):
            row = sig[j * n : (j + 1) * n]
            out = n - row.count(ABSENT) - row.count(SPARSE)
            if out:
                n_dsts[rmap[j]] = n_dsts.get(rmap[j], 0) + out
            col = sig[j::n]
            into = n - col.count(ABSENT) - col.count(SPARSE)
            if into:
                n_srcs[rmap[j]] = n_srcs.get(rmap[j], 0) + into
        for k in self.skip:
            s, d = divmod(k, n)
            n_dsts[rmap[s]] -= 1
            n_srcs[rmap[d]] -= 1
        for m in (n_srcs, n_dsts):
            for h in [h for h, c in m.items() if not c]:
                del m[h]
        self._peers = (n_srcs, n_dsts)
        return self._peers


def _register(run: Any, join: PairJoin, hosts: list[tuple[str, str | None]]) -> list[int]:
    """Every join host that has a passing direction joins the run, in the order the report's
    cell-by-cell fold (``Aggregate.add_pass_cells`` per requirement) would have met it: per
    requirement, cell by cell (source, then destination). Returns join index -> run index."""
    n = join.n
    rmap = [-1] * n
    involved = [False] * n
    missing: set[int] = set()
    for j, (name, _) in enumerate(hosts):
        i = run.index.get(name)
        if i is None:
            missing.add(j)
    for t in join.reqs.values():
        sig, passed, sparse = t.sig, t.passed, t.sparse

        def has_pass(k: int, sig: Any = sig, sparse: Any = sparse) -> bool:
            v = sig[k]
            return v != ABSENT and (v != SPARSE or sparse[k].passed > 0)

        first: dict[int, int] = {}  # join host -> its first position in this requirement
        for j in range(n):
            if involved[j] and j not in missing:
                continue
            row = sig[j * n : (j + 1) * n]
            pos = -1
            for d in compress(range(n), row):
                if has_pass(j * n + d):
                    pos = 2 * (j * n + d)
                    break
            col = sig[j::n]
            for s in compress(range(n), col):
                if has_pass(s * n + j):
                    p = 2 * (s * n + j) + 1
                    pos = p if pos < 0 or p < pos else pos
                    break
            if pos >= 0:
                involved[j] = True
                if j in missing:
                    first[j] = pos
        for j in sorted(first, key=first.__getitem__):
            run.host(*hosts[j])
            missing.discard(j)
        del passed
    for j in range(n):
        if involved[j]:
            rmap[j] = run.host(*hosts[j])  # its address, if the run has none for it yet
    return rmap


def fold_passes(agg: Any, run: Any, join: PairJoin, hosts: list[tuple[str, str | None]]) -> None:
    """The join's passing directions into the report's run: what ``Aggregate.add_pass_cells``
    does per requirement, with the all-passing directions left in the join's table
    (``TableCells``) instead of a dict entry each."""
    n = join.n
    rmap = _register(run, join, hosts)
    jmap = [-1] * len(run.names)
    for j, r in enumerate(rmap):
        if r >= 0:
            jmap[r] = j
    for key, t in join.reqs.items():
        req_id, v6, _ = key.partition(V6_KEY)
        name = req_id + IPV6_SUFFIX if v6 else req_id
        sig, passed, sparse = t.sig, t.passed, t.sparse
        table = len(sig) - sig.count(ABSENT) - sig.count(SPARSE)
        sparse_pass = [(k, d.passed) for k, d in sparse.items() if d.passed]
        if not table and not sparse_pass:
            continue  # add_pass_cells: no cell, no requirement
        req = run.reqs.get(name)
        if req is None:
            req = run.reqs[name] = Requirement(name, t.proto)
        if isinstance(req.cells, TableCells):  # two join keys, one report name: cell by cell
            agg.add_pass_cells(run, name, t.proto, hosts, join._pass_cells(t, n))
            continue
        own = req.cells
        total = sum(passed) - sum(passed[k] for k in sparse) + sum(c for _, c in sparse_pass)
        cells = TableCells(own, t, n, jmap, rmap)
        # a cell the report already has (a direction's failure, passes it took itself) takes
        # the table's count, as add_pass_cells would add it
        for ck in list(own):
            k = cells._tk(ck)
            if k >= 0:
                cur = own[ck]
                if cur.__class__ is int:
                    own[ck] = cur + passed[k]
                else:
                    cur.npass += passed[k]
                cells.skip.add(k)
                cells.table -= 1
        for k, c in sparse_pass:
            s, d = divmod(k, n)
            ck = rmap[s] * STRIDE + rmap[d]
            cur = own.get(ck)
            if cur is None:
                own[ck] = c
            elif cur.__class__ is int:
                own[ck] = cur + c
            else:
                cur.npass += c
        req.cells = cells  # type: ignore[assignment]
        run.results += total
        agg.passes += total
        req.npass += total


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
