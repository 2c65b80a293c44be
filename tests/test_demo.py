"""`portmesh demo` end to end: its NDJSON names exactly the injected faults (root: the lab;
without CAP_NET_ADMIN: the loopback story). The expected failures are written out here by hand
from the faults the demo documents, not taken from the demo's own ground truth."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import lab_skip_reason

NODEPORT_SLICE = range(30100, 30200)


def _failures(path: Path, af: str = "ipv4") -> set[tuple]:
    """The failing (req, src_host, host, proto, port) of one address family."""
    out = set()
    results = 0
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["type"] != "result":
            continue
        results += 1
        if rec["verdict"] == "fail" and rec["af"] == af:
            out.add((rec["req"], rec["src_host"], rec["host"], rec["proto"], rec["port"]))
    assert results > 1000
    return out


def _summaries(path: Path) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["type"] == "summary"]


def _timeless(text: str) -> str:
    return re.sub(r"\(\d+(\.\d+)?s\)", "(Ts)", text)


def _docs_demo_sample() -> str:
    """The sample of the demo's stderr summary in docs/mesh.md."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "mesh.md").read_text()
    i = doc.index("`portmesh demo` (the README's faults, on dual-stack hosts):\n\n```\n")
    i = doc.index("```\n", i) + 4
    return _timeless(doc[i : doc.index("\n```", i)])


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
    # over IPv6 (the lab is dual-stack, VXLAN checked over both families): the one-way VXLAN
    # fault (no family: both) and node4's IPv6-only VXLAN drop; nothing else
    want6 = {("calico.vxlan", "node2", "node3", "udp", 4789)}
    want6 |= {("calico.vxlan", src, "node4", "udp", 4789) for src in ("node1", "node2", "node3")}
    assert _failures(out, "ipv6") == want6
    for s in _summaries(out):
        assert s["planned"] == s["results"]
    assert "exactly the injected faults" in p.stderr
    # the report names the family: IPv4 VXLAN to node4 passes, IPv6 VXLAN to node4 fails
    assert "FAIL calico.vxlan over IPv6  udp/4789  4 of 12 directions fail" in p.stderr
    assert "FAIL calico.vxlan  udp/4789  1 of 12 directions fail" in p.stderr
    assert "WARNING" not in p.stderr  # IPv6 sources are the hosts' own (ip6), not "moved"
    # ... and so do the exports: fix commands per family, ECS network.type
    fix = subprocess.run([sys.executable, "-m", "scanner", "report", str(out), "--fix", "iptables"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert fix.returncode == 0, fix.stderr
    v6_rules = [x for x in fix.stdout.splitlines() if "run ip6tables" in x]
    assert len(v6_rules) == 2 and all("--dport 4789" in x for x in v6_rules), fix.stdout
    assert all(" -s 2001:2:" in x for x in v6_rules)
    ecs = subprocess.run([sys.executable, "-m", "scanner", "report", str(out), "--format", "ecs"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    failing6 = {
        (e["source"]["address"], e["destination"]["address"])
        for e in map(json.loads, ecs.stdout.splitlines())
        if e["event"]["outcome"] == "failure" and e["network"]["type"] == "ipv6"
    }
    assert failing6 == {(s, h) for _, s, h, _, _ in want6}
    # docs/mesh.md shows this run's stderr summary: it must be what the demo prints (the
    # elapsed time aside)
    assert _docs_demo_sample() == _timeless(p.stderr[p.stderr.index("portmesh mesh:"):]).split(
        "\nportmesh demo:"
    )[0].rstrip("\n"), "docs/mesh.md's demo sample differs from the demo's output"
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
    # one mesh, as the README describes (not one check per host): one run, pair records
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["type"] for r in recs].count("start") == 1 and "mesh" in recs[0]
    assert any(r["type"] == "pair" for r in recs)
    assert p.stdout == out.read_text()  # -o adds a copy; a pipe still gets the NDJSON
    want = {("etcd.peer", s, "node1", "tcp", 2380) for s in ("node2", "node3", "node4")}
    for src in ("node1", "node2", "node3"):
        for port in NODEPORT_SLICE:
            want.add(("k8s.nodeport", src, "node4", "tcp", port))
    assert _failures(out) == want


# ---- issue 20: the first hour ------------------------------------------------------------


@pytest.mark.skipif(lab_skip_reason() is not None, reason=lab_skip_reason() or "")
def test_demo_refuses_an_existing_lab(lab_name: str) -> None:
    """A kept lab (or another demo in progress) of the demo's name is never removed."""
    from scanner.lab.netns import Lab

    Lab.up(2, lab_name)
    p = subprocess.run(
        [sys.executable, "-m", "scanner", "demo", "--name", lab_name],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and "already exists" in p.stderr, p.stderr
    assert "--name" in p.stderr
    assert Lab.load(lab_name).status()["hosts"][0]["present"]  # still there
    bad = subprocess.run([sys.executable, "-m", "scanner", "demo", "--name", "a b"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "bad lab name" in bad.stderr


def _on_a_terminal(argv: list[str], timeout: float = 180) -> tuple[int, str]:
    """Run argv with stdout and stderr on a pseudo-terminal; (exit code, what the terminal got)."""
    import pty
    import select

    master, slave = pty.openpty()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([master], [], [], 0.5)
        if r:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif p.poll() is not None:
            break
    os.close(master)
    code = p.wait(timeout=30)
    return code, b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


@pytest.mark.skipif(lab_skip_reason() is not None, reason=lab_skip_reason() or "")
def test_demo_on_a_terminal_fits_one_screen(tmp_path: Path) -> None:
    """On a tty: the story and the report, no NDJSON, at most 40 lines; -o FILE still a copy."""
    out = tmp_path / "copy.ndjson"
    code, screen = _on_a_terminal([sys.executable, "-m", "scanner", "demo", "--name",
                                   f"d{os.getpid() & 0xFFFF:x}", "-o", str(out)])  # fmt: skip
    assert code == 0, screen[-3000:]
    lines = screen.rstrip("\n").splitlines()
    assert len(lines) <= 40, screen
    assert '{"type"' not in screen
    for fault in ("node1 drops tcp/2380 from every peer", "one-way: node2 -> node3 udp/4789",
                  "node4 rejects tcp/30100-30199 from every peer", "node2 drops ipip",
                  "FAIL calico.vxlan over IPv6", "node4 in udp 4789 (IPv6 only): drop"):
        assert fault in screen, (fault, screen)
    assert "exactly the injected faults" in screen and f"in {out}" in screen
    assert len(_summaries(out)) == 1
