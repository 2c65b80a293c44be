"""`portmesh demo` end to end: its NDJSON names exactly the injected faults (root: the lab;
without CAP_NET_ADMIN: the loopback story). The expected failures are written out here by hand
from the faults the demo documents, not taken from the demo's own ground truth."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import lab_skip_reason

NODEPORT_SLICE = range(30100, 30200)


def _failures(path: Path) -> set[tuple]:
    out = set()
    results = 0
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["type"] != "result":
            continue
        results += 1
        if rec["verdict"] == "fail":
            out.add((rec["req"], rec["src_host"], rec["host"], rec["proto"], rec["port"]))
    assert results > 1000
    return out


def _summaries(path: Path) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["type"] == "summary"]


@pytest.mark.skipif(lab_skip_reason() is not None, reason=lab_skip_reason() or "")
def test_lab_demo_reports_exactly_the_injected_faults(tmp_path: Path) -> None:
    out = tmp_path / "demo.ndjson"
    p = subprocess.run(
        [sys.executable, "-m", "scanner", "demo", "-o", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    want = set()
    for src in ("node2", "node3", "node4"):
        want.add(("etcd.peer", src, "node1", "tcp", 2380))
    want.add(("calico.vxlan", "node2", "node3", "udp", 4789))
    for src in ("node1", "node2", "node3"):
        for port in NODEPORT_SLICE:
            want.add(("k8s.nodeport", src, "node4", "tcp", port))
    for src in ("node1", "node3", "node4"):
        want.add(("calico.ipip", src, "node2", "ipip", None))
    got = _failures(out)
    assert got == want, (sorted(got - want)[:10], sorted(want - got)[:10])
    for s in _summaries(out):
        assert s["planned"] == s["results"]
    assert "exactly the injected faults" in p.stderr
    # the lab is gone afterwards
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "pmdemo-" not in ns


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_loopback_demo_without_privileges(tmp_path: Path) -> None:
    out = tmp_path / "demo.ndjson"
    argv = [sys.executable, "-m", "scanner", "demo", "-o", str(out)]
    if os.geteuid() == 0:
        # stay uid 0 (the venv may live in root's home) but drop every capability
        argv = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", *argv]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "loopback demo" in p.stderr and "Left out" in p.stderr
    want = {("etcd.peer", s, "node1", "tcp", 2380) for s in ("node2", "node3", "node4")}
    for src in ("node1", "node2", "node3"):
        for port in NODEPORT_SLICE:
            want.add(("k8s.nodeport", src, "node4", "tcp", port))
    assert _failures(out) == want
