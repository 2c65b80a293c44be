"""A wrong or empty secret (issue 21 walk, item 2).

An empty secret (an empty file, a file with only a newline, ``--secret ""``) is refused by every
command that takes one: one line on stderr, exit 2. A run whose responders answer TCP without
our token (another secret) says so on stderr: their UDP silence is not a firewall's.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from scanner.catalog import load_catalog
from scanner.engine.check import TokenWatch

PY = [sys.executable, "-m", "scanner"]

ENTRY = """
[[requirement]]
id = "{id}"
component = "lab"
proto = "{proto}"
ports = "{ports}"
description = "lab {proto}"
dst_role = "node"
src_roles = ["node"]
src_scope = "cluster"
"""


@pytest.mark.parametrize(
    "cmd",
    [
        ["check", "--hosts", "127.0.0.1"],
        ["scan", "-p", "1", "127.0.0.1"],
        ["mesh", "--hosts", "127.0.0.1"],
        ["respond", "-p", "1", "--ttl", "0.1"],
        ["watch"],
    ],
    ids=lambda c: c[0],
)
def test_an_empty_secret_is_one_line_exit_2(cmd: list[str], tmp_path: Path) -> None:
    empty, newline = tmp_path / "empty", tmp_path / "newline"
    empty.write_text("")
    newline.write_text("\n  \n")
    for opt in (["--secret-file", str(empty)], ["--secret-file", str(newline)], ["--secret="]):
        p = subprocess.run([*PY, *cmd, *opt], capture_output=True, text=True, timeout=60)
        assert p.returncode == 2, (opt, p.stdout, p.stderr)
        assert p.stderr.count("\n") == 1 and "secret is empty" in p.stderr, (opt, p.stderr)
        assert "Traceback" not in p.stderr


def test_token_watch_warns_only_when_no_answer_carried_the_token() -> None:
    w = TokenWatch()
    assert w.warning("x") is None  # no answer at all: nothing to say
    for _ in range(3):
        w({"proto": "tcp", "state": "open", "reason": "syn-ack"})
    w({"proto": "udp", "state": "open|filtered", "reason": "no-response"})
    msg = w.warning("portmesh check")
    assert msg is not None and msg.count("\n") == 1 and "another secret" in msg
    w({"proto": "tcp", "state": "open", "reason": "responder"})
    assert w.warning("portmesh check") is None


@pytest.mark.lab
def test_check_against_responders_with_another_secret_says_so(make_lab, tmp_path: Path) -> None:
    lab = make_lab(hosts=2)
    import yaml

    from scanner.lab.lab import inventory_doc

    inv = tmp_path / "inv.yml"
    inv.write_text(yaml.safe_dump(inventory_doc(lab), sort_keys=False))
    cat = tmp_path / "c.toml"
    text = "".join(f'[[requirement]]\nid = "{r.id}"\ndisabled = true\n\n' for r in load_catalog())
    text += ENTRY.format(id="lab.tcp", proto="tcp", ports="2380")
    text += ENTRY.format(id="lab.udp", proto="udp", ports="4789")
    cat.write_text(text)
    resp = lab.popen(
        "node2",
        [*PY, "respond", "-p", "2380,U:4789", "--secret", "right", "--ttl", "60"],
        stdout=subprocess.PIPE,
    )
    try:
        assert resp.stdout is not None and b'"ready"' in resp.stdout.readline()
        argv = [*PY, "check", "-i", str(inv), "--catalog", str(cat), "--from", "node1"]
        wrong = lab.run("node1", [*argv, "--secret", "wrong"], capture_output=True, text=True,
                        timeout=120)  # fmt: skip
        res = [r for r in map(orjson.loads, wrong.stdout.splitlines()) if r["type"] == "result"]
        got = {(r["proto"], r["state"], r["reason"]) for r in res}
        assert got == {("tcp", "open", "syn-ack"), ("udp", "open|filtered", "no-response")}, res
        warn = [x for x in wrong.stderr.splitlines() if "another secret" in x]
        assert len(warn) == 1 and "warning" in warn[0], wrong.stderr
        right = lab.run("node1", [*argv, "--secret", "right"], capture_output=True, text=True,
                        timeout=120)  # fmt: skip
        res = [r for r in map(orjson.loads, right.stdout.splitlines()) if r["type"] == "result"]
        assert {(r["proto"], r["reason"], r["verdict"]) for r in res} == {
            ("tcp", "responder", "pass"),
            ("udp", "responder", "pass"),
        }, res
        assert "another secret" not in right.stderr and right.returncode == 0
    finally:
        resp.kill()
        resp.wait()


@pytest.mark.lab
def test_mesh_over_responders_with_another_secret_says_so(lab_name: str) -> None:
    """The walk: a lab's responders (the lab's secret) hold every port, the mesh is given
    another secret: no TCP answer carries its token (stderr says the secrets differ), and the
    agents' responders find the holders' token is another secret's: UDP silence is unknown
    (responder-secret-mismatch), not fail. With the lab's secret: all pass."""
    import os

    from scanner.lab.netns import run_dir

    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    up = subprocess.run(["portmesh", "lab", "up", "--hosts", "2", "--name", lab_name],
                        capture_output=True, text=True, env=env, timeout=180)  # fmt: skip
    assert up.returncode == 0, up.stderr
    try:
        d = run_dir() / lab_name
        base = ["portmesh", "mesh", "-i", str(d / "inventory.yml"), "--exec",
                f"ip netns exec {lab_name}-{{name}}", "--nodeport-sample", "16"]  # fmt: skip
        p = subprocess.run([*base, "--secret", "another"], capture_output=True, text=True,
                           env=env, timeout=300)  # fmt: skip
        res = [r for r in map(orjson.loads, p.stdout.splitlines()) if r["type"] == "result"]
        tcp = [r for r in res if r["proto"] == "tcp" and r["state"] == "open"]
        assert tcp and all(r["reason"] == "syn-ack" for r in tcp)
        udp = [r for r in res if r["proto"] == "udp"]
        assert udp and all(r["state"] == "open|filtered" for r in udp), udp[:3]
        assert all(r["verdict"] == "unknown" for r in udp), udp[:3]
        assert all(r["verdict_reason"].startswith("responder-secret-mismatch: ") for r in udp)
        assert not [r for r in res if r["verdict"] == "fail"]
        warn = [x for x in p.stderr.splitlines() if "another secret" in x]
        assert len(warn) == 1 and warn[0].startswith("portmesh mesh: warning: "), p.stderr[-2000:]
        ok = subprocess.run([*base, "--secret-file", str(d / "secret")], capture_output=True,
                            text=True, env=env, timeout=300)  # fmt: skip
        assert ok.returncode == 0 and "another secret" not in ok.stderr, ok.stderr[-2000:]
    finally:
        subprocess.run(["portmesh", "lab", "down", "--name", lab_name], env=env, timeout=120)
