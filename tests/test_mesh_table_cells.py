"""The mesh summary's passing directions read from the pair join (``TableCells``) give the
report exactly what the cell-by-cell fold (``Aggregate.add_pass_cells``) gave it: the same
cells, counts, host order and addresses, peer counts and text."""

from __future__ import annotations

import random

from scanner.mesh.pairs import PairJoin
from scanner.mesh.summary import Matrix, TableCells, fold_passes
from scanner.report.aggregate import STRIDE, Cell
from scanner.report.text import render_run

# node01 and node1 share a natural sort key: their order in the run is the fold's own
NAMES = [f"node{i}" for i in range(1, 14)] + ["node01", "cp1"]


def _mesh(seed: int, fail: float) -> tuple[PairJoin, Matrix, list[tuple[str, str | None]]]:
    rnd = random.Random(seed)
    addr = {n: f"198.18.0.{i + 1}" for i, n in enumerate(NAMES)}
    join, m = PairJoin(NAMES), Matrix()
    for _ in range(4000):
        s, d = rnd.choice(NAMES), rnd.choice([*NAMES, "vip"])
        if s == d:
            continue
        req = rnd.choice(["etcd.peer", "k8s.nodeport", "calico.bgp", None])
        v6 = rnd.random() < 0.2
        x = rnd.random()
        verdict = "pass" if x > fail else ("fail" if x > fail / 4 else "unknown")
        rec = {
            "type": "result", "src": addr[s], "dst": "2001:2::9" if v6 else addr.get(d, "198.18.9.9"),
            "host": d, "proto": "tcp", "port": rnd.choice([2380, 30000, 30001, 30500, None]),
            "state": {"pass": "open", "fail": "filtered", "unknown": "error"}[verdict],
            "reason": {"pass": "responder", "fail": "no-response", "unknown": "x"}[verdict],
            "src_host": s, "req": req, "verdict": verdict,
            **({"af": "ipv6"} if v6 else {}),
        }  # fmt: skip
        if rnd.random() < 0.1 and verdict == "pass" and req:
            tally = {"type": "tally", "src_host": s, "src": rec["src"], "host": d,
                     "dst": rec["dst"], "req": req, "proto": "tcp", "af": "ipv6" if v6 else "ipv4",
                     "flows": 3, "states": {"open": 3}, "ports": "30000-30002"}  # fmt: skip
            m.add_passes(tally, 3, join.add_tally(tally))
            continue
        m.add(rec, join.add(rec))
    hosts = [(n, addr[n]) for n in join.names]
    return join, m, hosts


def _cells(req: object) -> dict[int, object]:
    out = {}
    for k, c in req.cells.items():  # type: ignore[attr-defined]
        out[k] = (c.npass, c.nfail, c.nunknown, c.state) if isinstance(c, Cell) else c
    return out


def _peer_loop(req: object) -> tuple[dict[int, int], dict[int, int]]:
    n_srcs: dict[int, int] = {}
    n_dsts: dict[int, int] = {}
    for k in req.cells:  # type: ignore[attr-defined]
        s, d = divmod(k, STRIDE)
        n_srcs[d] = n_srcs.get(d, 0) + 1
        n_dsts[s] = n_dsts.get(s, 0) + 1
    return n_srcs, n_dsts


def test_table_cells_equal_the_cell_by_cell_fold() -> None:
    for seed, fail in ((1, 0.05), (2, 0.3), (3, 0.0), (4, 0.9)):
        j_old, m_old, hosts = _mesh(seed, fail)
        j_new, m_new, _ = _mesh(seed, fail)
        old, new = m_old.agg, m_new.agg
        r_old, r_new = old.run("x"), new.run("x")
        for req, v6, proto, cells in j_old.passes():
            old.add_pass_cells(r_old, req + (" over IPv6" if v6 else ""), proto, hosts, cells)
        fold_passes(new, r_new, j_new, hosts)
        assert r_new.names == r_old.names and r_new.addrs == r_old.addrs
        assert (r_new.results, new.passes) == (r_old.results, old.passes)
        assert list(r_new.reqs) == list(r_old.reqs)
        tables = 0
        for key, ro in r_old.reqs.items():
            rn = r_new.reqs[key]
            tables += isinstance(rn.cells, TableCells)
            assert (rn.npass, rn.nfail, rn.nunknown) == (ro.npass, ro.nfail, ro.nunknown)
            assert _cells(rn) == _cells(ro) and len(rn.cells) == len(ro.cells)
            assert rn.peer_counts() == _peer_loop(ro) == _peer_loop(rn)
            assert sorted(k for k, _ in rn.marked()) == sorted(k for k, _ in ro.marked())
            for s in range(len(r_old.names) + 1):
                for d in range(len(r_old.names) + 1):
                    k = s * STRIDE + d
                    assert (k in rn.cells) == (k in ro.cells)
                    assert rn.cell_state(k) == ro.cell_state(k)
        assert tables  # the table was read, not copied
        assert list(render_run(r_new, header=False)) == list(render_run(r_old, header=False))


def test_table_cells_writes_go_to_own() -> None:
    join, m, hosts = _mesh(5, 0.1)
    run = m.agg.run("x")
    fold_passes(m.agg, run, join, hosts)
    req = next(r for r in run.reqs.values() if isinstance(r.cells, TableCells))
    cells = req.cells
    k = next(k for k in cells if k not in cells.own)  # type: ignore[attr-defined]
    n, size = cells[k], len(cells)
    cells[k] = n + 2
    assert cells[k] == n + 2 and cells.own[k] == n + 2 and len(cells) == size  # type: ignore[attr-defined]
    del cells[k]
    assert k not in cells and len(cells) == size - 1 and cells.get(k) is None
    assert req.peer_counts() == _peer_loop(req)
