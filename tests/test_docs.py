"""The shell commands of README.md and docs/*.md, run as a user types them (issue 20).

Every ```sh block in those files carries a mark on the line just above its fence:

    <!-- docs-test: run -->               run every command line, in the sandbox below
    <!-- docs-test: run on NODE -->       the same, inside host NODE of the example lab
                                          (`ip netns exec docs507-NODE`): "on a cluster host"
    <!-- docs-test: file NAME -->         (any fence) write the block to NAME in the working folder
    <!-- docs-test: skip REASON -->       not run; REASON says why (installs software, needs ssh)

A ```sh block without a mark fails the test, so a new example is classified when it is written.
Inside a runnable block a command that needs ssh to real hosts (`ssh` in it, or a `portmesh
mesh` without `--exec`, whose default is ssh) is skipped and listed (SSH_RULE).

The sandbox: a new network, mount and PID namespace (`unshare`) with private /run/netns and
/run/portmesh, an /etc/hosts that names `node1.example`, and no route but the labs' own: nothing
a command sends can leave the machine, the labs and their processes die with the sandbox, and
lab names cannot clash with other runs, so the docs' own lab name `pm` is used as typed (no
placeholder). Before the docs' commands the test itself (not the docs) builds:

  - lab `pm` (4 hosts, responders), the lab the docs' `--exec 'ip netns exec pm-{name}'` names;
  - the example lab `docs507` (4 hosts, responders, node3 drops tcp/10250), whose name hashes
    to 198.18.0.0/24, so the docs' example addresses (`portmesh scan 198.18.0.2 ...`) are its
    hosts;
  - in the working folder: hosts.yml / hosts.yaml / inventory.yml (the example lab's
    inventory), hosts.txt (two of its addresses) and mesh.ndjson (a mesh of it).

A command passes when it exits 0 or 1 (1: the run found failures, as documented) and prints
no traceback. Run as: pytest tests/test_docs.py (root; skipped otherwise).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = ("README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")))
CMD_LINE = re.compile(
    r"^\s*(sudo\s+)?(\S*/)?portmesh\s+(scan|check|plan|mesh|report|lab|demo|respond|catalog|agent)\b(?!:)",
    re.M,
)
MARK = re.compile(r"^<!--\s*docs-test:\s*(run|skip|file)\b\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^```(\S*)")
SCAN_LAB = "docs507"  # subnet_index("docs507") == 0: 198.18.0.0/24, the docs' example addresses


@dataclass
class Block:
    doc: str
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    mark: str | None  # run | skip | file | None
    arg: str

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def blocks() -> list[Block]:
    out = []
    for doc in DOC_FILES:
        lines = (ROOT / doc).read_text().splitlines()
        i = 0
        while i < len(lines):
            m = FENCE.match(lines[i])
            if not m:
                i += 1
                continue
            start = i
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            prev = lines[start - 1] if start else ""
            mk = MARK.match(prev)
            out.append(
                Block(
                    doc,
                    start + 1,
                    m.group(1),
                    "\n".join(lines[start + 1 : j]) + "\n",
                    mk.group(1) if mk else None,
                    mk.group(2) if mk else "",
                )
            )
            i = j + 1
    return out


def commands(text: str) -> list[str]:
    """The command lines of a block: backslash continuations joined, blank and comment lines out."""
    out, cur = [], ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        cur += line
        if cur.strip() and not cur.lstrip().startswith("#"):
            out.append(cur.strip())
        cur = ""
    return out


def needs_ssh(cmd: str) -> bool:
    """SSH_RULE: the command reaches hosts over ssh (there is no sshd in the lab)."""
    if re.search(r"\bssh\b", cmd):
        return True
    return any(
        re.search(r"\bportmesh mesh\b", part) and "--exec" not in part for part in cmd.split("|")
    )


def test_every_shell_block_is_marked() -> None:
    unmarked = [b.where for b in blocks() if b.lang in ("sh", "bash", "shell") and b.mark is None]
    assert not unmarked, f"mark these blocks (<!-- docs-test: run|skip REASON -->): {unmarked}"
    bad = [b.where for b in blocks() if b.mark == "skip" and not b.arg]
    assert not bad, f"a skip mark needs a reason: {bad}"
    plain = [
        b.where for b in blocks() if b.lang == "" and CMD_LINE.search(b.text) and b.mark is None
    ]
    assert not plain, f"shell commands in a fence without a language (use ```sh): {plain}"


def test_check_examples_give_the_secret_by_file() -> None:
    """A secret on the command line is readable by every user of a shared host (ps): the
    docs' check examples show --secret-file, never --secret."""
    cmds = [
        c for b in blocks() if b.lang == "sh" for c in commands(b.text)
        if re.search(r"\bportmesh\s+check\b", c)
    ]  # fmt: skip
    assert any("--secret-file" in c for c in cmds), cmds
    assert not [c for c in cmds if re.search(r"--secret(\s|=)", c)]


def test_commands_parse() -> None:
    assert commands("a \\\n  b\n# c\n\nd  # e\n") == ["a    b", "d  # e"]
    assert needs_ssh("portmesh mesh -i inventory.yml --nodeport-sample 16 -o mesh.ndjson")
    assert needs_ssh("portmesh mesh --inventory hosts.yaml | portmesh report")
    assert not needs_ssh("portmesh mesh -i x --exec 'ip netns exec pm-{name}'")
    assert needs_ssh("portmesh mesh -i x --exec 'ssh -J b {address}'")


def _plan() -> tuple[list[dict], list[str]]:
    steps, skipped = [], []
    for b in blocks():
        if b.mark == "file":
            steps.append({"file": b.arg, "text": b.text, "where": b.where})
        if b.mark != "run":
            continue
        node = None
        if b.arg:
            m = re.fullmatch(r"on (\S+)", b.arg)
            assert m, f"{b.where}: bad run mark {b.arg!r} (want: run, or run on NODE)"
            node = m.group(1)
        for cmd in commands(b.text):
            if needs_ssh(cmd):  # SSH_RULE
                skipped.append(f"{b.where}: {cmd}")
                continue
            steps.append({"cmd": cmd, "node": node, "where": b.where})
    return steps, skipped


SETUP = [
    "portmesh lab up --name pm --hosts 4 > lab-pm.txt",
    # one fault, so that the report and fix examples have something to show (a node3 section)
    'printf \'faults:\\n  - {host: node3, direction: in, proto: tcp, ports: "10250", '
    "action: drop}\\n' > example-faults.yml",
    f"portmesh lab up --name {SCAN_LAB} --hosts 4 --faults example-faults.yml > lab-example.txt",
    "grep -q ' on 198.18.0.0/24' lab-example.txt",  # the docs' addresses are its hosts
    f"cp /run/portmesh/{SCAN_LAB}/inventory.yml inventory.yml && cp inventory.yml hosts.yml "
    "&& cp inventory.yml hosts.yaml",
    "printf '198.18.0.1\\n198.18.0.2  # two lab hosts\\n' > hosts.txt",
    f"portmesh mesh -i inventory.yml --exec 'ip netns exec {SCAN_LAB}-{{name}}' "
    f"--secret-file /run/portmesh/{SCAN_LAB}/secret --nodeport-sample 16 -o mesh.ndjson "
    "> /dev/null 2> mesh-setup.txt; grep -q 'node3 drops tcp/10250 from every peer' mesh-setup.txt",
]
TEARDOWN = [f"portmesh lab down --name {n}" for n in ("pm", SCAN_LAB)]


def sandbox_main(plan_file: str) -> int:
    """Inside the sandbox (PID 1 of its own namespace): set up, run every step, write results."""
    plan = json.loads(Path(plan_file).read_text())
    work = Path(plan["work"])
    for d in ("/run/netns", "/run/portmesh"):
        os.makedirs(d, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "portmesh-docs", d], check=True)
    hosts = work / "etc-hosts"
    hosts.write_text("127.0.0.1 localhost\n::1 localhost\n198.18.0.1 node1.example\n")
    subprocess.run(["mount", "--bind", str(hosts), "/etc/hosts"], check=True)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    # the guarantee behind running the docs as typed: no route out of this namespace
    routes = subprocess.run(["ip", "route", "show"], capture_output=True, text=True).stdout
    assert not routes.strip(), f"the sandbox has routes before the labs: {routes}"
    env = dict(os.environ, PATH=plan["bin"] + os.pathsep + os.environ.get("PATH", ""))
    results = []

    def sh(cmd: str, node: str | None = None, timeout: float = 300) -> dict:
        argv = ["bash", "-o", "pipefail", "-c", cmd]
        if node:
            argv = ["ip", "netns", "exec", f"{SCAN_LAB}-{node}", *argv]
        try:
            p = subprocess.run(argv, cwd=work, env=env, capture_output=True, timeout=timeout)
            rc, so, se = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:
            rc, so, se = -1, e.stdout or b"", (e.stderr or b"") + b"\n(timed out)"
        return {
            "cmd": cmd,
            "node": node,
            "rc": rc,
            "stdout": so.decode(errors="replace")[-2000:],
            "stderr": se.decode(errors="replace")[-3000:],
        }

    try:
        for cmd in SETUP:
            r = sh(cmd)
            r["where"] = "setup"
            results.append(r)
            if r["rc"] != 0:
                return 0
        routes = subprocess.run(
            ["ip", "-4", "route", "show"], capture_output=True, text=True
        ).stdout
        outside = [ln for ln in routes.splitlines() if not ln.startswith("198.18.")]
        if outside:  # every route must lead into a lab (198.18.0.0/15)
            results.append({"where": "setup", "cmd": "ip route", "rc": 99, "stdout": routes,
                            "stderr": "a route outside the labs", "node": None})  # fmt: skip
            return 0
        for step in plan["steps"]:
            if "file" in step:
                (work / step["file"]).write_text(step["text"])
                continue
            r = sh(step["cmd"], step["node"])
            r["where"] = step["where"]
            results.append(r)
    finally:
        for cmd in TEARDOWN:
            sh(cmd, timeout=60)
        (work / "results.json").write_text(json.dumps(results))
    return 0


def test_docs_commands(tmp_path: Path) -> None:
    from conftest import lab_skip_reason

    reason = lab_skip_reason() or (None if shutil.which("unshare") else "needs unshare")
    if reason:
        pytest.skip(reason)
    steps, skipped = _plan()
    assert steps, "no runnable commands found in the docs"
    plan = {"work": str(tmp_path), "bin": str(Path(sys.executable).parent), "steps": steps}
    pf = tmp_path / "plan.json"
    pf.write_text(json.dumps(plan))
    argv = ["unshare", "--net", "--mount", "--pid", "--fork", "--mount-proc",
            "--propagation", "private", sys.executable, __file__, "--sandbox", str(pf)]  # fmt: skip
    p = subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=1200)
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    bad = [r for r in results if r["rc"] not in (0, 1) or "Traceback" in r["stderr"]]
    setup_bad = [r for r in results if r["where"] == "setup" and r["rc"] != 0]
    # the setup mesh's summary goes to a file (its grep is the check): show it when it failed
    said = tmp_path / "mesh-setup.txt"
    assert not setup_bad, json.dumps(setup_bad, indent=1) + (
        f"\nmesh-setup.txt:\n{said.read_text()[-3000:]}" if said.exists() else ""
    )
    ran = [r for r in results if r["where"] != "setup"]
    assert len(ran) == sum(1 for s in steps if "cmd" in s)
    assert not bad, "\n\n".join(
        f"{r['where']}: {r['cmd']} -> exit {r['rc']}\nstdout: {r['stdout'][-800:]}\n"
        f"stderr: {r['stderr'][-1500:]}"
        for r in bad
    )
    print(f"ran {len(ran)} documented commands; skipped (ssh): {len(skipped)}")
    for s in skipped:
        print("  skipped:", s)


if __name__ == "__main__" and sys.argv[1:2] == ["--sandbox"]:
    sys.exit(sandbox_main(sys.argv[2]))
