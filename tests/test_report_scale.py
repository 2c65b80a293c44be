"""The HTML report at 1,000 hosts: a generated mesh result file (real record schema) with 1% of
its directions failing, rendered by `portmesh report --format html`, must be self-contained,
under 10 MB, and draw in headless Chromium: findings first, canvas heatmaps whose pixels match
the data, group drill-down tables with the known cell states."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import orjson
import pytest
from test_report_html import CHROMIUM, Cells, chromium, console_errors

HOSTS = 1000
CP = 3  # control-plane hosts: node1..node3
SID = "5ca1e00000000001"
LIMIT = 10 * 1024 * 1024


def name(i: int) -> str:
    return f"node{i + 1}"


def addr(i: int) -> str:
    # four /24 subnets of 250 hosts: the report groups by role, then subnet
    return f"198.18.{i // 250}.{i % 250 + 1}"


# requirement -> (proto, port, sources, destinations)
def requirements() -> dict[str, tuple[str, int, range, range]]:
    every = range(HOSTS)
    cp = range(CP)
    return {
        "calico.bgp": ("tcp", 179, every, every),
        "calico.vxlan": ("udp", 4789, every, every),
        "k8s.apiserver": ("tcp", 6443, every, cp),
        "k8s.kubelet": ("tcp", 10250, cp, every),
        "etcd.peer": ("tcp", 2380, cp, cp),
    }


def faults(rng: random.Random) -> dict[str, set[tuple[int, int]]]:
    """Failing directions per requirement: structured faults plus 1% scattered ones."""
    reqs = requirements()
    bad: dict[str, set[tuple[int, int]]] = {k: set() for k in reqs}
    bad["calico.bgp"] |= {(s, 16) for s in range(HOSTS) if s != 16}  # node17 drops BGP
    bad["calico.vxlan"] |= {(229, d) for d in range(HOSTS) if d != 229}  # node230 cannot send
    bad["k8s.kubelet"] |= {(s, 554) for s in range(CP)}  # node555's kubelet blocked
    bad["etcd.peer"].add((2, 0))  # one-way between two etcd members
    for key in ("calico.bgp", "calico.vxlan"):  # 1% of the directions, scattered
        while len(bad[key]) < HOSTS * (HOSTS - 1) // 100 + 999:
            s, d = rng.randrange(HOSTS), rng.randrange(HOSTS)
            if s != d:
                bad[key].add((s, d))
    return bad


def write_results(path: Path, bad: dict[str, set[tuple[int, int]]]) -> dict[str, Counter]:
    """The mesh's NDJSON: result records for every direction of a pair with a failure, one
    pair record for each pair that passed both ways. Returns the expected cell states."""
    reqs = requirements()
    expect: dict[str, Counter] = {}
    with path.open("wb") as fh:
        w = fh.write
        w(orjson.dumps({"type": "start", "version": 1, "scan_id": SID, "ts": "2026-11-29T00:00:00Z",
                        "argv": ["portmesh", "mesh", "-i", "big.yml"], "planned": None}) + b"\n")  # fmt: skip
        for key, (proto, port, srcs, dsts) in reqs.items():
            fails = bad[key]
            states: Counter = Counter()
            for a in range(HOSTS):
                for b in range(a + 1, HOSTS):
                    ab = a in srcs and b in dsts
                    ba = b in srcs and a in dsts
                    if not (ab or ba):
                        continue
                    fab, fba = (a, b) in fails, (b, a) in fails
                    if ab and ba and not fab and not fba:
                        states["pass"] += 2
                        w(b'{"type":"pair","scan_id":"%s","a":"%s","b":"%s","req":"%s","proto":"%s",'
                          b'"port":%d,"a_to_b":"pass","b_to_a":"pass","verdict":"pass"}\n'
                          % (SID.encode(), name(a).encode(), name(b).encode(), key.encode(),
                             proto.encode(), port))  # fmt: skip
                        continue
                    for s, d, f, req in ((a, b, fab, ab), (b, a, fba, ba)):
                        if not req:
                            continue
                        rev_req = (s in dsts and d in srcs)
                        rev_fail = (d, s) in fails
                        if f:
                            states["one-way" if rev_req and not rev_fail else "fail"] += 1
                        else:
                            states["pass"] += 1
                        state = ("filtered" if proto == "tcp" else "open|filtered") if f else "open"
                        reason = "no-response" if f else "responder"
                        w(b'{"type":"result","scan_id":"%s","ts":"2026-11-29T00:00:01Z","src":"%s",'
                          b'"dst":"%s","host":"%s","proto":"%s","port":%d,"state":"%s","reason":"%s",'
                          b'"rtt_ms":%s,"attempts":%d,"src_host":"%s","req":"%s","verdict":"%s"}\n'
                          % (SID.encode(), addr(s).encode(), addr(d).encode(), name(d).encode(),
                             proto.encode(), port, state.encode(), reason.encode(),
                             b"null" if f else b"0.2", 3 if f else 1, name(s).encode(), key.encode(),
                             b"fail" if f else b"pass"))  # fmt: skip
            expect[key] = states
    return expect


@pytest.fixture(scope="module")
def big_report(tmp_path_factory) -> tuple[Path, dict[str, Counter]]:
    tmp = tmp_path_factory.mktemp("scale")
    results = tmp / "mesh-1000.ndjson"
    expect = write_results(results, faults(random.Random(1000)))
    html = tmp / "report.html"
    cp = subprocess.run(
        [sys.executable, "-m", "scanner", "report", str(results), "--format", "html", "-o", str(html)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert cp.returncode == 0, cp.stderr[-2000:]  # an export: written is success (docs/report.md)
    return html, expect


def test_expected_failures_are_one_percent() -> None:
    bad = faults(random.Random(1000))
    n = sum(len(v) for v in bad.values())
    directions = 2 * HOSTS * (HOSTS - 1) + 2 * CP * (HOSTS - 1) + CP * (CP - 1)
    assert 0.01 <= n / directions <= 0.02


def test_page_is_small_and_self_contained(big_report) -> None:
    html, _ = big_report
    size = html.stat().st_size
    assert size < LIMIT, f"{size / 1e6:.1f} MB"
    text = html.read_text()
    assert not re.search(r"""\b(src|href)\s*=""", text)
    assert "http://" not in text and "https://" not in text
    assert "default-src 'none'" in text


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian package chromium)")
def test_chromium_draws_findings_first_and_canvas_heatmaps(big_report, tmp_path: Path) -> None:
    html, expect = big_report
    dom, log = chromium(html.as_uri(), tmp_path)
    assert console_errors(log) == []
    p = Cells()
    p.feed(dom)
    assert p.ready, "the page script did not finish"
    # the findings come before the heatmaps, and name the structured faults
    assert dom.index('id="findings"') < dom.index('id="main"')
    findings = re.findall(r'<li class="finding">(.*?)</li>', dom)
    assert any("node17 drops tcp/179" in f for f in findings), findings[:5]
    assert any("node230 cannot reach udp/4789" in f for f in findings), findings[:5]
    assert any("one-way: node3 -&gt; node1 tcp/2380" in f for f in findings), findings[:5]
    # every failing requirement is shown (the passing one is filtered out by default); the two
    # 1,000 x 1,000 ones are canvases whose pixels (read back by the page) count exactly the
    # expected cell states
    assert set(p.sections) == set(requirements()) - {"k8s.apiserver"}
    canvases = dict(re.findall(r'<details class="req" data-req="([^"]+)".*?<canvas class="heat"([^>]*)>', dom, re.S))
    assert set(canvases) == {"calico.bgp", "calico.vxlan"}
    for key, attrs in canvases.items():
        got = dict(re.findall(r'data-([a-z-]+)="([^"]+)"', attrs))
        assert got["cells"] == f"{HOSTS}x{HOSTS}"
        for state in ("pass", "fail", "one-way"):
            assert int(got[state]) == expect[key][state], (key, state, got)
        assert int(got["unknown"]) == 0
    # the small requirements are tables, cell by cell
    assert p.cells[("k8s.kubelet", "node1", "node555")] == "fail"
    assert p.cells[("etcd.peer", "node3", "node1")] == "one-way"
    assert p.cells[("etcd.peer", "node1", "node3")] == "pass"


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian package chromium)")
def test_a_cell_link_drills_down_into_its_group(big_report, tmp_path: Path) -> None:
    html, _ = big_report
    dom, log = chromium(html.as_uri() + "#cell=calico.bgp/node5/node17", tmp_path)
    assert console_errors(log) == []
    p = Cells()
    p.feed(dom)
    # the drill-down table of node5's group x node17's group, with the failing cell
    assert p.cells[("calico.bgp", "node5", "node17")] == "one-way"  # node17 -> node5 passes
    block = {k for k in p.cells if k[0] == "calico.bgp"}
    assert 1 < len(block) <= 100 * 100
    panel = " ".join(p.panel)
    assert "node5 → node17" in panel and "filtered: no-response" in panel
