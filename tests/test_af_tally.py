"""Every record says its address family (issue 15): ``--emit failures`` tallies (one per family
of a dual-stack requirement), and a host-name destination that does not resolve says the family
its leg would have used, not always IPv4."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scanner.core.flows import Flow
from scanner.core.tally import Tallies, af_of

ROOT = Path(__file__).resolve().parent.parent


def test_tallies_keep_the_families_apart() -> None:
    t = Tallies()
    for port in (4789, 4790):
        t.add("node1", "198.18.0.1", "node2", "198.18.0.2", "calico.vxlan", "udp", port, "open")
    t.add("node1", "2001:2::1", "node2", "2001:2::2", "calico.vxlan", "udp", 4789, "open", "ipv6")
    recs = list(t.records("0123456789abcdef"))
    assert [(r["af"], r["dst"], r["flows"]) for r in recs] == [
        ("ipv4", "198.18.0.2", 2),
        ("ipv6", "2001:2::2", 1),
    ]
    # a shard's records fold into the right family, with or without af (older files)
    m = Tallies()
    for r in recs:
        m.merge(r)
    old = {k: v for k, v in recs[1].items() if k != "af"}
    m.merge(old)
    assert [(r["af"], r["flows"]) for r in m.records("x")] == [("ipv4", 2), ("ipv6", 2)]
    assert af_of("2001:2::2") == "ipv6" and af_of("198.18.0.2") == af_of(None) == "ipv4"


def test_tally_records_validate() -> None:
    from tests.test_ipv6 import _validate

    t = Tallies()
    t.add("node1", "2001:2::1", "node2", "2001:2::2", "k", "tcp", 10250, "open", "ipv6")
    _validate(list(t.records("0123456789abcdef")))


def test_a_name_flow_says_its_legs_family() -> None:
    assert Flow("registry.example", 443, fam="ipv6").af == "ipv6"
    assert Flow("registry.example", 443).af == "ipv4"  # a name typed to scan: no leg
    assert Flow("2001:2::5", 443, fam="ipv6").af == "ipv6"


IPV6_ONLY = """
all:
  hosts:
    node1: {ip: "2001:2::1"}
    node2: {ip: "2001:2::2"}
  children:
    kube_control_plane: {hosts: {node1: {}}}
    etcd: {hosts: {node1: {}}}
    kube_node: {hosts: {node2: {}}}
    k8s_cluster: {children: {kube_control_plane: {}, kube_node: {}}}
  vars:
    ipv6_stack: true
    ipv4_stack: false
    files_repo: "http://files.portmesh.invalid:8080/f"
"""


def _endpoint_flows(tmp_path: Path) -> list[Flow]:
    from scanner.catalog.loader import load_catalog
    from scanner.plan.inventory import load_site
    from scanner.plan.planner import plan
    from scanner.plan.selection import Selection

    p = tmp_path / "hosts.yml"
    p.write_text(IPV6_ONLY)
    site = load_site([str(p)])
    return [f for f in plan(load_catalog(), site, Selection()) if f.req == "endpoint.files_repo"]


def test_an_ipv6_only_clusters_named_endpoint_is_planned_over_ipv6(tmp_path: Path) -> None:
    flows = _endpoint_flows(tmp_path)
    assert flows and {(f.dst, f.af, f.fam) for f in flows} == {
        ("files.portmesh.invalid", "ipv6", "ipv6")
    }


ENGINE = r"""
import json, sys
from scanner.core.flows import Flow
from scanner.core.results import result_dict
from scanner.engine.engine import Engine, EngineConfig
from scanner.engine.process import new_loop
out = []
eng = Engine(EngineConfig(timeout=0.3, retries=0, tcp_method="connect"), out.append)
loop = new_loop("asyncio")
loop.run_until_complete(eng.run(iter([
    Flow("files.portmesh.invalid", 8080, "tcp", fam="ipv6"),
    Flow("files.portmesh.invalid", 8080, "tcp", fam="ipv4"),
])))
print(json.dumps([result_dict(r, "0123456789abcdef") for r in out]))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a network namespace of its own")
def test_an_unresolved_name_reports_the_family_it_would_have_used() -> None:
    # in a namespace of its own: the lookup fails without a packet leaving this host
    cp = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", ENGINE],
        capture_output=True,
        timeout=60,
        cwd=ROOT,
    )
    assert cp.returncode == 0, cp.stderr
    recs = json.loads(cp.stdout)
    assert sorted((r["state"], r["reason"], r["af"]) for r in recs) == [
        ("error", "unresolved", "ipv4"),
        ("error", "unresolved", "ipv6"),
    ]


OTHER_FAMILY = r"""
import json, os, subprocess, sys
d = sys.argv[1]
# this namespace's own /etc/hosts and resolv.conf: the name has an IPv6 address only, and the
# name server is this namespace's loopback (no packet leaves the host)
open(os.path.join(d, "hosts"), "w").write("127.0.0.1 localhost\n2001:2::7 only6.portmesh.test\n")
open(os.path.join(d, "resolv.conf"), "w").write("nameserver 127.0.0.1\noptions attempts:1\n")
for f in ("hosts", "resolv.conf"):
    subprocess.run(["mount", "--bind", os.path.join(d, f), "/etc/" + f], check=True)
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
from scanner.core.flows import Flow
from scanner.core.results import result_dict
from scanner.engine.engine import Engine, EngineConfig
from scanner.engine.process import new_loop
out = []
eng = Engine(EngineConfig(timeout=0.5, retries=0, tcp_method="connect"), out.append)
new_loop("asyncio").run_until_complete(eng.run(iter([
    Flow("only6.portmesh.test", 5000, "tcp", fam="ipv4"),
])))
print(json.dumps([result_dict(r, "0123456789abcdef") for r in out]))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces of its own")
def test_a_name_with_only_an_address_of_the_other_family_says_so(tmp_path: Path) -> None:
    # registry_host: "myreg.local:5000" in an IPv4 cluster, where the name has only an AAAA
    # record: unknown, and the warning names the address it has rather than "does not resolve"
    cp = subprocess.run(
        ["unshare", "-n", "-m", sys.executable, "-c", OTHER_FAMILY, str(tmp_path)],
        capture_output=True,
        timeout=60,
        cwd=ROOT,
        text=True,
    )
    assert cp.returncode == 0, cp.stderr
    recs = json.loads(cp.stdout)
    assert [(r["dst"], r["state"], r["reason"], r["af"]) for r in recs] == [
        ("only6.portmesh.test", "error", "unresolved", "ipv4")
    ]
    assert (
        "only6.portmesh.test does not resolve here (no IPv4 address; it resolves to IPv6"
        " 2001:2::7 only, and this flow is planned over IPv4)" in cp.stderr
    ), cp.stderr
