"""Issue 19, items 5-8 and 10: every verdict of the mesh, check and lab true.

- item 5: host names that repeat across clusters (Kubean's node1, node2 in every cluster) are
  told apart everywhere: the site, ``--from``, the plan, one mesh agent per host, pair records;
- item 6: a reset from a port the destination's responder could not bind (a service on
  127.0.0.1 holds it) proves the path open: pass, not one-way; a firewall drop still fails;
- item 7: the lab recipe exactly as docs/mesh.md shows it gives no false failure;
- item 8: ``check --from NAME`` run on another machine records the address packets left from;
- item 10: ``lab up``'s total counts every planned flow (pass + fail + unknown).

Lab tests use real network namespaces, nftables and sockets (tests/conftest.py fixtures).
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import orjson
import pytest

from scanner.catalog import load_catalog
from scanner.core.flows import Flow
from scanner.engine.output import NdjsonOutput
from scanner.errors import InputError
from scanner.lab.faults import Fault
from scanner.lab.truth import expected
from scanner.mesh.coordinator import MeshConfig, run_mesh, unbound_ports, unsure_ports
from scanner.mesh.pairs import pair_verdict
from scanner.mesh.probing import (
    HELD_PASS,
    UNSURE_UNKNOWN,
    held_verdict,
    unsure_verdict,
)
from scanner.plan.planner import count_plan, plan
from scanner.plan.selection import SelectionOptions

ROOT = Path(__file__).resolve().parent.parent
AGENT_CMD = f"{sys.executable} -m scanner agent"
BIN = str(Path(sys.executable).parent)

ENTRY = """
[[requirement]]
id = "{id}"
component = "lab"
proto = "{proto}"
ports = "{ports}"
description = "lab {proto}"
dst_role = "node"
src_roles = ["node"]
src_scope = "{scope}"
"""


def lab_catalog(path: Path, entries: list[tuple[str, str, str, str]]) -> Path:
    """Only these requirements (id, proto, ports, src_scope): every packaged one disabled."""
    text = "".join(f'[[requirement]]\nid = "{r.id}"\ndisabled = true\n\n' for r in load_catalog())
    for rid, proto, ports, scope in entries:
        text += ENTRY.format(id=rid, proto=proto, ports=ports, scope=scope)
    path.write_text(text)
    return path


def two_cluster_site(path: Path, addrs: dict[str, str]) -> Path:
    """Clusters a and b, each with hosts node1 and node2 (``addrs``: "a-node1" -> address)."""
    lines = ["portmesh_site:", "  name: twins", "  clusters:"]
    for c in ("a", "b"):
        hosts = ", ".join(f"node{i}={addrs[f'{c}-node{i}']}" for i in (1, 2))
        lines += [f"    - name: {c}", "      kind: standalone", f"      hosts: [{hosts}]"]
    path.write_text("\n".join(lines) + "\n")
    return path


def mesh(site: Path, catalog: Path, template: str, tmp: Path) -> tuple[int, list[dict], str]:
    opts = SelectionOptions(inventories=(str(site),), catalog_files=(str(catalog),))
    cat, s, selection = opts.resolve()
    out_path = tmp / f"mesh-{time.monotonic_ns()}.ndjson"
    err = io.StringIO()
    code = run_mesh(
        MeshConfig(
            catalog=cat,
            site=s,
            selection=selection,
            exec_template=template,
            agent_cmd=AGENT_CMD,
            output=NdjsonOutput(str(out_path), stdout=False),
            summary_to=err,
            loop="asyncio",
        )
    )
    return code, [orjson.loads(x) for x in out_path.read_bytes().splitlines()], err.getvalue()


# ---- item 5, pure: the site, --from, the plan ------------------------------------------------


def test_repeated_names_are_qualified_found_and_planned_apart(tmp_path: Path) -> None:
    addrs = {"a-node1": "198.18.9.1", "a-node2": "198.18.9.2"}
    addrs |= {"b-node1": "198.18.9.3", "b-node2": "198.18.9.4"}
    site_file = two_cluster_site(tmp_path / "site.yml", addrs)
    cat = lab_catalog(tmp_path / "c.toml", [("lab.tcp", "tcp", "2380", "site")])
    opts = SelectionOptions(inventories=(str(site_file),), catalog_files=(str(cat),))
    catalog, site, selection = opts.resolve()
    assert [h.name for h in site.hosts()] == ["node1@a", "node2@a", "node1@b", "node2@b"]
    assert [h.inventory_name for h in site.hosts()] == ["node1", "node2"] * 2
    flows = list(plan(catalog, site, selection))
    # every host to every other host: node1@a -> node1@b is a flow, not a "self" flow
    assert len(flows) == count_plan(catalog, site, selection) == 4 * 3
    assert {(f.src_host, f.host) for f in flows} >= {("node1@a", "node1@b"), ("node1@b", "node1@a")}
    # --from: the unique name, or the address; the bare repeated name is refused
    for key in ("node1@b", "198.18.9.3"):
        _, _, sel = opts.resolve(sources=[key], scanner=key)
        assert sel.sources == {"node1@b"} and sel.scanner == "node1@b"
        mine = list(plan(catalog, site, sel))
        assert mine and {f.src_host for f in mine} == {"node1@b"}
        assert {f.src for f in mine} == {"198.18.9.3"}
    with pytest.raises(InputError, match=r"'node1' is 2 hosts .*node1@a, node1@b"):
        opts.resolve(sources=["node1"], scanner="node1")


def test_repeated_names_from_the_command_line_are_one_line_exit_2(tmp_path: Path) -> None:
    addrs = {f"{c}-node{i}": f"198.18.9.{n}" for n, (c, i) in enumerate(
        [("a", 1), ("a", 2), ("b", 1), ("b", 2)], 1)}  # fmt: skip
    site_file = two_cluster_site(tmp_path / "site.yml", addrs)
    p = subprocess.run(
        [sys.executable, "-m", "scanner", "check", "-i", str(site_file), "--from", "node2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and "node2@a, node2@b" in p.stderr, p.stderr


# ---- item 6, pure: the verdict of a port the responder could not bind -------------------------


def test_held_port_verdicts() -> None:
    assert held_verdict("closed", "reachable") == ("pass", HELD_PASS)
    assert held_verdict("closed", "listening") is None  # after install: closed is a fail
    assert held_verdict("open|filtered", "reachable")[0] == "unknown"
    for state in ("open", "filtered", "error"):
        assert held_verdict(state, "reachable") is None  # a drop still fails

    class Link:
        def __init__(self, addr: str, rec: dict, failed: str | None = None) -> None:
            self.host = type("H", (), {"address": addr})()
            self.ready_rec, self.failed = rec, failed

    failed = [
        {"proto": "tcp", "port": 2381, "error": "address in use", "local": ["127.0.0.1"]},
        {"proto": "udp", "port": 4789, "error": "address in use", "local": ["127.0.0.1", "::1"]},
        {"proto": "witness", "port": 0, "error": "x"},
        # a holder on the wildcard or on the probed address answers the probe itself: a reset
        # there is a firewall's, the port is not held (issue 19 review, item 1)
        {"proto": "tcp", "port": 10250, "error": "address in use", "local": ["0.0.0.0"]},
        {"proto": "udp", "port": 8472, "error": "address in use", "local": ["::"]},
        {"proto": "tcp", "port": 2379, "error": "address in use", "local": ["198.18.9.1"]},
        {
            "proto": "tcp",
            "port": 2380,
            "error": "address in use",
            "local": ["127.0.0.1", "198.18.9.1"],
        },  # fmt: skip
        # nothing tells who answers: unsure, never held
        {"proto": "tcp", "port": 30000, "error": "too many open files"},
        {"proto": "udp", "port": 30001, "error": "address in use"},
    ]
    links = [
        Link("198.18.9.1", {"type": "ready", "failed": failed}),
        Link("198.18.9.2", {"type": "ready", "failed": []}),
        Link("198.18.9.3", {"type": "ready", "failed": failed}, failed="gone"),
    ]
    assert unbound_ports(links) == {"198.18.9.1": {"tcp": "2381", "udp": "4789"}}
    assert unsure_ports(links) == {"198.18.9.1": {"tcp": "30000", "udp": "30001"}}
    assert unsure_verdict("closed", "reachable") == ("unknown", UNSURE_UNKNOWN)
    assert unsure_verdict("open|filtered", "reachable") == ("unknown", UNSURE_UNKNOWN)
    for state in ("open", "filtered", "error"):
        assert unsure_verdict(state, "reachable") is None


def test_a_failed_bind_records_where_the_holder_listens() -> None:
    """The responder's failure annotation reads the holder's local address from /proc/net."""
    from scanner.responder.server import Responder

    held = []
    for addr, kind in (("127.0.0.1", socket.SOCK_STREAM), ("127.0.0.1", socket.SOCK_DGRAM),
                       ("0.0.0.0", socket.SOCK_STREAM)):  # fmt: skip
        s = socket.socket(socket.AF_INET, kind)
        s.bind((addr, 0))
        if kind == socket.SOCK_STREAM:
            s.listen()
        held.append(s)
    loop = asyncio.new_event_loop()
    try:
        t_lo, u_lo, t_any = (s.getsockname()[1] for s in held)
        r = Responder([t_lo, t_any], [u_lo], b"x" * 32)
        r.start(loop)
        r.close()
        got = {(f["proto"], f["port"]): f for f in r.ready_record()["failed"]}
        assert got[("tcp", t_lo)]["local"] == ["127.0.0.1"]
        assert got[("udp", u_lo)]["local"] == ["127.0.0.1"]
        assert got[("tcp", t_any)]["local"] == ["0.0.0.0"]
        assert got[("tcp", t_lo)]["pid"] == os.getpid()
    finally:
        loop.close()
        for s in held:
            s.close()


def test_pair_of_a_held_udp_port_is_unknown_and_says_why() -> None:
    from scanner.mesh.pairs import PairJoin
    from scanner.mesh.probing import HELD_UNKNOWN

    join = PairJoin(["node1@a", "node1@b"])
    base = {"type": "result", "req": "calico.vxlan", "proto": "udp", "port": 4789}
    join.add({**base, "src_host": "node1@a", "host": "node1@b", "state": "open",
              "reason": "responder", "verdict": "pass"})  # fmt: skip
    join.add({**base, "src_host": "node1@b", "host": "node1@a", "state": "open|filtered",
              "reason": "no-response", "verdict": "unknown", "verdict_reason": HELD_UNKNOWN})  # fmt: skip
    (pair,) = join.pairs()
    assert (pair["a"], pair["b"], pair["verdict"]) == ("node1@a", "node1@b", "unknown")
    assert HELD_UNKNOWN in pair["reason"]


def test_from_and_as_resolve_a_host_or_say_why(tmp_path: Path) -> None:
    """Review of issue 19, item 4 and the ``watch --as`` note: ``--from`` never checks nothing
    silently - ``NAME@CLUSTER`` resolves on a site whose names are unique (so unqualified), a
    name or address the site lacks is one line and exit 2; ``watch --as`` takes what ``--from``
    takes (an address, NAME@CLUSTER)."""
    site = tmp_path / "one.yml"
    site.write_text(
        "portmesh_site:\n  name: one\n  clusters:\n    - name: a\n      kind: standalone\n"
        "      hosts: [node1=127.0.0.11, node2=127.0.0.12]\n"
    )
    cat = lab_catalog(tmp_path / "c.toml", [("lab.tcp", "tcp", "47123", "cluster")])
    base = [sys.executable, "-m", "scanner", "check", "-i", str(site), "--catalog", str(cat)]
    p = subprocess.run([*base, "--from", "node1@a"], capture_output=True, text=True, timeout=60)
    lines = [orjson.loads(x) for x in p.stdout.splitlines()]
    res = [r for r in lines if r["type"] == "result"]
    assert p.returncode == 0 and len(res) == 1 and res[0]["src_host"] == "node1", p.stderr
    for bad in ("nosuch", "127.0.0.99", "node1@b"):
        p = subprocess.run([*base, "--from", bad], capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and p.stdout == "", (bad, p.stdout, p.stderr)
        (line,) = p.stderr.splitlines()
        assert f"--from: no host named {bad!r}" in line and "nor with that address" in line

    twins = two_cluster_site(tmp_path / "twins.yml", {
        "a-node1": "127.0.0.11", "a-node2": "127.0.0.12",
        "b-node1": "127.0.0.13", "b-node2": "127.0.0.14"})  # fmt: skip
    watch = [sys.executable, "-m", "scanner", "watch", "-i", str(twins), "--catalog", str(cat),
             "--secret", "s", "--rounds", "1", "--round", "1", "--bind", "127.0.0.13"]  # fmt: skip
    for key in ("127.0.0.13", "node1@b"):
        p = subprocess.run([*watch, "--as", key], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        first = orjson.loads(p.stdout.splitlines()[0])
        assert (first["type"], first["node"], first["addr"]) == ("watch_start", "node1@b",
                                                                 "127.0.0.13")  # fmt: skip
    p = subprocess.run([*watch, "--as", "node1"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--as: 'node1' is 2 hosts" in p.stderr, p.stderr


# ---- item 5 in the lab: two clusters of node1/node2 over the mesh ----------------------------


@pytest.mark.lab
def test_mesh_over_two_clusters_with_the_same_host_names(make_lab, tmp_path: Path) -> None:
    lab = make_lab(names=["a-node1", "a-node2", "b-node1", "b-node2"])
    site_file = two_cluster_site(tmp_path / "site.yml", {h.name: h.addr for h in lab.hosts})
    cat = lab_catalog(
        tmp_path / "c.toml",
        [("lab.tcp", "tcp", "2380", "site"), ("lab.udp", "udp", "5000", "site")],
    )
    # faults on cluster a's node1 only: tcp/2380 dropped from everyone, udp/5000 from b's node1
    faults = [
        Fault("a-node1", "in", "tcp", ((2380, 2380),), "drop"),
        Fault("a-node1", "in", "udp", ((5000, 5000),), "drop", "b-node1"),
    ]
    lab.apply_faults(faults)
    template = f"ip netns exec {lab.name}-{{cluster}}-{{name}}"
    code, recs, err = mesh(site_file, cat, template, tmp_path)
    results = [r for r in recs if r["type"] == "result"]
    summary = recs[-1]
    assert summary["planned"] == summary["results"] == len(results) == 2 * 12
    # one agent per host, four hosts: not one per name
    assert sorted(summary["agents"]) == ["node1@a", "node1@b", "node2@a", "node2@b"]
    by_addr = {h.addr: h.name for h in lab.hosts}
    dirs: dict[tuple, set] = defaultdict(set)
    wrong = []
    for r in results:
        # every flow left from the host its record names (the agent of that very host)
        assert by_addr[r["src"]] == "{1}-{0}".format(*r["src_host"].split("@")), r
        f = Flow(r["dst"], r["port"], r["proto"], r["host"], r["src"], r["src_host"], r["req"])
        e = expected(f, faults, lab)
        if (r["state"], r["verdict"]) != (e.state, e.verdict):
            wrong.append((r["src_host"], r["host"], r["proto"], r["state"], e.state))
        dirs[(r["req"], r["src_host"], r["host"])].add(e.verdict)
    assert not wrong, wrong
    fails = {(r["src_host"], r["host"], r["proto"]) for r in results if r["verdict"] == "fail"}
    assert fails == {
        ("node2@a", "node1@a", "tcp"),
        ("node1@b", "node1@a", "tcp"),
        ("node2@b", "node1@a", "tcp"),
        ("node1@b", "node1@a", "udp"),
    }
    want = {}
    for (req, a, b), vs in dirs.items():
        if a < b and (req, b, a) in dirs:
            va = "fail" if "fail" in vs else "pass"
            vb = "fail" if "fail" in dirs[(req, b, a)] else "pass"
            want[(req, a, b)] = pair_verdict(va, vb)
    got = {(p["req"], p["a"], p["b"]): p["verdict"] for p in recs if p["type"] == "pair"}
    assert got == want
    assert got[("lab.udp", "node1@a", "node1@b")] == "one-way"
    assert got[("lab.udp", "node1@a", "node2@b")] == "pass"
    assert code == 1, err
    # the summary groups as `portmesh report` does (issue 20), with the unique names
    assert "node1@a drops tcp/2380 from every peer" in err, err
    assert "one-way: node1@b -> node1@a udp/5000 dropped, node1@a -> node1@b fine" in err, err

    # check on cluster b's node1 (found by its address) probes only its own flows, as itself
    b1 = lab.host("b-node1")
    p = lab.run(
        "b-node1",
        [sys.executable, "-m", "scanner", "check", "-i", str(site_file), "--catalog", str(cat)],
        capture_output=True,
        timeout=120,
    )
    lines = [orjson.loads(x) for x in p.stdout.splitlines()]
    res = [r for r in lines if r["type"] == "result"]
    assert len(res) == lines[-1]["planned"] == 2 * 3, p.stderr
    assert {(r["src_host"], r["src"]) for r in res} == {("node1@b", b1.addr)}
    assert {r["host"] for r in res} == {"node1@a", "node2@a", "node2@b"}
    assert b"check from node1@b" in p.stderr


def test_a_port_held_on_loopback_is_bound_on_the_probed_address() -> None:
    """The mesh's responder gets the host's inventory address (``also``): a port that a socket
    on 127.0.0.1 holds is bound there instead and answers with the token, so no held-port rule
    decides that port at all."""
    from scanner.core import tags
    from scanner.responder.server import Responder

    hold = socket.socket()
    hold.bind(("127.0.0.1", 0))
    hold.listen()
    port = hold.getsockname()[1]
    loop = asyncio.new_event_loop()
    r = Responder([port], [], b"k" * 32, also=["127.0.0.2"])
    try:
        r.start(loop)
        rec = r.ready_record()
        assert rec["failed"] == [] and rec["bound_on"] == {
            "127.0.0.2": {"tcp": str(port), "udp": ""}
        }

        async def fetch() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.2", port)
            data = await reader.read(64)
            writer.close()
            return data

        assert loop.run_until_complete(fetch()) == tags.tcp_token(b"k" * 32, port)
    finally:
        r.close()
        loop.close()
        hold.close()


def test_exec_template_giving_two_hosts_one_command_is_refused(tmp_path: Path) -> None:
    """Review of issue 19, item 2: node1@a and node1@b under ``ip netns exec LAB-{name}`` would
    be probed from one machine under two names: one line, exit 2, no agent started."""
    addrs = {"a-node1": "198.18.9.1", "a-node2": "198.18.9.2",
             "b-node1": "198.18.9.3", "b-node2": "198.18.9.4"}  # fmt: skip
    site = two_cluster_site(tmp_path / "site.yml", addrs)
    cat = lab_catalog(tmp_path / "c.toml", [("lab.tcp", "tcp", "2380", "site")])
    argv = [sys.executable, "-m", "scanner", "mesh", "-i", str(site), "--catalog", str(cat)]
    p = subprocess.run([*argv, "--exec", "ip netns exec nosuchlab-{name}"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 2 and p.stdout == "", p
    (line,) = p.stderr.splitlines()
    assert "node1@a and node1@b the same command" in line and "{cluster}" in line, line
    assert "Traceback" not in p.stderr


@pytest.mark.lab
def test_mesh_warns_when_an_agent_probes_from_another_address(make_lab, tmp_path: Path) -> None:
    """Review of issue 19, item 2: an inventory whose names do not match the machines the exec
    template reaches (here rotated: node1's agent runs where node3's address lives) is not a
    silent pass: results record the real source, and stderr says which agent moved."""
    lab = make_lab(hosts=3)
    a = {h.name: h.addr for h in lab.hosts}
    site = tmp_path / "rot.yml"
    site.write_text(
        "all:\n  children:\n    kube_node:\n      hosts:\n"
        + "".join(
            f"        {n}: {{ansible_host: {a[m]}}}\n"
            for n, m in (("node1", "node2"), ("node2", "node3"), ("node3", "node1"))
        )
    )
    cat = lab_catalog(tmp_path / "c.toml", [("lab.tcp", "tcp", "2380", "cluster")])
    code, recs, err = mesh(site, cat, lab.exec_template(), tmp_path)
    res = [r for r in recs if r["type"] == "result"]
    assert len(res) == 6
    # node1's agent runs in lab host node1 (a["node1"]), which the inventory calls node3
    assert {r["src"] for r in res if r["src_host"] == "node1" and r["dst"] != a["node1"]} == {
        a["node1"]
    }
    warned = [x for x in err.splitlines() if x.startswith("WARNING ")]
    assert len(warned) == 3, err
    assert any(x.startswith("WARNING node1:") and a["node1"] in x and a["node2"] in x
               for x in warned), warned  # fmt: skip


# ---- item 6 in the lab: a service on 127.0.0.1 holds a checked port ---------------------------

HOLD = """
import socket, sys, time
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("127.0.0.1", int(sys.argv[1]))); t.listen()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", int(sys.argv[2])))
print("held", flush=True)
time.sleep(600)
"""


@pytest.mark.lab
def test_port_held_on_loopback_is_answered_and_a_reject_or_drop_still_fails(
    make_lab, tmp_path: Path
) -> None:
    """Issue 19 item 6 and its review (item 1): a service on 127.0.0.1 holds a checked port.
    The agent's responder cannot bind the wildcard, so it binds the node's own address (where
    the peers probe) and answers there: the path passes as any other. A firewall's reject
    (reset / port-unreachable) or drop on that port fails - never a held-port pass."""
    lab = make_lab(hosts=2)
    inv = tmp_path / "inv.yml"
    import yaml

    from scanner.lab.lab import inventory_doc

    inv.write_text(yaml.safe_dump(inventory_doc(lab), sort_keys=False))
    cat = lab_catalog(
        tmp_path / "c.toml",
        [("lab.metrics", "tcp", "2381", "cluster"), ("lab.udp", "udp", "5000", "cluster")],
    )
    holder = lab.popen(
        "node2",
        [sys.executable, "-c", HOLD, "2381", "5000"],
        stdout=subprocess.PIPE,
        text=True,
    )
    n2 = lab.host("node2").addr
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        code, recs, err = mesh(inv, cat, lab.exec_template(), tmp_path)
        res = {(r["src_host"], r["proto"]): r for r in recs if r["type"] == "result"}
        for proto in ("tcp", "udp"):
            r = res[("node1", proto)]
            assert (r["state"], r["reason"], r["verdict"]) == ("open", "responder", "pass"), r
            assert "verdict_reason" not in r
        pairs = {p["req"]: p["verdict"] for p in recs if p["type"] == "pair"}
        assert pairs == {"lab.metrics": "pass", "lab.udp": "pass"}, err
        assert code == 0 and "one-way:" not in err and "FAIL " not in err

        for action, states in (("reject", ("closed", "closed")),
                               ("drop", ("filtered", "open|filtered"))):  # fmt: skip
            lab.apply_faults(
                [
                    Fault("node2", "in", "tcp", ((2381, 2381),), action),
                    Fault("node2", "in", "udp", ((5000, 5000),), action),
                ]
            )
            code, recs, err = mesh(inv, cat, lab.exec_template(), tmp_path)
            res = {(r["src_host"], r["proto"]): r for r in recs if r["type"] == "result"}
            for proto, state in zip(("tcp", "udp"), states, strict=True):
                r = res[("node1", proto)]
                assert (r["dst"], r["state"], r["verdict"]) == (n2, state, "fail"), (action, r)
                assert "verdict_reason" not in r
            pairs = {p["req"]: p["verdict"] for p in recs if p["type"] == "pair"}
            assert pairs == {"lab.metrics": "one-way", "lab.udp": "one-way"}, (action, err)
            assert code == 1
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.lab
def test_agents_short_of_descriptors_keep_serving_and_say_unknown(make_lab, tmp_path: Path) -> None:
    """Review of issue 19, item 6: under a low descriptor limit (300) a responder asked for 401
    ports binds what its budget allows and reports the rest (it used to run out and die
    importing the witness: every host unreachable). A reset from a port nobody bound cannot
    be told from a firewall's reject: unknown with the reason, never pass nor fail."""
    lab = make_lab(hosts=2)
    import yaml

    from scanner.lab.lab import inventory_doc

    inv = tmp_path / "inv.yml"
    inv.write_text(yaml.safe_dump(inventory_doc(lab), sort_keys=False))
    cat = lab_catalog(tmp_path / "c.toml", [("lab.many", "tcp", "30000-30400", "cluster")])
    template = lab.exec_template() + " prlimit --nofile=300:300"
    code, recs, err = mesh(inv, cat, template, tmp_path)
    res = [r for r in recs if r["type"] == "result"]
    summary = recs[-1]
    assert summary["hosts"]["unreachable"] == [], err
    assert len(res) == 2 * 401
    by = defaultdict(set)
    for r in res:
        by[(r["state"], r["verdict"], r.get("verdict_reason"))].add(r["port"])
    assert set(by) == {("open", "pass", None), ("closed", "unknown", UNSURE_UNKNOWN)}, set(by)
    assert 100 < len(by[("open", "pass", None)]) < 300  # what fits in the budget, per host
    # unknown flows leave the exit status at 0, as documented, and their pairs are listed
    assert summary["verdicts"]["fail"] == 0 and code == 0, err
    assert "UNKNOWN lab.many" in err, err
    docs = " ".join((ROOT / "docs" / "mesh.md").read_text().split())
    assert "Exit status: 0 no flow fails and every host answered" in docs
    assert "`unknown` flows (what a probe cannot decide, with the reason) leave the " in docs


# ---- item 7: the lab recipe exactly as docs/mesh.md shows it ----------------------------------


def docs_recipe() -> str:
    text = (ROOT / "docs" / "mesh.md").read_text()
    found = re.findall(r"^portmesh mesh -i /run/portmesh/pm/inventory\.yml .*$", text, re.M)
    assert len(found) == 1, found
    return found[0]


@pytest.mark.lab
def test_the_documented_lab_recipe_has_no_false_failure(lab_name: str, tmp_path: Path) -> None:
    from scanner.lab.netns import run_dir

    recipe = docs_recipe()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    up = subprocess.run(
        ["portmesh", "lab", "up", "--hosts", "3", "--name", lab_name],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert up.returncode == 0, up.stderr
    try:
        # the lab prints the same command as the docs, for its own name
        words = shlex.split(recipe)
        run = str(run_dir())
        mine = [
            w.replace("/run/portmesh/pm/", f"{run}/{lab_name}/").replace(
                "pm-{name}", f"{lab_name}-{{name}}"
            )
            for w in words
        ]
        printed = [x for x in up.stdout.splitlines() if x.startswith("mesh: ")]
        assert [shlex.split(x[len("mesh: ") :]) for x in printed] == [mine], up.stdout
        p = subprocess.run(mine, capture_output=True, env=env, timeout=600)
        lines = [orjson.loads(x) for x in p.stdout.splitlines()]
        summary = lines[-1]
        assert summary["type"] == "summary" and summary["planned"] == summary["results"] > 10000
        assert summary["verdicts"]["fail"] == 0, p.stderr.decode()[-3000:]
        assert summary["verdicts"]["unknown"] == 0, p.stderr.decode()[-3000:]
        assert p.returncode == 0
    finally:
        subprocess.run(["portmesh", "lab", "down", "--name", lab_name], env=env, timeout=120)


RECIPE_FAULTS = [
    Fault("node2", "in", "tcp", ((10250, 10250),), "reject"),  # a reset: closed (conn-refused)
    Fault("node3", "in", "udp", ((4789, 4789),), "drop"),  # silence: open|filtered
    Fault("node2", "in", "udp", ((4789, 4789),), "reject"),  # closed (port-unreach)
]


@pytest.mark.lab
def test_the_documented_lab_recipe_fails_every_fault(lab_name: str, tmp_path: Path) -> None:
    """The recipe on a faulted lab: the lab's responders hold every port on the wildcard, so a
    reset or silence on them is the firewall's - every fault fails, every other flow passes,
    nothing is unknown (review of issue 19, item 1: no held-port pass may hide a fault)."""
    from scanner.lab.netns import run_dir
    from scanner.lab.truth import hit

    faults = tmp_path / "faults.yml"
    faults.write_text(
        "faults:\n"
        "  - {host: node2, direction: in, proto: tcp, ports: 10250, action: reject}\n"
        "  - {host: node3, direction: in, proto: udp, ports: 4789, action: drop}\n"
        "  - {host: node2, direction: in, proto: udp, ports: 4789, action: reject}\n"
    )
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    up = subprocess.run(
        ["portmesh", "lab", "up", "--hosts", "3", "--name", lab_name, "--faults", str(faults)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert up.returncode == 0, up.stderr
    try:
        run = str(run_dir())
        mine = [
            w.replace("/run/portmesh/pm/", f"{run}/{lab_name}/").replace(
                "pm-{name}", f"{lab_name}-{{name}}"
            )
            for w in shlex.split(docs_recipe())
        ]
        p = subprocess.run(mine, capture_output=True, env=env, timeout=600)
        lines = [orjson.loads(x) for x in p.stdout.splitlines()]
        results = [r for r in lines if r["type"] == "result"]
        summary = lines[-1]
        assert summary["type"] == "summary" and summary["planned"] == len(results) > 10000
        wrong, faulted = [], []
        for r in results:
            f = Flow(r["dst"], r["port"], r["proto"], r["host"], r["src"], r["src_host"], r["req"])
            want = "fail" if hit(f, RECIPE_FAULTS) is not None else "pass"
            if want == "fail":
                faulted.append(r)
            if r["verdict"] != want:
                wrong.append((r["src_host"], r["host"], r["proto"], r["port"], r["state"],
                              r["verdict"], r.get("verdict_reason")))  # fmt: skip
        assert not wrong, wrong[:20]
        # node1, node3 -> node2 tcp/10250 and udp/4789; node1, node2 -> node3 udp/4789 (and
        # whatever other requirement shares those ports)
        assert {(r["src_host"], r["host"], r["proto"], r["port"]) for r in faulted} >= {
            ("node1", "node2", "tcp", 10250),
            ("node3", "node2", "tcp", 10250),
            ("node1", "node2", "udp", 4789),
            ("node3", "node2", "udp", 4789),
            ("node1", "node3", "udp", 4789),
            ("node2", "node3", "udp", 4789),
        }
        assert all("verdict_reason" not in r for r in faulted), faulted
        assert summary["verdicts"] == {"pass": len(results) - len(faulted),
                                       "fail": len(faulted), "unknown": 0}  # fmt: skip
        assert p.returncode == 1
    finally:
        subprocess.run(["portmesh", "lab", "down", "--name", lab_name], env=env, timeout=120)


# ---- item 8: check --from NAME run on another machine -----------------------------------------


@pytest.mark.lab
def test_check_from_another_machine_records_the_real_source(make_lab, tmp_path: Path) -> None:
    lab = make_lab(hosts=3)
    import yaml

    from scanner.lab.lab import inventory_doc

    inv = tmp_path / "inv.yml"
    inv.write_text(yaml.safe_dump(inventory_doc(lab), sort_keys=False))
    cat = lab_catalog(tmp_path / "c.toml", [("lab.tcp", "tcp", "2380", "cluster")])
    n1, n2 = lab.host("node1"), lab.host("node2")
    argv = [sys.executable, "-m", "scanner", "check", "-i", str(inv), "--catalog", str(cat)]
    # on node1, checking as node2: the packets leave from node1's address
    p = lab.run("node1", [*argv, "--from", "node2"], capture_output=True, text=True, timeout=120)
    res = [orjson.loads(x) for x in p.stdout.splitlines()]
    res = [r for r in res if r["type"] == "result"]
    assert len(res) == 2 and {r["src_host"] for r in res} == {"node2"}
    assert {r["src"] for r in res} == {n1.addr}, res
    warnings = [x for x in p.stderr.splitlines() if "warning" in x]
    assert len(warnings) == 1 and n1.addr in warnings[0] and n2.addr in warnings[0], p.stderr
    # on node2 as itself: the inventory address, and no warning
    p = lab.run("node2", [*argv, "--from", "node2"], capture_output=True, text=True, timeout=120)
    res = [r for r in map(orjson.loads, p.stdout.splitlines()) if r["type"] == "result"]
    assert {r["src"] for r in res} == {n2.addr} and "warning" not in p.stderr


# ---- item 10: lab up counts every planned flow ------------------------------------------------


@pytest.mark.lab
def test_lab_up_total_counts_unknown(lab_name: str, tmp_path: Path) -> None:
    from scanner.lab.lab import LabUpConfig, lab_down, lab_up
    from scanner.lab.netns import run_dir

    # without responders a dropped UDP port is silence: unknown in the ground truth
    faults = tmp_path / "faults.yml"
    faults.write_text(
        "faults:\n  - {host: node2, direction: in, proto: udp, ports: 4789, action: drop}\n"
    )
    out = io.StringIO()
    try:
        cfg = LabUpConfig(
            hosts=2, name=lab_name, responders=False, faults_file=str(faults), truth_file=True
        )
        assert lab_up(cfg, out=out) == 0
        text = out.getvalue()
        m = re.search(r"ground truth \(bare\): (\d+) planned flows, (\d+) pass, (\d+) fail, "
                      r"(\d+) unknown", text)  # fmt: skip
        assert m, text
        total, npass, nfail, nunknown = map(int, m.groups())
        assert nunknown > 0  # bare UDP ports: silence cannot be decided
        assert total == npass + nfail + nunknown
        catalog, site, selection = SelectionOptions(
            inventories=(str(run_dir() / lab_name / "inventory.yml"),)
        ).resolve()
        assert total == count_plan(catalog, site, selection)
        truth = (run_dir() / lab_name / "truth.ndjson").read_bytes().splitlines()
        assert len(truth) == total
    finally:
        lab_down(lab_name, out=io.StringIO())
