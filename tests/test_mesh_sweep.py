"""The mesh's NodePort sweep (issue 16): agents with raw sockets sweep TCP by SYN and read our
responder's token on a sample; the verdicts stay exact.

A real 2-host lab and the packaged catalog with the full NodePort range (2,768 ports per
direction). node2 drops 31000 and resets 32000 (nftables), both outside the token sample.
"""

from __future__ import annotations

import io
import sys
from collections import Counter
from pathlib import Path

import orjson
import pytest

from scanner.engine.output import NdjsonOutput
from scanner.lab.lab import write_inventory
from scanner.mesh.coordinator import MeshConfig, run_mesh
from scanner.mesh.probing import TOKEN_SAMPLE
from scanner.plan.selection import SelectionOptions

DROP, RESET = 31000, 32000
RULES = f"""
table inet nptest {{
    chain input {{
        type filter hook input priority filter; policy accept;
        tcp dport {DROP} drop
        tcp dport {RESET} reject with tcp reset
    }}
}}
"""


@pytest.mark.lab
def test_full_nodeport_range_is_swept_by_syn_exactly_with_a_token_sample(
    make_lab, tmp_path: Path
) -> None:
    lab = make_lab(hosts=2)
    lab.nft("node2", RULES)
    inv = write_inventory(lab)
    catalog, site, selection = SelectionOptions(
        inventories=(str(inv),), with_features=("metallb",), nodeport_sample=None
    ).resolve()
    out = tmp_path / "mesh.ndjson"
    run_mesh(
        MeshConfig(
            catalog=catalog,
            site=site,
            selection=selection,
            exec_template=lab.exec_template(),
            agent_cmd=f"{sys.executable} -m scanner agent",
            output=NdjsonOutput(str(out), stdout=False),
            summary_to=io.StringIO(),
        )
    )
    recs = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    results = [r for r in recs if r["type"] == "result"]
    summary = recs[-1]
    assert summary["planned"] == summary["results"] == len(results)
    nodeport = [r for r in results if r["req"] == "k8s.nodeport"]
    assert len(nodeport) == 2 * 2768

    by_dir: dict[str, Counter] = {}
    for r in nodeport:
        by_dir.setdefault(r["host"], Counter())[(r["state"], r["reason"])] += 1
        if r["host"] == "node2" and r["port"] == DROP:
            assert (r["state"], r["reason"], r["verdict"]) == ("filtered", "no-response", "fail")
        elif r["host"] == "node2" and r["port"] == RESET:
            assert (r["state"], r["reason"], r["verdict"]) == ("closed", "reset", "fail")
        else:
            assert r["state"] == "open" and r["verdict"] == "pass", r
    # per direction: the token sample read our responder, the rest was swept by SYN
    assert by_dir["node1"] == {
        ("open", "responder"): TOKEN_SAMPLE,
        ("open", "syn-ack"): 2768 - TOKEN_SAMPLE,
    }
    assert by_dir["node2"] == {
        ("open", "responder"): TOKEN_SAMPLE,
        ("open", "syn-ack"): 2768 - TOKEN_SAMPLE - 2,
        ("filtered", "no-response"): 1,
        ("closed", "reset"): 1,
    }
    # every other TCP requirement has fewer ports than the sample: all read the token
    others = [r for r in results if r["proto"] == "tcp" and r["req"] != "k8s.nodeport"]
    assert others and all((r["state"], r["reason"]) == ("open", "responder") for r in others)
    fails = [r for r in results if r["verdict"] != "pass"]
    assert sorted((r["host"], r["port"]) for r in fails) == [("node2", DROP), ("node2", RESET)]
