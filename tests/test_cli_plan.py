"""`portmesh catalog` and `portmesh plan` as a user runs them: real processes, exit codes 0/2."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import orjson
import pytest

from scanner.catalog import load_catalog

HOSTS = "a=198.18.9.1,b=198.18.9.2,c=198.18.9.3"


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scanner", *args], capture_output=True, timeout=timeout
    )


def lines(out: bytes) -> list[dict]:
    return [orjson.loads(x) for x in out.splitlines()]


def test_plan_ndjson_meta_then_flows_and_count_agrees():
    p = run("plan", "--hosts", HOSTS, "--nodeport-sample", "2")
    assert p.returncode == 0, p.stderr
    recs = lines(p.stdout)
    assert recs[0]["type"] == "plan"
    assert recs[0]["nodeport"] == "sample" and recs[0]["nodeport_sample"] == 2
    flows = recs[1:]
    assert flows and all(r["type"] == "flow" for r in flows)
    assert set(flows[0]) == {"type", "src", "src_host", "dst", "af", "host", "proto", "port", "req"}
    assert flows[0]["af"] == "ipv4"
    assert all(r["src_host"] != r["host"] for r in flows)
    ports = {r["port"] for r in flows if r["req"] == "k8s.nodeport"}
    assert ports == {30000, 30922, 31845, 32767}  # K=2 spread + both ends
    c = run("plan", "--hosts", HOSTS, "--nodeport-sample", "2", "--count")
    assert c.returncode == 0, c.stderr
    assert lines(c.stdout)[0]["flows"] == len(flows)
    t = run("plan", "--hosts", HOSTS, "--nodeport-sample", "2", "--count", "--format", "table")
    assert t.stdout == f"{len(flows)}\n".encode()


def test_plan_from_one_host_and_flags():
    p = run("plan", "--hosts", HOSTS, "--from", "b", "--with", "metallb", "--without", "vxlan")
    assert p.returncode == 0, p.stderr
    flows = lines(p.stdout)[1:]
    assert {r["src_host"] for r in flows} == {"b"}
    reqs = {r["req"] for r in flows}
    assert "metallb.memberlist.udp" in reqs and "calico.vxlan" not in reqs


def test_plan_explain():
    p = run("plan", "--hosts", HOSTS, "--cni", "cilium", "--explain")
    assert p.returncode == 0, p.stderr
    recs = {r["req"]: r for r in lines(p.stdout)}
    assert len(recs) == len(load_catalog())
    assert recs["cilium.health"]["included"] and "flag --cni" in recs["cilium.health"]["why"]
    assert not recs["calico.vxlan"]["included"]


INVENTORY = """\
all:
  hosts:
    cp1: {ansible_host: 198.18.7.1}
    n1: {ansible_host: 198.18.7.2}
    n2: {ansible_host: 198.18.7.3}
  children:
    kube_control_plane: {hosts: {cp1: {}}}
    kube_node: {hosts: {n1: {}, n2: {}}}
    etcd: {hosts: {cp1: {}}}
    k8s_cluster: {children: {kube_control_plane: {}, kube_node: {}}}
"""


def test_plan_from_an_inventory_and_vars(tmp_path):
    inv = tmp_path / "hosts.yml"
    inv.write_text(INVENTORY)
    gv = tmp_path / "vars.yml"
    gv.write_text(
        "calico_network_backend: bird\ncalico_ipip_mode: Always\ncalico_vxlan_mode: Never\n"
    )
    p = run("plan", "-i", str(inv), "--vars", str(gv), "--nodeport-sample", "0")
    assert p.returncode == 0, p.stderr
    flows = lines(p.stdout)[1:]
    reqs = {r["req"] for r in flows}
    assert {"calico.ipip", "calico.bgp"} <= reqs and "calico.vxlan" not in reqs
    assert {(r["src_host"], r["host"]) for r in flows if r["req"] == "etcd.client"} == {
        ("n1", "cp1"),
        ("n2", "cp1"),
    }
    # the flag wins over the variable
    p = run("plan", "-i", str(inv), "--vars", str(gv), "--without", "ipip", "--explain")
    rec = {r["req"]: r for r in lines(p.stdout)}
    assert not rec["calico.ipip"]["included"] and "flag --without" in rec["calico.ipip"]["why"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("plan",), b"--inventory"),
        (("plan", "--hosts", HOSTS, "--with", "bogus"), b"unknown feature 'bogus'"),
        (("plan", "--hosts", HOSTS, "--cni", "cillium"), b"unknown CNI 'cillium'"),
        (("plan", "--hosts", HOSTS, "--with", "ipip", "--without", "ipip"), b"both name"),
        (("plan", "--hosts", HOSTS, "--nodeport-sample", "-1"), b"nodeport-sample"),
        (("plan", "--hosts", HOSTS, "--count", "--explain"), b"not both"),
        (("plan", "--hosts", HOSTS, "--from", "zz"), b"no host named 'zz'"),
        (("plan", "--hosts", HOSTS, "--format", "xml"), b"format"),
        (("plan", "-i", "/nonexistent/hosts.yml"), b"/nonexistent/hosts.yml"),
        (("plan", "--hosts", HOSTS, "--catalog", "/nonexistent/c.toml"), b"/nonexistent/c.toml"),
        (("catalog", "--with", "nope"), b"unknown feature 'nope'"),
        (("catalog", "--format", "yaml"), b"format"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, words):
    p = run(*args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert p.stderr.startswith(b"portmesh: ")
    assert p.stderr.count(b"\n") == 1 and b"Traceback" not in p.stderr
    assert words in p.stderr


def test_bad_catalog_file_names_file_entry_field(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(
        '[[requirement]]\nid = "x.y"\ncomponent = "x"\nproto = "sctp"\nports = "1"\n'
        'description = "x"\ndst_role = "node"\nsrc_roles = ["node"]\n'
    )
    p = run("plan", "--hosts", HOSTS, "--catalog", str(path))
    assert p.returncode == 2
    assert str(path).encode() in p.stderr
    assert b"requirement 'x.y'" in p.stderr and b"'proto'" in p.stderr


def test_plan_into_a_closed_pipe_is_quiet():
    hosts = ",".join(f"h{i}=198.18.8.{i}" for i in range(1, 31))  # ~2.4 million flows
    proc = subprocess.Popen(
        [sys.executable, "-m", "scanner", "plan", "--hosts", hosts],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    first = proc.stdout.readline()
    proc.stdout.close()
    rc = proc.wait(timeout=60)
    err = proc.stderr.read()
    proc.stderr.close()
    assert orjson.loads(first)["type"] == "plan"
    assert rc == 0, err
    assert b"Traceback" not in err and b"Broken" not in err


def test_catalog_ndjson_lists_every_entry():
    p = run("catalog")
    assert p.returncode == 0, p.stderr
    recs = lines(p.stdout)
    assert [r["id"] for r in recs] == [r.id for r in load_catalog()]
    keys = {"id", "component", "proto", "ports", "description", "dst_role", "src_roles"}
    assert all(keys | {"condition", "reference"} <= set(r) for r in recs)


def test_catalog_filters_and_formats(tmp_path):
    p = run("catalog", "--cni", "cilium", "--format", "ndjson")
    ids = {r["id"] for r in lines(p.stdout)}
    assert "cilium.health" in ids and "cilium.wireguard" not in ids
    assert "calico.vxlan" not in ids and "etcd.client" in ids and "metallb.metrics.tcp" not in ids
    p = run("catalog", "--with", "metallb,wireguard")
    ids = {r["id"] for r in lines(p.stdout)}
    assert {"metallb.metrics.tcp", "calico.wireguard", "calico.vxlan"} <= ids
    assert "cilium.wireguard" not in ids and "calico.ipip" not in ids
    t = run("catalog", "--format", "table").stdout.decode()
    assert t.splitlines()[0].split()[:3] == ["ID", "PROTO", "PORTS"]
    assert any(line.startswith("calico.vxlan ") and " udp " in line for line in t.splitlines())
    m = run("catalog", "--format", "markdown").stdout.decode()
    assert m.startswith("| id | proto | ports |")
    assert "`k8s.scheduler`" in m and "swaps 10257 and 10259" in m
    extra = tmp_path / "extra.toml"
    extra.write_text(
        '[[requirement]]\nid = "harbor.https"\ncomponent = "harbor"\nproto = "tcp"\n'
        'ports = "8443"\ndescription = "Harbor"\ndst_role = "bootstrap"\nsrc_roles = ["node"]\n'
    )
    recs = lines(run("catalog", "--catalog", str(extra)).stdout)
    assert recs[-1]["id"] == "harbor.https"


SITE_FILE = pathlib.Path(__file__).parent / "data" / "inventories" / "site" / "site.yml"


@pytest.mark.skipif(not SITE_FILE.exists(), reason="the site-file fixture of the inventory tests")
def test_plan_of_a_dce_site_file():
    p = run("plan", "-i", str(SITE_FILE), "--explain")
    assert p.returncode == 0, p.stderr
    rec = {(r["req"], r["cluster"]): r for r in lines(p.stdout)}
    included = {k for k, r in rec.items() if r["included"]}
    kinds = {r["cluster"]: r["kind"] for r in rec.values()}
    glob = [c for c, k in kinds.items() if k == "global"]
    workers = [c for c, k in kinds.items() if k == "worker"]
    assert len(glob) == 1 and workers
    assert {("istio.gateway.https", glob[0]), ("insight.logs", glob[0])} <= included
    for w in workers:
        assert ("worker.apiserver", w) in included and ("worker.ssh", w) in included
        assert ("istio.gateway.https", w) not in included
    n = lines(run("plan", "-i", str(SITE_FILE), "--count").stdout)[0]["flows"]
    assert n == sum(r["flows"] for r in rec.values())


# ---- issue 20: tables and --explain wording ---------------------------------------------

SITE = pathlib.Path(__file__).parent / "data" / "inventories" / "site" / "site.yml"


def _columns_aligned(text: str, ncols: int) -> None:
    """Every row's first ncols-1 cells start at the header's column positions."""
    rows = [ln for ln in text.splitlines() if ln.strip()]
    head = rows[0]
    starts = [i for i in range(len(head)) if head[i] != " " and (i == 0 or head[i - 1] == " ")]
    assert len(starts) == ncols, head
    for row in rows[1:]:
        for s in starts[1:]:
            assert row[s - 1] == " " and row[s] != " ", (row, s)


def test_plan_and_explain_tables_are_aligned():
    p = run("plan", "-i", str(SITE), "--format", "table", "--nodeport-sample", "2")
    assert p.returncode == 0, p.stderr
    _columns_aligned(p.stdout.decode(), 7)
    e = run("plan", "-i", str(SITE), "--explain", "--format", "table")
    assert e.returncode == 0, e.stderr
    _columns_aligned(e.stdout.decode(), 6)


def test_explain_wording():
    e = run("plan", "-i", str(SITE), "--explain")
    why = {(r["req"], r["cluster"]): r["why"] for r in lines(e.stdout)}
    assert not any("((" in w or "))" in w for w in why.values()), [
        w for w in why.values() if "))" in w
    ][:3]
    w = why[("k8s.apiserver", "worker-a")]
    assert w.startswith("always required; apiserver_port 6443 [default (kubespray)") and w.endswith(
        "]"
    ), w
    # worker rows of a site-scoped requirement: counted under the global cluster, said so
    w = why[("insight.metrics", "worker-a")]
    assert w.startswith("counted under kpanda-global") and "worker-a" in w, w
    # a requirement with no condition, excluded for want of hosts: the reason, no "always"
    h = run("plan", "--hosts", HOSTS, "--explain")
    rec = {r["req"]: r for r in lines(h.stdout)}["bootstrap.registry"]
    assert rec["flows"] == 0 and rec["why"] == "no bootstrap node in the site", rec
