"""The coordinator's fast paths against its general ones, on a simulated mesh (no network).

``benchmarks/mesh_sim.py`` runs the real ``run_mesh`` against simulated agents (one forked
process, socketpairs) that answer a deterministic share of flows ``filtered``. The coordinator
folds most passing lines on a fast path (batch parse, the pair join's step inlined, pair
records from a template, the summary's passes read back from the join). Here its output is
checked against the slow, plain ways of computing the same things from its own result lines:
``PairJoin.add`` for every line (the pair records), and ``portmesh report``'s Aggregate and
text (the human summary).
"""

from __future__ import annotations

import sys
from pathlib import Path

import orjson
import pytest

from scanner.mesh.pairs import PairJoin
from scanner.report.aggregate import Aggregate
from scanner.report.text import render_run

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import mesh_sim  # noqa: E402


@pytest.mark.parametrize(("emit", "sample", "rate"), [("all", 4, 0.2), ("failures", 4, 0.1)])
def test_simulated_mesh_equals_the_general_join_and_the_report(
    tmp_path: Path, emit: str, sample: int, rate: float
) -> None:
    out, text = tmp_path / "mesh.ndjson", tmp_path / "summary.txt"
    res = mesh_sim.run(12, sample, emit, rate, str(out), str(text))
    assert res["simulator_ok"] and res["exit"] == 1
    recs = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    summary = recs[-1]
    assert summary["type"] == "summary"
    assert summary["results"] + summary.get("tallied", 0) == summary["planned"] > 0
    assert summary["verdicts"]["fail"] > 0 and summary["verdicts"]["pass"] > 0

    hosts = [h for h in summary["agents"]]
    join = PairJoin(hosts)
    for r in recs:
        if r["type"] == "result":
            join.add(r)
        elif r["type"] == "tally":
            join.add_tally(r)
    want = [{k: v for k, v in p.items() if k != "type"} for p in join.pairs()]
    got = [{k: v for k, v in r.items() if k not in ("type", "scan_id")} for r in recs
           if r["type"] == "pair"]  # fmt: skip
    assert got == want
    assert {"one-way", "pass"} <= {p["verdict"] for p in got}

    # the mesh's stderr summary: its totals line, then the report's text of its own output
    agg = Aggregate().feed(recs)
    run = agg.runs[summary["scan_id"]]
    lines = text.read_text().splitlines()
    assert lines[0].startswith("portmesh mesh: 12 hosts")
    assert lines[1:] == list(render_run(run, header=False))
