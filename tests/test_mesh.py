"""`portmesh mesh` / `portmesh agent` on real lab hosts, and the agent's control protocol.

Lab tests: a 6-host lab with one-way and two-way faults in TCP, UDP, ICMP and IP-in-IP
(nftables via scanner.lab.nft); every flow's state and verdict and every pair verdict must equal
the ground truth of ``truth.expected`` exactly, run after run. A host whose exec fails is
reported and owes nothing; a killed coordinator leaves nothing running or listening.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import orjson
import pytest
import yaml

from scanner.catalog import load_catalog
from scanner.core.flows import Flow
from scanner.engine.output import NdjsonOutput
from scanner.lab.faults import Fault
from scanner.lab.truth import expected
from scanner.mesh.agent import PROTOCOL_VERSION, site_from_wire, site_to_wire
from scanner.mesh.coordinator import (
    MeshConfig,
    Window,
    flows_of,
    per_source_counts,
    responder_ports,
    run_mesh,
)
from scanner.mesh.pairs import pair_verdict
from scanner.mesh.transport import check_template, command_argv, render
from scanner.plan.selection import SelectionOptions

AGENT_CMD = f"{sys.executable} -m scanner agent"
TCP_PORTS = "2380,7000"
UDP_PORT = 5000
HAVE = {
    p: importlib.util.find_spec(f"scanner.probes.{p}") is not None for p in ("udp", "icmp", "ipip")
}


# ---- pure pieces ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "name", "address", "user", "want"),
    [
        ("ip netns exec pm-{name}", "node1", "198.18.0.1", None, ["ip", "netns", "exec", "pm-node1"]),
        ("ssh -o BatchMode=yes {user}@{address}", "n", "198.18.0.9", "ops",
         ["ssh", "-o", "BatchMode=yes", "ops@198.18.0.9"]),
        # a value never becomes a second word
        ("run {name}", "a b;rm", "x", None, ["run", "a b;rm"]),
    ],
)  # fmt: skip
def test_render_template(template, name, address, user, want) -> None:
    assert render(template, name, address, user) == want


@pytest.mark.parametrize("bad", ["", "ssh {host}", "ssh 'unterminated", "x {}"])
def test_bad_templates_are_input_errors(bad: str) -> None:
    from scanner.errors import InputError

    with pytest.raises(InputError):
        check_template(bad)


def test_ssh_gets_one_quoted_word_other_programs_the_words() -> None:
    agent = [sys.executable, "-c", "print('a b')"]
    assert command_argv(["ip", "netns", "exec", "x"], agent) == ["ip", "netns", "exec", "x", *agent]
    ssh = command_argv(["ssh", "h"], agent)
    assert ssh[:2] == ["ssh", "h"] and len(ssh) == 3
    import shlex

    assert shlex.split(ssh[2]) == agent  # what the remote shell will see


def test_window_tracks_owed_indexes() -> None:
    w = Window()
    for i in (2, 0, 5, 1, 3):
        assert w.add(i)
    assert not w.add(3)  # duplicate
    assert w.low == 4 and (w.starts, w.ends) == ([5], [6])
    assert [i for i in range(8) if i not in w] == [4, 6, 7]


def test_window_runs_agree_with_a_set_of_indexes() -> None:
    """Window keeps runs; a plain set of indexes is the oracle, over random adds and claims
    (a claim marks all of its runs or none of them)."""
    rng = random.Random(16)
    for _ in range(2000):
        w, seen, n = Window(), set(), rng.randint(1, 60)
        for _ in range(rng.randint(1, 60)):
            if rng.random() < 0.5:
                i = rng.randrange(n)
                assert w.add(i) == (i not in seen)
                seen.add(i)
            else:
                runs = [
                    x
                    for _ in range(rng.randint(1, 3))
                    for x in (rng.randrange(n), rng.randint(1, 5))
                ]
                idx = [
                    i for j in range(0, len(runs), 2) for i in range(runs[j], runs[j] + runs[j + 1])
                ]
                ok = len(set(idx)) == len(idx) and not set(idx) & seen
                assert w.claim(runs) == ok, (runs, sorted(seen))
                if ok:
                    seen |= set(idx)
            assert [i for i in range(n + 6) if i in w] == sorted(seen)
            assert w.low == min(set(range(n + 7)) - seen)
            assert all(a < b for a, b in zip(w.starts, w.ends, strict=True))
            assert all(b < a for b, a in zip(w.ends, w.starts[1:], strict=False))  # never touching


def test_site_round_trips_through_the_wire(tmp_path: Path) -> None:
    inv = Path(__file__).parent / "data" / "inventories" / "kubespray-hosts.yml"
    catalog, site, selection = SelectionOptions(inventories=(str(inv),)).resolve()
    back = site_from_wire(orjson.loads(orjson.dumps(site_to_wire(site))))
    from scanner.plan.planner import plan

    assert list(plan(catalog, back, selection)) == list(plan(catalog, site, selection))


def test_per_source_counts_sum_to_the_plan() -> None:
    inv = Path(__file__).parent / "data" / "inventories" / "kubespray-hosts.yml"
    opts = SelectionOptions(inventories=(str(inv),), nodeport_sample=3)
    catalog, site, selection = opts.resolve()
    names = frozenset(h.name for h in site.hosts())
    sel = dataclasses.replace(selection, sources=names)
    counts = per_source_counts(catalog, site, sel)
    cfg = MeshConfig(catalog, site, selection)
    for name in names:
        assert counts[name] == sum(1 for _ in flows_of(cfg, name)), name
    ports = responder_ports(catalog, site, sel)
    assert ports  # every destination host knows its ports
    assert all("30000" in tcp for tcp, _ in ports.values() if "30000" in tcp)


# ---- the agent's protocol: garbage never kills it -------------------------------------------


def _garbage(rng: random.Random) -> bytes:
    kind = rng.randrange(8)
    if kind == 0:
        return bytes(rng.randrange(1, 256) for _ in range(rng.randrange(1, 200))).replace(
            b"\n", b"x"
        )
    if kind == 1:
        return orjson.dumps({"type": "hello", "version": PROTOCOL_VERSION})[: rng.randrange(1, 30)]
    if kind == 2:
        return orjson.dumps(rng.choice([1, "x", None, [1, 2], 3.5, True]))
    if kind == 3:
        return orjson.dumps({"type": rng.choice(["nope", 7, None, "HELLO", ""])})
    if kind == 4:  # well-formed types with wrong fields
        return orjson.dumps(
            rng.choice(
                [
                    {"type": "respond", "tcp": "99999", "udp": ""},
                    {"type": "respond", "tcp": ["80"]},
                    {"type": "respond", "ttl": -1},
                    {"type": "probe"},
                    {"type": "probe", "scan_id": "x", "site": {"clusters": [{"hosts": 5}]}},
                    {"type": "probe", "scan_id": 5},
                    {"type": "hello", "version": "1", "secret": "s", "name": "n"},
                    {"type": "hello", "version": 99, "secret": "s", "name": "n"},
                    {"type": "hello", "version": PROTOCOL_VERSION, "secret": "", "name": "n"},
                ]
            )
        )
    if kind == 5:
        return b"{" * rng.randrange(1, 5000)
    if kind == 6:
        return orjson.dumps({"type": "probe", "scan_id": "s", "site": {"clusters": "x"}})
    return "\u00e9\u2603".encode() * rng.randrange(1, 50)


def test_agent_survives_seeded_garbage_and_answers_each_line() -> None:
    rng = random.Random(20261126)
    lines = [_garbage(rng) for _ in range(300)]
    # a valid hello in the middle; garbage after it must still be refused, also out of order
    hello = {"type": "hello", "version": PROTOCOL_VERSION, "secret": "s", "name": "n1"}
    lines.insert(150, orjson.dumps(hello))
    lines += [orjson.dumps(hello)]
    p = subprocess.run(
        [sys.executable, "-m", "scanner", "agent"],
        input=b"\n".join(lines) + b"\n" + orjson.dumps({"type": "stop"}) + b"\n",
        capture_output=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    recs = [orjson.loads(x) for x in p.stdout.splitlines()]
    errors = [r for r in recs if r["type"] == "error"]
    hellos = [r for r in recs if r["type"] == "hello"]
    assert len(hellos) == 1 and hellos[0]["version"] == PROTOCOL_VERSION
    assert len(errors) == len(lines) - 1  # every line but the one good hello was refused
    assert all(isinstance(e["reason"], str) and e["reason"] for e in errors)
    assert any("out of order: hello was already received" in e["reason"] for e in errors)
    assert any("before hello" in e["reason"] for e in errors)
    assert b"Traceback" not in p.stderr


def test_agent_refuses_an_over_long_line_and_goes_on() -> None:
    from scanner.mesh import agent

    big = b"x" * (agent.MAX_LINE + 10)
    p = subprocess.run(
        [sys.executable, "-m", "scanner", "agent"],
        input=big + b"\n" + orjson.dumps({"type": "stop"}) + b"\n",
        capture_output=True,
        timeout=60,
    )
    recs = [orjson.loads(x) for x in p.stdout.splitlines()]
    assert p.returncode == 0
    assert [r["type"] for r in recs] == ["error"]
    assert "longer than" in recs[0]["reason"]


# ---- the lab --------------------------------------------------------------------------------

FAULTS = [
    # TCP: one-way (node3 -> node2 on 7000 dropped), two-way on 2380 between node4 and node5
    Fault("node2", "in", "tcp", ((7000, 7000),), "drop", "node3"),
    Fault("node4", "in", "tcp", ((2380, 2380),), "reject", "node5"),
    Fault("node5", "in", "tcp", ((2380, 2380),), "reject-admin", "node4"),
    # UDP: one-way node1 -> node6 (sender side), two-way node3 <-> node4
    Fault("node1", "out", "udp", ((UDP_PORT, UDP_PORT),), "drop", "node6"),
    Fault("node3", "in", "udp", ((UDP_PORT, UDP_PORT),), "drop", "node4"),
    Fault("node3", "out", "udp", ((UDP_PORT, UDP_PORT),), "reject", "node4"),
    # ICMP: one-way node6 -> node5, two-way node2 <-> node4
    Fault("node5", "in", "icmp", None, "drop", "node6"),
    Fault("node2", "in", "icmp", None, "reject-admin", "node4"),
    Fault("node4", "in", "icmp", None, "drop", "node2"),
    # IP-in-IP: one-way node1 -> node6, two-way node3 <-> node5
    Fault("node6", "in", "ipip", None, "drop", "node1"),
    Fault("node3", "in", "ipip", None, "reject-admin", "node5"),
    Fault("node3", "out", "ipip", None, "drop", "node5"),
]

CATALOG_ENTRY = """
[[requirement]]
id = "{id}"
component = "lab"
proto = "{proto}"
{ports}description = "lab {proto}"
dst_role = "node"
src_roles = ["node"]
"""


def lab_catalog(path: Path, protos: list[str]) -> Path:
    """Only our lab requirements: every packaged one disabled."""
    text = "".join(f'[[requirement]]\nid = "{r.id}"\ndisabled = true\n\n' for r in load_catalog())
    for proto in protos:
        ports = {"tcp": TCP_PORTS, "udp": str(UDP_PORT)}.get(proto)
        text += CATALOG_ENTRY.format(
            id=f"lab.{proto}", proto=proto, ports=f'ports = "{ports}"\n' if ports else ""
        )
    path.write_text(text)
    return path


def write_inventory(lab, path: Path, ghost: str | None = None) -> Path:
    from scanner.lab.lab import inventory_doc

    doc = inventory_doc(lab)
    if ghost is not None:  # a host with no namespace: its exec fails
        addr = str(lab.hosts[-1].addr).rsplit(".", 1)[0] + ".200"
        doc["all"]["hosts"][ghost] = {"ansible_host": addr, "ip": addr, "access_ip": addr}
        doc["all"]["children"]["kube_node"]["hosts"][ghost] = None
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def mesh(
    lab, inv: Path, catalog: Path | None, tmp: Path, agent_cmd: str | None = None, **kw
) -> tuple[int, list[dict], str]:
    opts = SelectionOptions(
        inventories=(str(inv),), catalog_files=(str(catalog),) if catalog else (), **kw
    )
    cat, site, selection = opts.resolve()
    out_path = tmp / f"mesh-{time.monotonic_ns()}.ndjson"
    err = io.StringIO()
    code = run_mesh(
        MeshConfig(
            catalog=cat,
            site=site,
            selection=selection,
            exec_template=lab.exec_template(),
            agent_cmd=agent_cmd or AGENT_CMD,
            output=NdjsonOutput(str(out_path), stdout=False),
            summary_to=err,
            loop="asyncio",
        )
    )
    recs = [orjson.loads(x) for x in out_path.read_bytes().splitlines()]
    return code, recs, err.getvalue()


@pytest.fixture(scope="module")
def faulted_lab(module_lab):
    lab = module_lab(hosts=6)
    lab.apply_faults(FAULTS)
    return lab


def _truth(recs: list[dict], lab) -> tuple[dict, dict]:
    """Per flow and per pair: the expected verdicts from scanner.lab.truth."""
    flows = {}
    dirs: dict[tuple, set] = defaultdict(set)
    for r in recs:
        if r["type"] != "result":
            continue
        f = Flow(r["dst"], r["port"], r["proto"], r["host"], r["src"], r["src_host"], r["req"])
        e = expected(f, FAULTS, lab)
        flows[(r["src_host"], r["host"], r["proto"], r["port"])] = (e.state, e.verdict)
        dirs[(r["req"], r["src_host"], r["host"])].add(e.verdict)
    pairs = {}
    for (req, a, b), vs in dirs.items():
        if a < b and (req, b, a) in dirs:
            va = "fail" if "fail" in vs else "pass"
            vb = "fail" if "fail" in dirs[(req, b, a)] else "pass"
            pairs[(req, a, b)] = pair_verdict(va, vb)
    return flows, pairs


@pytest.mark.lab
@pytest.mark.parametrize("protos", [["tcp", "udp"], ["icmp", "ipip"]], ids=["tcp+udp", "icmp+ipip"])
def test_mesh_equals_ground_truth(faulted_lab, tmp_path: Path, protos: list[str]) -> None:
    missing = [p for p in protos if p in HAVE and not HAVE[p]]
    if missing:
        pytest.skip(f"no probe module for {', '.join(missing)} in this tree yet")
    lab = faulted_lab
    inv = write_inventory(lab, tmp_path / "inv.yml")
    cat = lab_catalog(tmp_path / "lab.toml", protos)
    for run in range(2):  # exact, and stays exact
        code, recs, err = mesh(lab, inv, cat, tmp_path)
        results = [r for r in recs if r["type"] == "result"]
        summary = recs[-1]
        assert recs[0]["type"] == "start" and summary["type"] == "summary"
        assert summary["planned"] == summary["results"] == len(results) == recs[0]["planned"]
        flows, pairs = _truth(recs, lab)
        got = {
            (r["src_host"], r["host"], r["proto"], r["port"]): (r["state"], r["verdict"])
            for r in results
        }
        wrong = {k: (got[k], flows[k]) for k in flows if got[k] != flows[k]}
        assert not wrong, f"run {run}: {len(wrong)} flows differ (got, expected): {wrong}"
        got_pairs = {(p["req"], p["a"], p["b"]): p["verdict"] for p in recs if p["type"] == "pair"}
        assert got_pairs == pairs, f"run {run}"
        # the faults made both kinds of pair failure, in every protocol of the run
        for proto in protos:
            kinds = {v for (req, _, _), v in pairs.items() if req == f"lab.{proto}"}
            assert {"one-way", "fail", "pass"} <= kinds, (proto, kinds)
        assert code == 1
        assert summary["pairs"]["one-way"] == sum(v == "one-way" for v in pairs.values())
        _assert_summary_is_the_report(recs, err, tmp_path)


@pytest.mark.lab
def test_unreachable_host_is_reported_and_owes_every_flow(faulted_lab, tmp_path: Path) -> None:
    lab = faulted_lab
    inv = write_inventory(lab, tmp_path / "inv.yml", ghost="ghost")
    cat = lab_catalog(tmp_path / "lab.toml", ["tcp"])
    code, recs, err = mesh(lab, inv, cat, tmp_path)
    hosts = [r for r in recs if r["type"] == "host"]
    assert [(h["name"], h["state"]) for h in hosts] == [("ghost", "unreachable")]
    assert "ghost" in hosts[0]["reason"] or "netns" in hosts[0]["reason"].lower()
    results = [r for r in recs if r["type"] == "result"]
    summary = recs[-1]
    assert summary["planned"] == summary["results"] == len(results)
    per_src = defaultdict(int)
    for r in results:
        per_src[r["src_host"]] += 1
    ghost_out = [r for r in results if r["src_host"] == "ghost"]
    n = len(lab.hosts)  # every host has n peers: n - 1 lab hosts and ghost (ghost: the n)
    assert len(ghost_out) == n * 2  # n peers x 2 ports, every one owed and emitted
    assert all(r["state"] == "error" and r["verdict"] == "unknown" for r in ghost_out)
    assert all(r["reason"].startswith("agent unreachable: ") for r in ghost_out)
    # everyone else completed: one result per planned flow, and ghost's pairs are undecided
    assert all(per_src[h.name] == n * 2 for h in lab.hosts)
    pairs = [p for p in recs if p["type"] == "pair" and "ghost" in (p["a"], p["b"])]
    assert pairs and all(p["verdict"] == "unknown" for p in pairs)
    assert summary["hosts"]["unreachable"] == ["ghost"]
    assert code == 1 and "unreachable: ghost (" in err
    _assert_summary_is_the_report(recs, err, tmp_path)


@pytest.mark.lab
def test_a_line_broken_on_the_agents_stdout_is_said_and_owed(
    faulted_lab, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Something else writing into an agent's stdout (a wrapper, a shell profile) breaks a
    result line: its flow is owed as unknown, never lost, and stderr says why."""
    lab = faulted_lab
    inv = write_inventory(lab, tmp_path / "inv.yml")
    cat = lab_catalog(tmp_path / "lab.toml", ["tcp"])
    first = lab.hosts[0].name
    # the first result line of the first host's agent gets a prefix
    wrap = tmp_path / "wrap.py"
    wrap.write_text(
        "import os, subprocess, sys\n"
        "me = subprocess.run(['ip', 'netns', 'identify', str(os.getpid())],\n"
        "                    capture_output=True, text=True).stdout.strip()\n"
        f"hit = me != {lab.hosts[0].ns!r}\n"
        f"p = subprocess.Popen({AGENT_CMD.split()!r}, stdout=subprocess.PIPE)\n"
        "for line in iter(p.stdout.readline, b''):\n"
        '    if not hit and line.startswith(b\'{"type":"result"\'):\n'
        "        line, hit = b'banner ' + line, True\n"
        "    os.write(1, line)\n"
        "sys.exit(p.wait())\n"
    )
    code, recs, err = mesh(lab, inv, cat, tmp_path, agent_cmd=f"{sys.executable} {wrap}")
    summary = recs[-1]
    assert summary["planned"] == summary["results"]  # nothing lost
    owed = [r for r in recs if r["type"] == "result" and r["reason"].startswith("the agent ended")]
    assert [r["src_host"] for r in owed] == [first] and owed[0]["verdict"] == "unknown"
    said = capfd.readouterr().err
    assert f"{first}: 1 line(s) on the agent's stdout were not agent records" in said


def _assert_summary_is_the_report(recs: list[dict], err: str, tmp: Path) -> None:
    """Issue 20: the mesh's stderr summary is `portmesh report`'s text of the same run: the
    same grouping ("node3 drops ... from every peer", one-way lines), the same matrix."""
    from scanner.report import ReportConfig, run_report

    f = tmp / f"report-{time.monotonic_ns()}.ndjson"
    f.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    buf = io.BytesIO()
    run_report(ReportConfig(inputs=[str(f)]), buf, io.StringIO())
    report = buf.getvalue().decode().splitlines()
    assert report[2].startswith("run ")  # header, blank, the run line: the mesh prints totals
    assert err.splitlines()[1:] == report[3:], "\n".join(["MESH:", err, "REPORT:", *report])


def _lab_leftovers(lab) -> list[str]:
    from scanner.lab.netns import netns_pids

    left = []
    for h in lab.hosts:
        pids = netns_pids(h.ns)
        if pids:
            left.append(f"{h.name}: pids {pids}")
        ss = lab.run(h.name, ["ss", "-Htuln"], capture_output=True, text=True).stdout.strip()
        if ss:
            left.append(f"{h.name}: listening {ss.splitlines()[:3]}")
    return left


@pytest.mark.lab
def test_killed_coordinator_leaves_nothing_behind(make_lab, tmp_path: Path) -> None:
    lab = make_lab(hosts=3)
    inv = write_inventory(lab, tmp_path / "inv.yml")
    # the full catalog with the whole NodePort range at a low total rate: a long probe phase
    p = subprocess.Popen(
        [sys.executable, "-m", "scanner", "mesh", "-i", str(inv), "--exec", lab.exec_template(),
         "--agent-cmd", AGENT_CMD, "--rate", "60", "--loop", "asyncio"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert p.stdout is not None
        seen = 0
        for line in p.stdout:
            if b'"type":"result"' in line:
                seen += 1
                if seen >= 5:
                    break
        assert seen >= 5, "the mesh never started probing"
        # agents and their responders are up and listening right now
        assert all(lab.run(h.name, ["ss", "-Htln"], capture_output=True, text=True).stdout
                   for h in lab.hosts)  # fmt: skip
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
    deadline = time.monotonic() + 5.0
    left = _lab_leftovers(lab)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = _lab_leftovers(lab)
    assert not left, left


@pytest.mark.lab
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_sigint_stops_the_mesh_with_a_summary(make_lab, tmp_path: Path, loop: str) -> None:
    lab = make_lab(hosts=3)
    inv = write_inventory(lab, tmp_path / "inv.yml")
    p = subprocess.Popen(
        [sys.executable, "-m", "scanner", "mesh", "-i", str(inv), "--exec", lab.exec_template(),
         "--agent-cmd", AGENT_CMD, "--rate", "60", "--loop", loop],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert p.stdout is not None
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.count(b'"type":"result"') and len(lines) > 5:
            break
    p.send_signal(signal.SIGINT)
    rest = p.stdout.read()  # the buffered reader still holds lines: read through it
    err = p.stderr.read() if p.stderr else b""
    p.wait(timeout=60)
    recs = [orjson.loads(x) for x in b"".join(lines + [rest]).splitlines()]
    assert p.returncode == 130, err.decode()[-1000:]
    summary = recs[-1]
    assert summary["type"] == "summary" and summary.get("interrupted") is True
    results = [r for r in recs if r["type"] == "result"]
    assert summary["planned"] == summary["results"] == len(results)
    assert any(r["reason"] == "interrupted" for r in results)
    deadline = time.monotonic() + 5.0
    while _lab_leftovers(lab) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _lab_leftovers(lab)


@pytest.mark.lab
def test_bundle_runs_the_agent_from_copied_wheels(make_lab, tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    cp = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels),
         str(Path(__file__).parent.parent)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if cp.returncode != 0:
        pytest.skip(f"cannot build the portmesh wheel here: {cp.stderr.strip()[-200:]}")
    lab = make_lab(hosts=2)
    inv = write_inventory(lab, tmp_path / "inv.yml")
    cat = lab_catalog(tmp_path / "lab.toml", ["tcp"])
    out = tmp_path / "out.ndjson"
    cp = subprocess.run(
        [sys.executable, "-m", "scanner", "mesh", "-i", str(inv), "--catalog", str(cat),
         "--exec", lab.exec_template(), "--bundle", str(wheels),
         "--bundle-python", sys.executable, "-o", str(out)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert cp.returncode == 0, cp.stderr[-2000:]
    summary = orjson.loads(out.read_bytes().splitlines()[-1])
    assert summary["planned"] == summary["results"] == 4
    for agent in summary["agents"].values():
        # the agent ran from the unpacked bundle, not from this checkout
        assert "/portmesh-bundle-" in agent["module"], agent
        # how each agent probed TCP, and the run's one method (it was null when every TCP
        # flow was a token sample)
        assert agent["tcp_method"] == summary.get("tcp_method") in ("syn", "connect"), agent
    leftovers = [
        p for p in Path("/tmp").glob("portmesh-bundle-*") if p.stat().st_mtime > time.time() - 120
    ]
    assert not leftovers  # the bootstrap removed its temporary directory


# ---- issue 20: the first hour ------------------------------------------------------------


def test_local_template_runs_this_interpreter_others_portmesh_agent() -> None:
    from scanner.mesh.transport import agent_words, start_hint

    local = agent_words(["ip", "netns", "exec", "pm-node1"], None)
    assert local == [sys.executable, "-m", "scanner", "agent"]
    assert agent_words(["ssh", "-o", "BatchMode=yes", "h"], None) == ["portmesh", "agent"]
    assert agent_words(["kubectl", "exec", "-i", "p", "--"], None) == ["portmesh", "agent"]
    # an explicit --agent-cmd always wins
    assert agent_words(["ip", "netns", "exec", "x"], "/opt/pm/bin/portmesh agent") == [
        "/opt/pm/bin/portmesh",
        "agent",
    ]
    hint = start_hint(["ssh", "h"], ["portmesh", "agent"], 127, "bash: portmesh: command not found")
    assert "--agent-cmd" in hint and "--bundle" in hint
    # ssh's own failures are not about the agent: no hint
    assert (
        start_hint(["ssh", "h"], ["portmesh", "agent"], 255, "Permission denied (publickey)") == ""
    )
    assert "--agent-cmd" in start_hint(
        ["ip", "netns", "exec", "x"], ["portmesh", "agent"], 255, 'exec of "portmesh" failed'
    )
    assert start_hint(["ssh", "h"], ["portmesh", "agent"], 1, "agent error: boom") == ""


def test_mesh_help_lists_only_what_mesh_takes() -> None:
    cp = subprocess.run(
        [sys.executable, "-m", "scanner", "mesh", "--help"], capture_output=True, text=True
    )
    assert cp.returncode == 0
    for gone in ("--source", "--workers"):
        assert gone not in cp.stdout, gone
    for kept in ("--concurrency", "--rate", "--exec", "--agent-cmd", "--method", "--secret-file"):
        assert kept in cp.stdout, kept
    cp = subprocess.run(
        [sys.executable, "-m", "scanner", "mesh", "--hosts", "127.0.0.2", "--workers", "2"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert cp.returncode == 2 and "No such option '--workers'" in cp.stderr
    scan = subprocess.run(
        [sys.executable, "-m", "scanner", "scan", "--help"], capture_output=True, text=True
    )
    assert "--workers" in scan.stdout and "--secret-file" in scan.stdout


@pytest.mark.lab
def test_mesh_from_an_unactivated_venv(make_lab, tmp_path: Path) -> None:
    """README: `.venv/bin/portmesh mesh ... --exec 'ip netns exec ...'` with no venv on PATH."""
    lab = make_lab(hosts=2)
    inv = write_inventory(lab, tmp_path / "inv.yml")
    cat = lab_catalog(tmp_path / "lab.toml", ["tcp"])
    out = tmp_path / "out.ndjson"
    exe = Path(sys.executable).parent / "portmesh"
    if not exe.exists():
        pytest.skip("no portmesh console script next to this interpreter")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"  # no venv, no portmesh on PATH
    cp = subprocess.run(
        [str(exe), "mesh", "-i", str(inv), "--catalog", str(cat), "--exec", lab.exec_template(),
         "-o", str(out)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert cp.returncode == 0, cp.stderr[-2000:]
    recs = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    assert recs[-1]["planned"] == recs[-1]["results"] == 4
    assert recs[-1]["hosts"]["unreachable"] == []
    agent = recs[0]["mesh"]["agent_cmd"]  # the console script's own interpreter
    assert agent.startswith(str(exe.parent)) and agent.endswith(" -m scanner agent"), agent


def test_the_docs_name_the_protocol_version_the_agent_speaks() -> None:
    """docs/mesh.md's protocol section and the agent's docstring say the version the agent
    checks in ``hello`` (a coordinator of another version is refused: the docs must agree)."""
    import re

    from scanner.mesh import agent
    from scanner.mesh.agent import PROTOCOL_VERSION

    doc = (Path(__file__).parents[1] / "docs" / "mesh.md").read_text()
    assert re.findall(r"## The agent protocol \(version (\d+)\)", doc) == [str(PROTOCOL_VERSION)]
    assert re.findall(r"`hello` \| `version` \((\d+)[;)]", doc) == [str(PROTOCOL_VERSION)]
    assert f"(protocol version {PROTOCOL_VERSION})" in (agent.__doc__ or "")


@pytest.mark.lab
def test_an_agents_unreadable_records_end_the_run_not_hang_it(faulted_lab, tmp_path: Path) -> None:
    """--emit failures: one agent's ``done`` says ``tally_groups: 5``, another's result line
    names a list as its requirement. The run ends (it used to wait for ever: the agent's
    reader died of the TypeError), every planned flow is a line or a tally, and no traceback."""
    lab = faulted_lab
    inv = write_inventory(lab, tmp_path / "inv.yml")
    cat = lab_catalog(tmp_path / "lab.toml", ["tcp"])
    a, b = lab.hosts[0], lab.hosts[2]  # node3 has a failing flow: a result line
    wrap = tmp_path / "wrap.py"
    wrap.write_text(
        "import ctypes, os, subprocess, sys\n"
        "import orjson\n"
        "me = subprocess.run(['ip', 'netns', 'identify', str(os.getpid())],\n"
        "                    capture_output=True, text=True).stdout.strip()\n"
        "die = lambda: ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG: SIGKILL\n"
        f"p = subprocess.Popen({AGENT_CMD.split()!r}, stdout=subprocess.PIPE, preexec_fn=die)\n"
        "for line in iter(p.stdout.readline, b''):\n"
        f'    if me == {a.ns!r} and line.startswith(b\'{{"type":"done"\'):\n'
        "        line = orjson.dumps({**orjson.loads(line), 'tally_groups': 5}) + b'\\n'\n"
        f'    if me == {b.ns!r} and line.startswith(b\'{{"type":"result"\'):\n'
        "        line = orjson.dumps({**orjson.loads(line), 'req': ['x']}) + b'\\n'\n"
        "    os.write(1, line)\n"
        "sys.exit(p.wait())\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "scanner", "mesh", "-i", str(inv), "--catalog", str(cat),
         "--exec", lab.exec_template(), "--agent-cmd", f"{sys.executable} {wrap}",
         "--emit", "failures", "--loop", "asyncio", "--no-progress"],
        capture_output=True, timeout=90,
    )  # fmt: skip
    recs = [orjson.loads(x) for x in r.stdout.splitlines()]
    summary = recs[-1]
    assert summary["type"] == "summary" and r.returncode == 1, r.stderr[-2000:]
    assert summary["results"] + summary["tallied"] == summary["planned"]  # nothing lost
    results = [x for x in recs if x["type"] == "result"]
    owed_a = [x for x in results if x["src_host"] == a.name and x["verdict"] == "unknown"]
    assert owed_a and not [x for x in recs if x["type"] == "tally" and x["src_host"] == a.name]
    err = r.stderr.decode()
    assert f"unreachable: {b.name} (a record of the agent could not be read" in err, err
    assert "Traceback (most recent call last)" not in err.split("Exception ignored")[0]
