"""A cluster's configuration read as Ansible, kubespray and Kubean read it (issue 13).

Fixtures: tests/data/kubespray/ (kubespray's sample inventory shape: inventory.ini without a
k8s_cluster section, group_vars/all/*.yml, group_vars/k8s_cluster/*.yml, host_vars) and
tests/data/kubean/ (Kubean's install examples: minimal all-in-one, mirror, air-gap; ConfigMaps,
Cluster and ClusterOperation in one file). The oracle for hosts, groups and variables is real
``ansible-inventory --list`` (ansible-core, a test dependency). Probes go to 127.0.0.x only,
inside a network namespace of the test's own when a name must fail to resolve.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from scanner.catalog import load_catalog
from scanner.errors import InventoryError
from scanner.plan.ansible_vars import CliVars, chain, deciding_names
from scanner.plan.inventory import load_site
from scanner.plan.planner import explain, flow_record, plan
from scanner.plan.selection import Selection
from scanner.plan.sources import read_inventory_file

DATA = Path(__file__).parent / "data"
KS = DATA / "kubespray"
KUBEAN = DATA / "kubean"
ANSIBLE_INVENTORY = shutil.which("ansible-inventory") or str(
    Path(sys.executable).parent / "ansible-inventory"
)
SEL = Selection(nodeport_sample=2)


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scanner", *args], capture_output=True, timeout=timeout
    )


def flows(*inventories, vars_files=(), sel=SEL) -> list[dict]:
    site = load_site([str(i) for i in inventories], [str(v) for v in vars_files])
    return [flow_record(f) for f in plan(load_catalog(), site, sel)]


def reqs(fl: list[dict]) -> set[str]:
    return {f["req"] for f in fl}


def to(fl: list[dict], req: str) -> set[tuple[str, str, str, int]]:
    return {(f["src_host"], f["host"], f["dst"], f["port"]) for f in fl if f["req"] == req}


# --------------------------------------------------------------------------- kubespray layout


@pytest.mark.parametrize("given", ["mycluster", "mycluster/inventory.ini"])
def test_kubespray_sample_layout_reads_group_vars_and_host_vars(given):
    fl = flows(KS / given)
    # group_vars/k8s_cluster/k8s-net-calico.yml: bird and no VXLAN, though the inventory has no
    # k8s_cluster section (kubespray adds it at run time)
    assert "calico.bgp" in reqs(fl) and "calico.vxlan" not in reqs(fl)
    assert {f["port"] for f in fl if f["req"] == "calico.bgp"} == {179}
    # host_vars/node4.yml sets ip: node4's address changes (ansible_host stays for ssh)
    addrs = {f["host"]: f["dst"] for f in fl if f["host"].startswith("node")}
    assert addrs["node4"] == "198.18.3.44" and addrs["node1"] == "198.18.3.1"
    # group_vars/all/offline.yml: the registry and the files server, from every node
    nodes = {f"node{i}" for i in range(1, 6)}
    assert to(fl, "endpoint.registry_host") == {
        (n, "registry_host", "198.18.3.50", 5000) for n in nodes
    }
    assert to(fl, "endpoint.files_repo") == {(n, "files_repo", "198.18.3.51", 8080) for n in nodes}
    # kube_image_repo / quay_image_repo / github_url / kubeadm_download_url point at the same two
    # hosts: no destinations of their own
    assert {r for r in reqs(fl) if r.startswith("endpoint.")} == {
        "endpoint.registry_host",
        "endpoint.files_repo",
    }


def test_explain_names_the_variable_and_the_group_vars_file():
    site = load_site([str(KS / "mycluster")])
    why = {(r["req"]): r["why"] for r in explain(load_catalog(), site, SEL)}
    calico = "group_vars/k8s_cluster/k8s-net-calico.yml"
    assert f"{calico}: calico_network_backend=bird" in why["calico.bgp"]
    assert f"{calico}: calico_vxlan_mode=Never" in why["calico.vxlan"]
    reg = why["endpoint.registry_host"]
    assert "group_vars/all/offline.yml: registry_host=198.18.3.50:5000" in reg
    assert "kube_image_repo" in reg and "quay_image_repo" in reg
    assert "github_url" in why["endpoint.files_repo"]
    # a feature nobody set names kubespray's default and the variable
    assert "default (kubespray): typha_enabled=false" in why["calico.typha"]


def test_old_group_names_map_and_vars_files_in_every_form():
    site = load_site([str(KS / "oldnames")])
    (cluster,) = site.clusters
    roles = {h.name: set(h.roles) for h in cluster.hosts}
    assert roles["node1"] >= {"node", "control_plane", "etcd"}
    assert roles["node2"] == {"node", "worker"} and roles["node3"] == {"node", "worker"}
    node2 = next(h for h in cluster.hosts if h.name == "node2")
    # host_vars/node2/ is a folder: 01-net.yml then 02-extra.yml
    assert node2.address == "198.18.4.22" and node2.user == "ops"
    fl = flows(KS / "oldnames")
    # group_vars/k8s_cluster.yml reaches kube-master/kube-node hosts through k8s_cluster
    assert {"calico.ipip", "calico.bgp"} <= reqs(fl) and "calico.vxlan" not in reqs(fl)
    # group_vars/all.json
    assert {f["port"] for f in fl if f["req"] == "k8s.apiserver"} == {8443}


def test_vars_folder_on_the_command_line(tmp_path):
    (tmp_path / "inventory.ini").write_text((KS / "mycluster" / "inventory.ini").read_text())
    plain = flows(tmp_path / "inventory.ini")
    assert "calico.bgp" not in reqs(plain) and "calico.vxlan" in reqs(plain)
    gv = KS / "mycluster" / "group_vars"
    # a group_vars folder: entries apply to the groups they name
    fl = flows(tmp_path / "inventory.ini", vars_files=[gv])
    assert "calico.bgp" in reqs(fl) and "endpoint.registry_host" in reqs(fl)
    # any other folder: its files apply to every host, in lexical order
    fl = flows(tmp_path / "inventory.ini", vars_files=[gv / "k8s_cluster"])
    assert "calico.bgp" in reqs(fl) and "endpoint.registry_host" not in reqs(fl)
    # a --vars file is above group_vars: it wins for a plan-deciding variable
    over = tmp_path / "over.yml"
    over.write_text("calico_network_backend: vxlan\ncalico_vxlan_mode: Always\n")
    fl = flows(KS / "mycluster", vars_files=[over])
    assert "calico.bgp" not in reqs(fl) and "calico.vxlan" in reqs(fl)


def test_inventory_folder_reads_every_source_and_skips_what_ansible_skips(tmp_path):
    inv = tmp_path / "inv"
    shutil.copytree(KS / "mycluster", inv)
    (inv / "extra.yml").write_text(
        "all:\n  children:\n    kube_node:\n      hosts:\n"
        "        node6: {ansible_host: 198.18.3.6}\n"
    )
    (inv / "README.md").write_text("# not an inventory\n")
    (inv / "ansible.cfg").write_text("[defaults]\n")
    site = load_site([str(inv)])
    assert sorted(h.name for h in site.hosts()) == [f"node{i}" for i in range(1, 7)]
    assert site.clusters[0].name == "inv"
    (inv / "notes").write_text("just some text\n")
    with pytest.raises(InventoryError, match=r"notes: "):
        load_site([str(inv)])


# --------------------------------------------------------------------------- per-host variables


def test_plan_deciding_variable_that_differs_between_nodes_is_an_error():
    p = run("plan", "-i", str(KS / "perhost"), "--count")
    assert p.returncode == 2
    err = p.stderr.decode().strip()
    assert "\n" not in err and "Traceback" not in err
    assert "kube_network_plugin" in err and "node1" in err and "node3" in err
    assert "perhost/host_vars/node3.yml" in err


def test_etcd_only_hosts_do_not_have_to_agree():
    # precedence/: etcd1 is not a node, its typha_enabled stays false; the nodes agree on true
    site = load_site([str(KS / "precedence")])
    (cluster,) = site.clusters
    assert cluster.config.features["typha"].value is True
    # group_vars/all/20-second.yaml wins over 10-first.yml and over every inventory group var
    assert cluster.config.apiserver_port.value == 6002
    assert "group_vars/all/20-second.yaml" in cluster.config.apiserver_port.source


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        ("broken-yaml", "broken-yaml/group_vars/k8s_cluster/b.yml: YAML error"),
        ("broken-hostvars", "broken-hostvars/host_vars/node9.yml: host_vars for host node9"),
        ("no-meta.json", "no-meta.json: ansible-inventory output without _meta"),
    ],
)
def test_broken_files_one_line_naming_the_file_exit_2(path, needle):
    for cmd in (("plan", "--count"), ("check", "--from", "node1")):
        p = run(cmd[0], "-i", str(KS / path), *cmd[1:])
        assert p.returncode == 2, p.stdout
        err = p.stderr.decode().strip()
        assert needle in err and "\n" not in err and "Traceback" not in err


# --------------------------------------------------------------------------- ansible-inventory as oracle

ORACLE_LAYOUTS = [
    ("mycluster", "implicit.ini"),
    ("mycluster/inventory.ini", "implicit.ini"),
    ("oldnames", "implicit-oldnames.ini"),
    ("precedence", "implicit.ini"),
]


def ansible_list(tmp_path: Path, layout: str, implicit: str) -> Path:
    """``ansible-inventory --list`` of a layout, plus kubespray's run-time groups as one more
    inventory source (Ansible does not know them: kubespray adds them in a playbook)."""
    env = {**os.environ, "ANSIBLE_LOCAL_TEMP": str(tmp_path), "ANSIBLE_HOME": str(tmp_path)}
    p = subprocess.run(
        [ANSIBLE_INVENTORY, "-i", str(KS / layout), "-i", str(KS / implicit), "--list"],
        capture_output=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    out = tmp_path / "inventory.json"
    out.write_bytes(p.stdout)
    return out


def _norm(v):
    if isinstance(v, (bool, int, float)):
        return str(v).lower()  # INI: Ansible types 5/True, portmesh keeps the text
    return v


@pytest.mark.parametrize(("layout", "implicit"), ORACLE_LAYOUTS, ids=[x[0] for x in ORACLE_LAYOUTS])
def test_hosts_roles_and_variables_equal_ansible_inventory(tmp_path, layout, implicit):
    js = ansible_list(tmp_path, layout, implicit)
    doc = json.loads(js.read_text())
    hostvars = doc["_meta"]["hostvars"]
    (src,) = read_inventory_file(str(KS / layout))
    per_host = src.host_layers(CliVars())
    # the hosts
    assert set(per_host) == set(hostvars)
    # every variable of every host, precedence included (internal/magic ones aside)
    for host, theirs in hostvars.items():
        mine = dict(chain(per_host[host]))
        assert {k: _norm(v) for k, v in mine.items()} == {k: _norm(v) for k, v in theirs.items()}, (
            host
        )
    # the plan-deciding variables are among them, and set
    names = deciding_names([layer for ls in per_host.values() for layer in ls])
    assert any(n in hostvars[h] for h in hostvars for n in names)
    # roles: from the folder, and from Ansible's JSON
    mine_site, json_site = load_site([str(KS / layout)]), load_site([str(js)])
    assert {(h.name, h.roles, h.address) for h in mine_site.hosts()} == {
        (h.name, h.roles, h.address) for h in json_site.hosts()
    }
    # the plan from the folder equals the plan from the JSON, flow for flow
    assert flows(KS / layout) == flows(js)


def test_ansible_inventory_json_without_kubespray_groups_loses_group_vars(tmp_path):
    """Documented: ``ansible-inventory`` alone does not put kubespray's sample hosts in
    k8s_cluster, so group_vars/k8s_cluster is not in its JSON; portmesh reading the folder has
    it. The README says to add the run-time groups (or define k8s_cluster)."""
    env = {**os.environ, "ANSIBLE_LOCAL_TEMP": str(tmp_path), "ANSIBLE_HOME": str(tmp_path)}
    p = subprocess.run(
        [ANSIBLE_INVENTORY, "-i", str(KS / "mycluster"), "--list"],
        capture_output=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert "calico_network_backend" not in doc["_meta"]["hostvars"]["node1"]
    assert "calico.bgp" in reqs(flows(KS / "mycluster"))


# kubespray's roles/dynamic_groups/tasks/main.yml, verbatim, then every host's v1/v2
DYNAMIC_GROUPS_PLAY = """
- hosts: all
  gather_facts: false
  connection: local
  tasks:
    - name: Match needed groups by their old names or definition
      vars:
        group_mappings:
          kube_control_plane: [kube-master]
          kube_node: [kube-node]
          calico_rr: [calico-rr]
          no_floating: [no-floating]
          k8s_cluster: [kube_node, kube_control_plane, calico_rr]
      group_by:
        key: "{{ item.key }}"
      when: group_names | intersect(item.value) | length > 0
      loop: "{{ group_mappings | dict2items }}"
- hosts: all
  gather_facts: false
  connection: local
  tasks:
    - debug:
        msg: "PMVARS {{ inventory_hostname }} {{ v1 | default('-') }} {{ v2 | default('-') }}"
"""


def kubespray_run_vars(tmp_path: Path, inventory: Path) -> dict[str, tuple[str, str]]:
    """host -> (v1, v2) as a kubespray run sees them: its dynamic_groups task run by
    ansible-playbook (the oracle: group_by groups and Ansible's own precedence)."""
    play = tmp_path / "play.yml"
    play.write_text(DYNAMIC_GROUPS_PLAY)
    env = {**os.environ, "ANSIBLE_LOCAL_TEMP": str(tmp_path), "ANSIBLE_HOME": str(tmp_path),
           "ANSIBLE_LOCALHOST_WARNING": "0", "ANSIBLE_NOCOLOR": "1"}  # fmt: skip
    p = subprocess.run(
        [str(Path(ANSIBLE_INVENTORY).with_name("ansible-playbook")), "-i", str(inventory),
         str(play)],
        capture_output=True, timeout=120, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    out = {}
    for m in re.finditer(r'"msg": "PMVARS (\S+) (\S+) (\S+)"', p.stdout.decode()):
        out[m[1]] = (m[2], m[3])
    return out


def test_kubespray_run_groups_precedence_equals_ansible_playbook(tmp_path):
    """Review 13, item 4: kubespray adds its run-time groups with group_by (one level below all),
    not as parents; a sibling with a higher ansible_group_priority beats kube_node, and
    k8s_cluster beats calico_rr by name. Oracle: the role's task run by ansible-playbook."""
    inv = tmp_path / "inv"
    (inv / "group_vars" / "k8s_cluster").mkdir(parents=True)
    (inv / "hosts.yml").write_text(
        "all:\n  hosts:\n    node1: {ansible_host: 127.0.0.1}\n    node2: {ansible_host: 127.0.0.1}\n"
        "  children:\n    kube_control_plane: {hosts: {node1: {}}}\n"
        "    kube_node: {hosts: {node1: {}, node2: {}}}\n    calico_rr: {hosts: {node2: {}}}\n"
        "    zone_a:\n      vars: {ansible_group_priority: 10}\n"
        "      hosts: {node1: {}, node2: {}}\n    etcd: {hosts: {node1: {}}}\n"
    )
    (inv / "group_vars" / "k8s_cluster" / "a.yml").write_text("v1: k8s\nv2: k8s\n")
    (inv / "group_vars" / "kube_node.yml").write_text("v1: node\n")
    (inv / "group_vars" / "zone_a.yml").write_text("v1: zone\n")
    (inv / "group_vars" / "calico_rr.yml").write_text("v2: rr\n")
    theirs = kubespray_run_vars(tmp_path, inv / "hosts.yml")
    assert theirs == {"node1": ("zone", "k8s"), "node2": ("zone", "k8s")}  # the oracle's say
    (src,) = read_inventory_file(str(inv / "hosts.yml"))
    mine = {h: dict(chain(ls)) for h, ls in src.host_layers(CliVars()).items()}
    assert {h: (v.get("v1", "-"), v.get("v2", "-")) for h, v in mine.items()} == theirs


# --------------------------------------------------------------------------- Kubean examples


def test_kubean_minimal_has_no_endpoints():
    fl = flows(KUBEAN / "minimal.yml")
    assert fl == []  # one node: no flow from a host to itself, and no endpoint set
    site = load_site([str(KUBEAN / "minimal.yml")])
    assert site.clusters[0].name == "cluster-mini" and site.clusters[0].config.endpoints == ()


def test_kubean_airgap_plans_registry_and_minio_from_every_node():
    fl = flows(KUBEAN / "airgap.yml")
    assert to(fl, "endpoint.registry_host") == {
        ("node1", "registry_host", "198.18.6.50", 5000),
        ("node2", "registry_host", "198.18.6.50", 5000),
    }
    assert to(fl, "endpoint.minio_address") == {
        ("node1", "minio_address", "198.18.6.51", 9000),
        ("node2", "minio_address", "198.18.6.51", 9000),
    }
    # files_repo, github_url... resolve to MinIO: no destinations of their own; no reverse flow
    assert {r for r in reqs(fl) if r.startswith("endpoint.")} == {
        "endpoint.registry_host",
        "endpoint.minio_address",
    }
    assert not any(f["src_host"] in ("registry_host", "minio_address") for f in fl)
    # no site file, no bootstrap node: bootstrap.* stays out, as before
    assert not any(r.startswith("bootstrap.") for r in reqs(fl))


def test_kubean_mirror_plans_mirror_hosts_by_name():
    fl = flows(KUBEAN / "mirror.yml")
    got = {(f["host"], f["dst"], f["port"]) for f in fl if f["req"].startswith("endpoint.")}
    assert got == {
        ("github_url", "files.mirror.example", 443),
        ("docker_image_repo", "docker.mirror.example", 443),
        ("gcr_image_repo", "gcr.mirror.example", 443),
        ("github_image_repo", "ghcr.mirror.example", 443),
        ("kube_image_repo", "k8s.mirror.example", 443),
        ("quay_image_repo", "quay.mirror.example", 443),
    }


def test_site_bootstrap_node_still_wins(tmp_path):
    site = tmp_path / "site.yml"
    site.write_text(
        "portmesh_site:\n  bootstrap: 198.18.6.50\n  clusters:\n"
        f"    - name: airgap\n      kind: standalone\n      inventory: {KUBEAN / 'airgap.yml'}\n"
    )
    fl = flows(site)
    assert "endpoint.registry_host" not in reqs(fl)  # on the bootstrap node: bootstrap.registry
    assert {f["port"] for f in fl if f["req"] == "bootstrap.registry"} == {5000}
    assert "endpoint.minio_address" in reqs(fl)  # another host: still its own destination
    why = {r["req"]: r["why"] for r in explain(load_catalog(), load_site([str(site)]), SEL)}
    assert "bootstrap node" in why["endpoint.registry_host"]


def test_unresolvable_endpoint_template_is_explained_not_planned(tmp_path):
    v = tmp_path / "vars.yml"
    v.write_text("registry_host: \"{{ groups['bootstrap'][0] }}:5000\"\n")
    site = load_site([str(KUBEAN / "minimal.yml")], [str(v)])
    recs = [r for r in explain(load_catalog(), site, SEL) if r["req"] == "endpoint.registry_host"]
    assert len(recs) == 1 and not recs[0]["included"] and "does not resolve" in recs[0]["why"]


# --------------------------------------------------------------------------- catalog


def test_catalog_prints_effective_ports_and_the_variable():
    recs = [orjson.loads(x) for x in run("catalog", "--format", "ndjson").stdout.splitlines()]
    by = {r["id"]: r for r in recs}
    assert by["k8s.apiserver"]["ports"] == "6443"
    assert by["k8s.apiserver"]["variable"] == "kube_apiserver_port"
    assert by["k8s.apiserver"]["ports_spec"] == "${apiserver_port}"
    assert by["k8s.nodeport"]["ports"] == "30000-32767"
    assert by["bootstrap.registry"]["ports"] == "443"
    assert by["etcd.client"]["variable"] is None
    assert not any("$" in (r["ports"] or "") for r in recs)
    p = run("catalog", "-i", str(KUBEAN / "airgap.yml"), "--format", "ndjson")
    by = {r["id"]: r for r in map(orjson.loads, p.stdout.splitlines())}
    assert by["bootstrap.registry"]["ports"] == "5000"
    p = run("catalog", "-i", str(KS / "oldnames"), "--format", "table")
    row = next(x for x in p.stdout.decode().splitlines() if x.startswith("k8s.apiserver "))
    assert row.split()[2:4] == ["8443", "kube_apiserver_port"]
    md = run("catalog", "--format", "markdown").stdout.decode()
    assert md.startswith("| id | proto | ports | variable |")
    assert "| `k8s.apiserver` | tcp | 6443 | kube_apiserver_port |" in md


# --------------------------------------------------------------------------- check probes endpoints

CHECK_SCRIPT = r"""
import json, os, socket, subprocess, sys
os.system("ip link set lo up")
lst = socket.socket(); lst.bind(("127.0.0.60", 0)); lst.listen(16)
port = lst.getsockname()[1]
d = sys.argv[1]
open(os.path.join(d, "hosts.yml"), "w").write(
    "all:\n  hosts:\n    node1: {ansible_host: 127.0.0.2}\n    node2: {ansible_host: 127.0.0.3}\n"
    "  children:\n    kube_control_plane: {hosts: {node1: }}\n"
    "    kube_node: {hosts: {node2: }}\n    etcd: {hosts: {node1: }}\n")
os.makedirs(os.path.join(d, "group_vars"), exist_ok=True)
open(os.path.join(d, "group_vars", "all.yml"), "w").write(
    f'registry_host: "127.0.0.60:{port}"\n'
    'files_repo: "http://files.portmesh.invalid:8080/kubean"\n'
    'kube_image_repo: "localhost:1/registry.k8s.io"\n')
p = subprocess.run([sys.executable, "-m", "scanner", "check", "-i", d, "--from", "node1",
                    "--nodeport-sample", "1", "--method", "connect", "--timeout", "0.3",
                    "--retries", "0"], capture_output=True)
sys.stdout.write(json.dumps({"rc": p.returncode, "out": p.stdout.decode(),
                             "err": p.stderr.decode()}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a network namespace of its own")
def test_check_probes_endpoints_and_unresolvable_names_are_unknown(tmp_path):
    # an isolated network namespace: 127.0.0.x on its own lo, no route anywhere else, so the
    # name lookup of files.portmesh.invalid fails without a packet leaving
    p = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", CHECK_SCRIPT, str(tmp_path)],
        capture_output=True,
        timeout=120,
        cwd=Path(__file__).parent.parent,
    )
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert "Traceback" not in res["err"], res["err"]
    recs = [orjson.loads(x) for x in res["out"].splitlines()]
    results = [r for r in recs if r["type"] == "result"]
    ends = {r["req"]: r for r in results if r["req"].startswith("endpoint.")}
    assert set(ends) == {
        "endpoint.registry_host",
        "endpoint.files_repo",
        "endpoint.kube_image_repo",
    }
    reg = ends["endpoint.registry_host"]
    assert (reg["host"], reg["dst"], reg["state"], reg["verdict"]) == (
        "registry_host",
        "127.0.0.60",
        "open",
        "pass",
    )
    files = ends["endpoint.files_repo"]
    assert (files["dst"], files["state"], files["reason"], files["verdict"]) == (
        "files.portmesh.invalid",
        "error",
        "unresolved",
        "unknown",
    )
    img = ends["endpoint.kube_image_repo"]  # localhost: resolved from /etc/hosts
    assert img["dst"] in ("127.0.0.1", "::1") and img["state"] == "closed"
    assert img["verdict"] == "pass"
    summary = recs[-1]
    assert summary["type"] == "summary" and summary["skipped"].get("unresolved") == 1
    start = recs[0]
    assert start["planned"] == len(results)
    assert "UNKNOWN endpoint.files_repo" in res["err"] and "files.portmesh.invalid" in res["err"]
    from test_schema import errors  # scanner/schema.json, the one the other outputs meet

    assert [(r["type"], errors(r)) for r in recs if errors(r)] == []


# --------------------------------------------------------------------------- mesh and report


def test_endpoints_cross_the_mesh_wire():
    from scanner.mesh.agent import site_from_wire, site_to_wire

    site = load_site([str(KUBEAN / "airgap.yml")])
    back = site_from_wire(orjson.loads(orjson.dumps(site_to_wire(site))))
    assert back.clusters[0].config.endpoints == site.clusters[0].config.endpoints
    assert list(plan(load_catalog(), back, SEL)) == list(plan(load_catalog(), site, SEL))


def test_mesh_probes_endpoints_from_every_agent_without_pair_records(tmp_path):
    """A real mesh on loopback: two agents started through ``--exec env`` (this machine), the
    registry a listener on 127.0.0.60. Every node probes it; no pair record names it."""
    import socket

    lst = socket.socket()
    lst.bind(("127.0.0.60", 0))
    lst.listen(16)
    port = lst.getsockname()[1]
    try:
        (tmp_path / "hosts.yml").write_text(
            "all:\n  hosts:\n    node1: {ansible_host: 127.0.0.2}\n"
            "    node2: {ansible_host: 127.0.0.3}\n  children:\n"
            "    kube_control_plane: {hosts: {node1: }}\n    kube_node: {hosts: {node2: }}\n"
            "    etcd: {hosts: {node1: }}\n"
        )
        (tmp_path / "group_vars").mkdir()
        (tmp_path / "group_vars" / "all.yml").write_text(f'registry_host: "127.0.0.60:{port}"\n')
        out = tmp_path / "mesh.ndjson"
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        p = subprocess.run(
            [sys.executable, "-m", "scanner", "mesh", "-i", str(tmp_path / "hosts.yml"),
             "--exec", "env", "--nodeport-sample", "1", "--method", "connect", "-o", str(out)],
            capture_output=True, timeout=180, env=env,
        )  # fmt: skip
    finally:
        lst.close()
    assert p.returncode == 0, p.stderr
    recs = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    ends = [r for r in recs if r["type"] == "result" and r["req"] == "endpoint.registry_host"]
    assert sorted((r["src_host"], r["dst"], r["port"], r["state"]) for r in ends) == [
        ("node1", "127.0.0.60", port, "open"),
        ("node2", "127.0.0.60", port, "open"),
    ]
    pairs = [r for r in recs if r["type"] == "pair"]
    assert pairs and not any(r["req"].startswith("endpoint.") for r in pairs)
    summary = recs[-1]
    assert summary["planned"] == summary["results"] == sum(r["type"] == "result" for r in recs)
    rep = run("report", str(out))
    assert rep.returncode == 0 and b"endpoint.registry_host" in rep.stdout


def test_group_vars_folder_applies_to_hosts_given_by_role():
    gv = KS / "mycluster" / "group_vars"
    site = load_site(hosts=["198.18.9.1,198.18.9.2"], role="node", vars_files=[str(gv)])
    fl = [flow_record(f) for f in plan(load_catalog(), site, SEL)]
    # --role node puts the hosts in k8s_cluster: group_vars/k8s_cluster applies
    assert "calico.bgp" in reqs(fl) and "endpoint.registry_host" in reqs(fl)
    site = load_site(hosts=["198.18.9.1"], role="etcd", vars_files=[str(gv)])
    # an etcd-only host is not in k8s_cluster: only group_vars/all reaches it
    assert site.clusters[0].config.features["bgp"].value is False
    assert [e.name for e in site.clusters[0].config.endpoints] == ["registry_host", "files_repo"]


# --------------------------------------------------------------------------- endpoint values

ENDPOINT_VALUES = [
    # (variables, expected (name, host, port, vars) endpoints)
    ({"registry_host": "198.18.3.5:5000"}, [("registry_host", "198.18.3.5", 5000)]),
    ({"registry_host": "reg.example"}, [("registry_host", "reg.example", 443)]),
    ({"minio_address": "198.18.3.6"}, [("minio_address", "198.18.3.6", 9000)]),
    ({"files_repo": "https://files.example/x"}, [("files_repo", "files.example", 443)]),
    ({"files_repo": "http://files.example/x"}, [("files_repo", "files.example", 80)]),
    ({"quay_image_repo": "198.18.3.5:5000/quay.io"}, [("quay_image_repo", "198.18.3.5", 5000)]),
    # only the authority must resolve: kube_version is unknown here
    (
        {
            "files_repo": "http://198.18.3.7:8080",
            "kubeadm_download_url": "{{ files_repo }}/v{{ kube_version }}/kubeadm",
        },
        [("files_repo", "198.18.3.7", 8080)],
    ),
    # the host itself behind an unknown variable: not planned
    ({"github_url": "https://{{ mirror_host }}/github.com"}, []),
    ({"registry_host": "[2001:2::5]:5000"}, [("registry_host", "2001:2::5", 5000)]),
    ({"bin_dir": "/usr/local/bin", "kube_proxy_mode": "ipvs"}, []),
]


@pytest.mark.parametrize(("values", "want"), ENDPOINT_VALUES)
def test_endpoint_values(values, want):
    from scanner.plan.kubean import VarsLayer, cluster_config

    cfg = cluster_config([VarsLayer("v.yml", values)])
    assert [(e.name, e.host, e.port) for e in cfg.endpoints] == want


def test_endpoint_value_that_is_no_host_names_file_and_variable():
    from scanner.plan.kubean import VarsLayer, cluster_config

    with pytest.raises(InventoryError, match=r"^v\.yml: variable kube_image_repo: "):
        cluster_config([VarsLayer("v.yml", {"kube_image_repo": "bad host:x/y"})])
