"""The HTML report in a real browser: headless Chromium loads it, the script builds the heatmap,
the cells carry the known states, and the console shows no error."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from scanner.report import ReportConfig, run_report

DATA = Path(__file__).parent / "data" / "report"
CHROMIUM = shutil.which("chromium") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian package chromium)")


def chromium(url: str, tmp_path: Path) -> tuple[str, str]:
    """(dumped DOM after the scripts ran, browser log) for ``url``."""
    profile = tmp_path / "profile"
    profile.mkdir(exist_ok=True)
    cp = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cp.returncode == 0, cp.stderr[-2000:]
    return cp.stdout, cp.stderr


def console_errors(log: str) -> list[str]:
    return [
        ln
        for ln in log.splitlines()
        if "Uncaught" in ln or ("CONSOLE" in ln and ("rror" in ln or "Refused" in ln))
    ]


class Cells(HTMLParser):
    """(requirement, src, dst) -> data-state of every heatmap cell, and the panel's text."""

    def __init__(self) -> None:
        super().__init__()
        self.req: str | None = None
        self.cells: dict[tuple[str, str, str], str] = {}
        self.sections: list[str] = []
        self.in_panel = 0
        self.panel: list[str] = []
        self.ready = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "body" and a.get("data-ready") == "1":
            self.ready = True
        if tag == "details" and a.get("data-req"):
            self.req = a["data-req"]
            self.sections.append(self.req)  # type: ignore[arg-type]
        if tag == "td" and "data-state" in a:
            self.cells[(self.req, a["data-s"], a["data-d"])] = a["data-state"]  # type: ignore[index]
        if tag == "div" and a.get("id") == "panel":
            self.in_panel = 1
        elif self.in_panel and tag not in ("br", "i"):
            self.in_panel += 1

    def handle_endtag(self, tag: str) -> None:
        if self.in_panel and tag not in ("br", "i"):
            self.in_panel -= 1

    def handle_data(self, data: str) -> None:
        if self.in_panel:
            self.panel.append(data)


def page(tmp_path: Path, *inputs: Path) -> Path:
    out = io.BytesIO()
    run_report(ReportConfig(inputs=[str(p) for p in inputs], fmt="html"), out, io.StringIO())
    path = tmp_path / "report.html"
    path.write_bytes(out.getvalue())
    return path


def expected_mesh4() -> dict[tuple[str, str, str], str]:
    """The ground truth of mesh4.ndjson (see tests/data/report/make_fixtures.py)."""
    hosts = [f"node{i}" for i in range(1, 5)]
    bad = {
        "k8s.kubelet": {("node1", "node3"), ("node2", "node3"), ("node4", "node3")},
        "calico.vxlan": {("node2", "node4")},
        "k8s.nodeport": {("node1", "node3"), ("node2", "node3")},
    }
    out = {}
    for req, pairs in bad.items():
        for s in hosts:
            for d in hosts:
                # every fault here is one-way: the reverse direction passes
                out[(req, s, d)] = "self" if s == d else ("one-way" if (s, d) in pairs else "pass")
    return out


def test_page_is_self_contained(tmp_path: Path) -> None:
    text = page(tmp_path, DATA / "mesh4.ndjson").read_text()
    assert not re.search(r"""\b(src|href)\s*=""", text)
    assert "http://" not in text and "https://" not in text
    assert "default-src 'none'" in text  # CSP: the browser itself refuses any fetch


def test_heatmap_cells_carry_the_known_states(tmp_path: Path) -> None:
    path = page(tmp_path, DATA / "mesh4.ndjson", DATA / "mixed.ndjson")
    dom, log = chromium(path.as_uri(), tmp_path)
    assert console_errors(log) == []
    p = Cells()
    p.feed(dom)
    assert p.ready, "the page script did not finish"
    # failing and unknown requirements are shown, passing ones are filtered out by default
    assert p.sections == [
        "calico.vxlan", "k8s.kubelet", "k8s.nodeport",  # mesh4
        "tcp/80", "udp/53",  # the plain scan in mixed
        "etcd.client", "cilium.health-icmp",  # the check run in mixed
    ]  # fmt: skip
    mesh = {
        k: v for k, v in p.cells.items() if k[0] in ("calico.vxlan", "k8s.kubelet", "k8s.nodeport")
    }
    assert mesh == expected_mesh4()
    # a fail whose reverse is not required is "fail", an undecided probe "unknown"
    assert p.cells[("tcp/80", "(local)", "127.0.0.1")] == "fail"
    assert p.cells[("udp/53", "(local)", "127.0.0.1")] == "unknown"
    assert p.cells[("etcd.client", "node1", "node2")] == "fail"
    assert p.cells[("cilium.health-icmp", "node1", "node3")] == "unknown"
    assert set(p.cells.values()) == {"pass", "fail", "one-way", "unknown", "self"}


def test_a_cell_link_shows_the_flows_behind_it(tmp_path: Path) -> None:
    path = page(tmp_path, DATA / "mesh4.ndjson")
    dom, log = chromium(path.as_uri() + "#cell=k8s.nodeport/node1/node3", tmp_path)
    assert console_errors(log) == []
    p = Cells()
    p.feed(dom)
    panel = " ".join(p.panel)
    assert "node1 → node3" in panel
    assert "20 pass · 100 fail · 0 unknown" in panel
    assert "blocked ports: 30100-30199" in panel
    assert "filtered: admin-prohibited × 100" in panel
    assert "reverse node3 → node1: pass" in panel


def test_console_errors_are_detected(tmp_path: Path) -> None:
    """The check above can fail: a page that throws is caught by the same filter."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><script>null.x = 1;</script></body></html>")
    _, log = chromium(bad.as_uri(), tmp_path)
    assert console_errors(log), log[-2000:]
