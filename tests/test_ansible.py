"""The playbook (scanner/ansible/portmesh.yml) run by real ansible-playbook on lab hosts, the
join of per-host check files, and Kubean's ConfigMap + ClusterOperation parsed back.

A lab namespace is an Ansible host: ``ansible_connection: local`` with an
``ansible_python_interpreter`` wrapper that runs ``ip netns exec NS python3 "$@"``, so every
module (and every command it runs: the responder, the check) runs inside that host's netns.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import orjson
import pytest
import yaml

from scanner.ansible import playbook_text
from scanner.ansible.kubean import kubean_documents
from scanner.lab.faults import Fault

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ANSIBLE = shutil.which("ansible-playbook", path=str(BIN)) or shutil.which("ansible-playbook")
needs_ansible = pytest.mark.skipif(ANSIBLE is None, reason="needs ansible-core (test extras)")

# node3 -> node2 on tcp/7000 dropped (one-way); node1 <-> node4 udp/5000 dropped both ways
FAULTS = [
    Fault("node2", "in", "tcp", ((7000, 7000),), "drop", "node3"),
    Fault("node4", "in", "udp", ((5000, 5000),), "drop", "node1"),
    Fault("node1", "in", "udp", ((5000, 5000),), "drop", "node4"),
]
CATALOG = """
[[requirement]]
id = "lab.tcp"
component = "lab"
proto = "tcp"
ports = "2380,7000"
description = "lab tcp"
dst_role = "node"
src_roles = ["node"]

[[requirement]]
id = "lab.udp"
component = "lab"
proto = "udp"
ports = "5000"
description = "lab udp"
dst_role = "node"
src_roles = ["node"]
"""


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, **kw)


# planned over both families on a dual-stack lab, as Calico VXLAN is (calico_vxlan_mode_ipv6)
CATALOG_VXLAN = """
[[requirement]]
id = "lab.vxlan"
component = "lab"
proto = "udp"
ports = "5001"
description = "lab udp, over IPv6 too"
dst_role = "node"
src_roles = ["node"]
condition = { cni = "calico", feature = "vxlan" }
"""


def lab_catalog(path: Path, extra: str = "") -> Path:
    from scanner.catalog import load_catalog

    text = "".join(f'[[requirement]]\nid = "{r.id}"\ndisabled = true\n\n' for r in load_catalog())
    path.write_text(text + CATALOG + extra)
    return path


def ansible_inventory(lab, tmp: Path, ghost: str | None = None, **plan_vars) -> Path:
    """The lab's kubespray inventory, every host reached through its own netns; ``ghost``: one
    more host whose namespace does not exist (every task on it fails)."""
    from scanner.lab.lab import inventory_doc

    doc = inventory_doc(lab)
    if ghost is not None:
        addr = str(lab.hosts[-1].addr).rsplit(".", 1)[0] + ".200"
        doc["all"]["hosts"][ghost] = {"ansible_host": addr, "ip": addr, "access_ip": addr}
        doc["all"]["children"]["kube_node"]["hosts"][ghost] = None
        wrapper = tmp / f"python-{ghost}"
        wrapper.write_text(
            f'#!/bin/sh\nexec ip netns exec {lab.name}-{ghost}-none /usr/bin/python3 "$@"\n'
        )
        wrapper.chmod(0o755)
        doc["all"]["hosts"][ghost].update(
            {"ansible_connection": "local", "ansible_python_interpreter": str(wrapper)}
        )
    for h in lab.hosts:
        wrapper = tmp / f"python-{h.name}"
        wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {h.ns} /usr/bin/python3 "$@"\n')
        wrapper.chmod(0o755)
        doc["all"]["hosts"][h.name].update(
            {"ansible_connection": "local", "ansible_python_interpreter": str(wrapper)}
        )
    # a plan variable Ansible sees: every host's check must plan with it (group_vars.yml)
    doc["all"]["vars"] = {"kube_apiserver_node_port_range": "31000-31010", **plan_vars}
    path = tmp / "hosts.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def ansible_playbook(inv: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    book = tmp / "portmesh.yml"
    cp = run([sys.executable, "-m", "scanner", "ansible", "playbook"])
    assert cp.returncode == 0, cp.stderr
    book.write_text(cp.stdout)
    env = {
        **os.environ,
        "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-local"),
        "ANSIBLE_HOME": str(tmp / "ansible-home"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_HOST_KEY_CHECKING": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    assert ANSIBLE is not None
    return run([ANSIBLE, "-i", str(inv), str(book), "-f", "8", *extra], cwd=tmp, env=env)


def records(path: Path) -> list[dict]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines() if x.strip()]


# ---- without a lab --------------------------------------------------------------------------


def test_playbook_is_package_data_and_valid_yaml() -> None:
    cp = run([sys.executable, "-m", "scanner", "ansible", "playbook"])
    assert cp.returncode == 0 and cp.stdout == playbook_text()
    plays = yaml.safe_load(cp.stdout)
    assert [p["hosts"] for p in plays] == ["{{ portmesh_hosts | default('all') }}", "localhost"]
    assert plays[0]["strategy"] == "linear"  # every task a barrier over all hosts
    text = cp.stdout
    for var in ("portmesh_results", "portmesh_with", "portmesh_without", "portmesh_cni",
                "portmesh_nodeport_sample", "portmesh_emit", "portmesh_bundle"):  # fmt: skip
        assert var in text, var


@needs_ansible
def test_playbook_passes_ansible_syntax_check(tmp_path: Path) -> None:
    book = tmp_path / "portmesh.yml"
    book.write_text(playbook_text())
    inv = tmp_path / "hosts.ini"
    inv.write_text("node1 ansible_connection=local\n")
    cp = run([ANSIBLE, "-i", str(inv), str(book), "--syntax-check"],  # type: ignore[list-item]
             env={**os.environ, "ANSIBLE_HOME": str(tmp_path / "ah")})  # fmt: skip
    assert cp.returncode == 0, cp.stdout + cp.stderr


def test_playbook_passes_every_variable_the_planner_follows() -> None:
    """One place: the playbook's lists are the planner's (per-host and cluster-wide names, and
    the endpoint families by suffix), so a variable the planner reads never stays behind."""
    from scanner.plan.ansible_vars import PLAN_VAR_SUFFIXES, PLAN_VARS, deciding_names
    from scanner.plan.clusters import ADDRESS6_VARS, ADDRESS_VARS, PLAN_HOST_VARS
    from scanner.plan.endpoints import is_endpoint_var
    from scanner.plan.kubean import KNOWN_VARS, VarsLayer

    (play, _) = yaml.safe_load(playbook_text())
    assert tuple(play["vars"]["pm_host_vars"]) == PLAN_HOST_VARS
    assert tuple(play["vars"]["pm_plan_vars"]) == PLAN_VARS
    assert tuple(play["vars"]["pm_plan_var_suffixes"]) == PLAN_VAR_SUFFIXES
    assert set(ADDRESS_VARS) | set(ADDRESS6_VARS) | {"ansible_user"} == set(PLAN_HOST_VARS)
    assert set(KNOWN_VARS) <= set(PLAN_VARS)
    names = [
        "kube_image_repo",
        "calico_ctl_download_url",
        "docker_rh_repo_base_url",
        "https_proxy",
        "containerd_registries_mirrors",
        "loadbalancer_apiserver",
        "not_a_plan_var",
        *KNOWN_VARS,
    ]
    layer = VarsLayer("x", dict.fromkeys(names, "v"))
    got = set(deciding_names([layer]))
    assert got == {n for n in names if n != "not_a_plan_var"}
    assert all(is_endpoint_var(n) for n in got - set(PLAN_VARS))


@needs_ansible
def test_playbook_inventory_plans_what_portmesh_plan_does(tmp_path: Path) -> None:
    """The playbook's first tasks (the variables as Ansible sees them on every host, then the
    inventory every host plans from), run by ansible-playbook on a dual-stack inventory with
    endpoint families and a template Ansible cannot finish (kubespray's kube_version is no part
    of the play): `portmesh plan` on that inventory gives the flows it gives on the original."""
    inv = tmp_path / "hosts.yml"
    inv.write_text(yaml.safe_dump({"all": {
        "vars": {"enable_dual_stack_networks": True, "calico_vxlan_mode_ipv6": "Always",
                 "kube_apiserver_node_port_range": "31000-31002",
                 "reg_ip": "198.18.9.9", "registry_host": "{{ reg_ip }}:5000",
                 "files_repo": "http://198.18.9.10:8080",
                 "kubeadm_download_url": "{{ files_repo }}/dl/v{{ kube_version }}/kubeadm",
                 "mirror_ip": "198.18.9.11", "github_url": "http://{{ mirror_ip }}/v{{ kube_version }}",
                 "containerd_registries_mirrors": [{"prefix": "docker.io", "mirrors": [
                     {"host": "http://198.18.9.12:5001"}]}],
                 "ansible_connection": "local", "ansible_python_interpreter": sys.executable},
        "hosts": {"node1": {"ansible_host": "198.18.1.1", "ip": "198.18.1.1", "ip6": "2001:2::1"},
                  "node2": {"ansible_host": "198.18.1.2", "access_ip": "198.18.1.22",
                            "access_ip6": "2001:2::2", "ansible_user": "core"},
                  "node3": {"ansible_host": "198.18.1.3", "ip6": "2001:2::3"}},
        "children": {"kube_control_plane": {"hosts": {"node1": None}},
                     "kube_node": {"hosts": {"node2": None, "node3": None}},
                     "etcd": {"hosts": {"node1": None}},
                     "k8s_cluster": {"children": {"kube_control_plane": None, "kube_node": None}}},
    }}))  # fmt: skip
    (play, _) = yaml.safe_load(playbook_text())
    out = tmp_path / "inventory.yml"
    book = tmp_path / "t.yml"
    tasks = [*play["tasks"][:2], {"run_once": True, "ansible.builtin.copy": {
        "dest": str(out), "content": "{{ pm_inventory | to_json }}"}}]  # fmt: skip
    book.write_text(yaml.safe_dump([{**play, "tasks": tasks}]))
    cp = run([ANSIBLE, "-i", str(inv), str(book)],  # type: ignore[list-item]
             env={**os.environ, "ANSIBLE_HOME": str(tmp_path / "ah")})  # fmt: skip
    assert cp.returncode == 0, cp.stdout + cp.stderr

    def flows(path: Path) -> list[bytes]:
        cp = run([sys.executable, "-m", "scanner", "plan", "--format", "ndjson", "-i", str(path)])
        assert cp.returncode == 0, cp.stderr
        return sorted(x for x in cp.stdout.encode().splitlines() if b'"type":"flow"' in x)

    want = flows(inv)
    assert flows(out) == want
    text = b"\n".join(want)
    for needle in (b"2001:2::", b"198.18.1.22", b"198.18.9.9", b"198.18.9.10", b"198.18.9.11",
                   b"198.18.9.12", b'"af":"ipv6"'):  # fmt: skip
        assert needle in text, needle
    doc = yaml.safe_load(out.read_text())
    assert doc["all"]["hosts"]["node2"]["ansible_user"] == "core"  # a host's own stays its own
    assert "ansible_user" not in doc["all"]["vars"]


def test_kubean_yaml_parses_back_with_the_prehook_and_the_playbook() -> None:
    cp = run([sys.executable, "-m", "scanner", "ansible", "kubean", "--cluster", "cluster1",
              "-e", "portmesh_nodeport_sample=16"])  # fmt: skip
    assert cp.returncode == 0, cp.stderr
    cm, op = list(yaml.safe_load_all(cp.stdout))
    assert cm["kind"] == "ConfigMap" and cm["apiVersion"] == "v1"
    assert cm["metadata"] == {"name": "cluster1-portmesh", "namespace": "kubean-system",
                              "labels": {"app.kubernetes.io/name": "portmesh"}}  # fmt: skip
    assert cm["data"]["portmesh.yml"] == playbook_text()  # byte for byte
    assert op["apiVersion"] == "kubean.io/v1alpha1" and op["kind"] == "ClusterOperation"
    spec = op["spec"]
    assert spec["cluster"] == "cluster1" and spec["action"] == "cluster.yml"
    assert spec["actionType"] == "playbook" and spec["image"]
    (hook,) = spec["preHook"]
    assert hook == {
        "actionType": "playbook",
        "action": "portmesh.yml",
        "actionSource": "configmap",
        "actionSourceRef": {"name": "cluster1-portmesh", "namespace": "kubean-system"},
        "extraArgs": "-e portmesh_nodeport_sample=16",
    }
    # the data matches the function's, and the ConfigMap holds the key the hook names
    assert [cm, op] == kubean_documents("cluster1", extra_args="-e portmesh_nodeport_sample=16")
    assert hook["action"] in cm["data"]


@pytest.mark.parametrize(
    ("extra", "want"),
    [
        (["portmesh_nodeport_sample=16"], "-e portmesh_nodeport_sample=16"),
        (
            ['{"portmesh_without": ["istio", "x"]}', "portmesh_emit=failures"],
            """-e '{"portmesh_without": ["istio", "x"]}' -e portmesh_emit=failures""",
        ),
        (['portmesh_without=["istio"]'], """-e '{"portmesh_without": ["istio"]}'"""),
        (["portmesh_with=[cilium, hubble]"], """-e '{"portmesh_with": ["cilium", "hubble"]}'"""),
        (["portmesh_cmd=python3 -m scanner"], """-e '{"portmesh_cmd": "python3 -m scanner"}'"""),
    ],
)
def test_kubean_extra_vars_keep_lists_typed(extra: list[str], want: str) -> None:
    """A list reaches the preHook's ansible-playbook as a JSON extra var, never as a string."""
    argv = [sys.executable, "-m", "scanner", "ansible", "kubean", "--cluster", "c1"]
    cp = run(argv + [w for e in extra for w in ("-e", e)])
    assert cp.returncode == 0, cp.stderr
    (hook,) = list(yaml.safe_load_all(cp.stdout))[1]["spec"]["preHook"]
    assert hook["extraArgs"] == want


@needs_ansible
def test_playbook_list_variables_from_strings_are_never_split_per_character(
    tmp_path: Path,
) -> None:
    """The playbook's own list expressions (pm_with ...), evaluated by ansible-playbook on the
    strings `-e KEY=VALUE` gives: JSON/YAML lists are parsed, other text split on commas."""
    (play, _) = yaml.safe_load(playbook_text())
    names = ["pm_with", "pm_without", "pm_catalog", "pm_vars", "pm_check_args"]
    book = tmp_path / "t.yml"
    book.write_text(yaml.safe_dump([{
        "hosts": "localhost", "gather_facts": False,
        "vars": {n: play["vars"][n] for n in names},
        "tasks": [{"ansible.builtin.copy": {"dest": str(tmp_path / "out.json"),
                                            "content": "{{ %s | to_json }}" % (
                                                "[" + ", ".join(names) + "]")}}],
    }]))  # fmt: skip
    cp = run([ANSIBLE, "-i", "localhost,", "-c", "local", str(book),  # type: ignore[list-item]
              "-e", 'portmesh_with=["istio"]', "-e", "portmesh_without=istio,kube-vip",
              "-e", "portmesh_catalog=[/a/b.toml,/c.toml]",
              "-e", '{"portmesh_check_args": "--retries 2", "portmesh_vars": ["/v.yml"]}',
              "-e", f"ansible_python_interpreter={sys.executable}"],
             env={**os.environ, "ANSIBLE_HOME": str(tmp_path / "ah")})  # fmt: skip
    assert cp.returncode == 0, cp.stdout + cp.stderr
    got = orjson.loads((tmp_path / "out.json").read_bytes())
    assert got == [["istio"], ["istio", "kube-vip"], ["/a/b.toml", "/c.toml"], ["/v.yml"],
                   ["--retries", "2"]]  # fmt: skip


@pytest.mark.parametrize(
    "argv",
    [
        ["--cluster", "Bad_Name"],
        ["--cluster", "c1", "-e", "novalue"],
        ["--cluster", "c1", "-e", '{"a": 1'],
        ["--cluster", "c1", "-e", '{"bad key": 1}'],
        ["--cluster", "c1", "-e", "x=[1"],
        ["--cluster", "c1", "--image", " "],
    ],
)
def test_kubean_bad_input_is_one_line(argv: list[str]) -> None:
    cp = run([sys.executable, "-m", "scanner", "ansible", "kubean", *argv])
    assert cp.returncode == 2 and cp.stderr.count("\n") == 1 and "Traceback" not in cp.stderr


# ---- the lab --------------------------------------------------------------------------------


def _expected_pairs() -> dict[tuple[str, str, str], str]:
    hosts = [f"node{i}" for i in range(1, 5)]
    out = {}
    for req in ("lab.tcp", "lab.udp"):
        for a in hosts:
            for b in hosts:
                if a < b:
                    out[(req, a, b)] = "pass"
    out[("lab.tcp", "node2", "node3")] = "one-way"
    out[("lab.udp", "node1", "node4")] = "fail"
    return out


@pytest.mark.lab
@needs_ansible
def test_playbook_on_a_faulted_lab_fails_naming_the_one_way_pair(make_lab, tmp_path: Path) -> None:
    lab = make_lab(hosts=4)
    lab.apply_faults(FAULTS)
    inv = ansible_inventory(lab, tmp_path)
    cat = lab_catalog(tmp_path / "lab.toml")
    cp = ansible_playbook(
        inv, tmp_path,
        "-e", f"portmesh_cmd='{sys.executable} -m scanner'",
        "-e", f"portmesh_local_cmd='{sys.executable} -m scanner'",
        "-e", orjson.dumps({"portmesh_catalog": [str(cat)], "portmesh_results": "out"}).decode(),
    )  # fmt: skip
    log = cp.stdout + cp.stderr
    assert cp.returncode != 0, log[-3000:]  # the play failed ...
    assert "fail when a required flow fails" in log, log[-4000:]
    fail_at = log.index("fail when a required flow fails")
    tail = log[fail_at:]
    assert "failed:" in tail or "fatal:" in tail, tail[-2000:]
    # ... naming the one-way pair, with the direction that fails
    assert "ONE-WAY lab.tcp" in tail and "node2 <-> node3" in tail
    assert "node3 -> node2: tcp/7000 filtered (no-response)" in tail
    # every host probed and its NDJSON was fetched to the control node
    out = tmp_path / "out"
    for h in lab.hosts:
        check = records(out / h.name / "check.ndjson")
        assert check[0]["type"] == "start" and check[-1]["type"] == "summary"
        assert check[-1]["results"] == check[0]["planned"] == 9  # 3 peers x (2 tcp + 1 udp)
        assert any(r["type"] == "ready" for r in records(out / h.name / "respond.ndjson"))
        assert check[0]["plan"]["clusters"][0]["nodeport_range"] == "31000-31010"
    # the joined run is mesh's: one scan_id, every flow, the pair verdicts of the ground truth
    joined = records(out / "mesh.ndjson")
    assert joined[0]["type"] == "start" and joined[-1]["type"] == "summary"
    assert len({r["scan_id"] for r in joined}) == 1
    results = [r for r in joined if r["type"] == "result"]
    summary = joined[-1]
    assert summary["planned"] == summary["results"] == len(results) == 36
    pairs = {(p["req"], p["a"], p["b"]): p["verdict"] for p in joined if p["type"] == "pair"}
    assert pairs == _expected_pairs()
    assert summary["pairs"] == {"pass": 10, "fail": 1, "one-way": 1, "unknown": 0}
    fails = Counter(
        (r["src_host"], r["host"], r["port"]) for r in results if r["verdict"] == "fail"
    )
    assert fails == Counter({("node3", "node2", 7000): 1, ("node1", "node4", 5000): 1,
                             ("node4", "node1", 5000): 1})  # fmt: skip
    assert (out / "report.html").stat().st_size > 0
    # nothing left behind in the hosts: responders stopped, temporary directories removed
    for h in lab.hosts:
        ss = lab.run(h.name, ["ss", "-Htuln"], capture_output=True, text=True).stdout.strip()
        assert not ss, (h.name, ss)


@pytest.mark.lab
@needs_ansible
def test_playbook_on_a_dual_stack_lab_probes_the_plan_over_both_families(
    make_lab, tmp_path: Path
) -> None:
    """The play probes every flow `portmesh plan` plans on the same inventory, IPv6 included."""
    from scanner.lab.lab import DUAL_STACK_VARS

    lab = make_lab(hosts=2)
    inv = ansible_inventory(lab, tmp_path, **DUAL_STACK_VARS)
    cat = lab_catalog(tmp_path / "lab.toml", CATALOG_VXLAN)
    cp = run([sys.executable, "-m", "scanner", "plan", "--count", "--format", "ndjson",
              "-i", str(inv), "--catalog", str(cat)])  # fmt: skip
    assert cp.returncode == 0, cp.stderr
    planned = orjson.loads(cp.stdout.splitlines()[0])["flows"]
    cp = ansible_playbook(
        inv, tmp_path,
        "-e", f"portmesh_cmd='{sys.executable} -m scanner'",
        "-e", f"portmesh_local_cmd='{sys.executable} -m scanner'",
        "-e", orjson.dumps({"portmesh_catalog": [str(cat)], "portmesh_html": False}).decode(),
    )  # fmt: skip
    log = cp.stdout + cp.stderr
    assert cp.returncode == 0, log[-3000:]
    joined = records(tmp_path / "portmesh-results" / "mesh.ndjson")
    results = [r for r in joined if r["type"] == "result"]
    assert joined[-1]["planned"] == joined[-1]["results"] == len(results) == planned == 10
    assert Counter(r["af"] for r in results) == {"ipv4": 8, "ipv6": 2}  # lab.vxlan both ways
    assert {r["verdict"] for r in results} == {"pass"}


@pytest.mark.lab
@needs_ansible
def test_a_host_that_fails_in_the_play_is_named(make_lab, tmp_path: Path) -> None:
    lab = make_lab(hosts=2)
    inv = ansible_inventory(lab, tmp_path, ghost="ghost")
    cat = lab_catalog(tmp_path / "lab.toml")
    cp = ansible_playbook(
        inv, tmp_path,
        "-e", f"portmesh_cmd='{sys.executable} -m scanner'",
        "-e", f"portmesh_local_cmd='{sys.executable} -m scanner'",
        "-e", orjson.dumps({"portmesh_catalog": [str(cat)], "portmesh_html": False}).decode(),
    )  # fmt: skip
    log = cp.stdout + cp.stderr
    assert cp.returncode != 0, log[-3000:]
    assert "portmesh: no results from ghost (they failed a task above)" in log, log[-3000:]
    joined = records(tmp_path / "portmesh-results" / "mesh.ndjson")
    summary = joined[-1]
    # the two live hosts probed everything they owe: each other, and ghost (which fails)
    assert summary["results"] == summary["planned"] == 2 * 2 * 3
    bad = {
        (r["src_host"], r["host"])
        for r in joined
        if r["type"] == "result" and r["verdict"] == "fail"
    }
    assert bad == {("node1", "ghost"), ("node2", "ghost")}


@pytest.mark.lab
@needs_ansible
def test_playbook_with_a_bundle_on_hosts_with_only_python3(make_lab, tmp_path: Path) -> None:
    """Hosts run /usr/bin/python3 with no portmesh and no dependency: everything comes from
    the wheels of portmesh_bundle (as built for an air-gapped site)."""
    bare = run(["/usr/bin/python3", "-c", "import orjson"])
    if bare.returncode == 0:
        pytest.skip("/usr/bin/python3 has orjson: not a bare python3")
    wheels = tmp_path / "wheels"
    cp = run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)]
    )
    if cp.returncode != 0:
        pytest.skip(f"cannot build the portmesh wheel: {cp.stderr.strip()[-200:]}")
    cp = run([sys.executable, "-m", "pip", "download", "-q", "-d", str(wheels),
              "--only-binary=:all:", "--python-version", "3.11",
              "uvloop", "scapy", "orjson", "click", "PyYAML"])  # fmt: skip
    if cp.returncode != 0:
        pytest.skip(f"cannot download the dependency wheels: {cp.stderr.strip()[-200:]}")
    lab = make_lab(hosts=4)
    lab.apply_faults(FAULTS[:1])
    inv = ansible_inventory(lab, tmp_path)
    cat = lab_catalog(tmp_path / "lab.toml")
    cp = ansible_playbook(
        inv, tmp_path,
        "-e", "portmesh_cmd=/nonexistent/portmesh",  # never used with a bundle
        "-e", "portmesh_python=/usr/bin/python3",
        "-e", orjson.dumps({"portmesh_catalog": [str(cat)], "portmesh_bundle": str(wheels),
                            "portmesh_with": [], "portmesh_html": False}).decode(),
    )  # fmt: skip
    log = cp.stdout + cp.stderr
    assert cp.returncode != 0, log[-3000:]
    assert "ONE-WAY lab.tcp" in log and "node2 <-> node3" in log, log[-3000:]
    joined = records(tmp_path / "portmesh-results" / "mesh.ndjson")
    assert joined[-1]["results"] == joined[-1]["planned"] == 36
    assert joined[-1]["pairs"]["one-way"] == 1
    assert not list(Path("/tmp").glob("portmesh-join-*")), "the join's unpacked bundle is left"


# ---- the join without a lab -----------------------------------------------------------------


def test_join_of_per_host_files_gives_the_mesh_pairs(tmp_path: Path) -> None:
    """A mesh's results split into one check-like file per source host (each its own scan_id,
    start and summary), joined back: the same pair verdicts as the mesh's own pair records."""
    src = ROOT / "tests" / "data" / "report" / "mesh4.ndjson"
    recs = records(src)
    by_host: dict[str, list[dict]] = {}
    for r in recs:
        if r["type"] == "result":
            by_host.setdefault(r["src_host"], []).append(r)
    files = []
    for i, (host, rs) in enumerate(sorted(by_host.items())):
        sid = f"{i:016x}"
        lines = [{"type": "start", "version": 1, "scan_id": sid, "ts": "2026-11-26T10:00:00Z",
                  "argv": ["portmesh", "check", "--from", host], "planned": len(rs),
                  "check": {"host": host, "expect": "reachable", "responder": True}}]  # fmt: skip
        lines += [{**r, "scan_id": sid} for r in rs]
        lines.append({"type": "summary", "scan_id": sid, "ts": "2026-11-26T10:00:01Z",
                      "planned": len(rs), "results": len(rs), "states": {}, "elapsed_s": 1.0})  # fmt: skip
        f = tmp_path / f"{host}.ndjson"
        f.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines))
        files.append(str(f))
    cp = run([sys.executable, "-m", "scanner", "report", "--join", "--format", "ndjson", *files])
    assert cp.returncode == 1, cp.stderr  # mesh4 holds failures
    from test_schema import validate_stream

    joined = validate_stream(cp.stdout.encode())  # the schema of every portmesh record
    assert joined[0]["type"] == "start" and joined[-1]["type"] == "summary"
    assert len({r["scan_id"] for r in joined}) == 1
    n = sum(len(v) for v in by_host.values())
    assert joined[0]["planned"] == joined[-1]["planned"] == joined[-1]["results"] == n
    assert joined[-1]["join"]["incomplete"] == []
    want = {(p["req"], p["a"], p["b"]): (p["a_to_b"], p["b_to_a"], p["verdict"])
            for p in recs if p["type"] == "pair"}  # fmt: skip
    got = {(p["req"], p["a"], p["b"]): (p["a_to_b"], p["b_to_a"], p["verdict"])
           for p in joined if p["type"] == "pair"}  # fmt: skip
    assert got == want and "one-way" in {v[2] for v in got.values()}
    one_way = [k for k, v in want.items() if v[2] == "one-way"]
    assert all(f"{a} <-> {b}" in cp.stderr for _, a, b in one_way)  # named on stderr
    # the text view of the joined run reports the same one-way findings as the mesh file
    text = run([sys.executable, "-m", "scanner", "report", "--join", *files]).stdout
    assert [ln for ln in text.splitlines() if "one-way" in ln] == [
        ln
        for ln in run([sys.executable, "-m", "scanner", "report", str(src)]).stdout.splitlines()
        if "one-way" in ln
    ]


def test_join_of_a_cut_short_file_says_so(tmp_path: Path) -> None:
    f = tmp_path / "node1.ndjson"
    f.write_bytes(
        orjson.dumps({"type": "start", "version": 1, "scan_id": "a" * 16, "ts": "x",
                      "argv": ["portmesh", "check"], "planned": 5, "check": {"host": "node1"}})
        + b"\n"
        + orjson.dumps({"type": "result", "scan_id": "a" * 16, "src": "198.18.0.1",
                        "dst": "198.18.0.2", "host": "node2", "proto": "tcp", "port": 1,
                        "state": "open", "reason": "responder", "src_host": "node1",
                        "req": "r", "verdict": "pass"}) + b"\n"
    )  # fmt: skip
    cp = run([sys.executable, "-m", "scanner", "report", "--join", "--format", "ndjson", str(f)])
    assert cp.returncode == 0, cp.stderr
    summary = orjson.loads(cp.stdout.splitlines()[-1])
    assert summary["planned"] == 5 and summary["results"] == 1
    assert summary["join"]["incomplete"] == ["a" * 16]
    assert "INCOMPLETE" in cp.stderr


def test_join_bad_input_is_one_line(tmp_path: Path) -> None:
    mesh4 = ROOT / "tests" / "data" / "report" / "mesh4.ndjson"  # a mesh run, not a check run
    for argv, want in (
        ([str(mesh4)], "is not a `portmesh check` run"),
        ([str(tmp_path / "missing.ndjson")], "cannot read"),
        (["-"], "not stdin"),
    ):
        cp = run([sys.executable, "-m", "scanner", "report", "--join", *argv], input="")
        assert cp.returncode == 2 and want in cp.stderr, cp.stderr
        assert cp.stderr.count("\n") == 1 and "Traceback" not in cp.stderr


def _check_file(path: Path, host: str, results: list[dict]) -> str:
    sid = (host.encode().hex() + "0" * 16)[:16]
    lines = [{"type": "start", "version": 1, "scan_id": sid, "ts": "2026-11-26T10:00:00Z",
              "argv": ["portmesh", "check", "--from", host], "planned": len(results),
              "check": {"host": host, "expect": "reachable", "responder": True}}]  # fmt: skip
    lines += [{"type": "result", "scan_id": sid, "src_host": host, **r} for r in results]
    lines.append({"type": "summary", "scan_id": sid, "ts": "2026-11-26T10:00:01Z",
                  "planned": len(results), "results": len(results), "states": {},
                  "elapsed_s": 1.0})  # fmt: skip
    path.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines))
    return str(path)


def test_join_names_failures_with_no_reverse_direction(tmp_path: Path) -> None:
    """etcd.peer planned one way only (node3 is no etcd member: it reaches etcd, etcd does not
    reach it): its failing direction has no pair record, and the summary still names it."""
    addr = {"node1": "198.18.0.1", "node2": "198.18.0.2", "node3": "198.18.0.3"}

    def res(src: str, dst: str, req: str, port: int, ok: bool, proto: str = "tcp") -> dict:
        return {"src": addr[src], "dst": addr[dst], "host": dst, "proto": proto, "port": port,
                "state": "open" if ok else "filtered", "reason": "responder" if ok else
                "no-response", "req": req, "verdict": "pass" if ok else "fail"}  # fmt: skip

    files = [
        _check_file(tmp_path / "node1.ndjson", "node1",
                    [res("node1", "node2", "lab.tcp", 7000, True)]),
        _check_file(tmp_path / "node2.ndjson", "node2",
                    [res("node2", "node1", "lab.tcp", 7000, True)]),
        _check_file(tmp_path / "node3.ndjson", "node3",
                    [res("node3", "node1", "etcd.client", 2379, False),
                     res("node3", "node2", "etcd.client", 2379, True)]),
    ]  # fmt: skip
    cp = run([sys.executable, "-m", "scanner", "report", "--join", "--format", "ndjson", *files])
    assert cp.returncode == 1, cp.stderr
    joined = [orjson.loads(x) for x in cp.stdout.splitlines()]
    assert not [p for p in joined if p["type"] == "pair" and p["verdict"] != "pass"]
    lines = [ln for ln in cp.stderr.splitlines() if "etcd.client" in ln]
    assert len(lines) == 1 and "node3 -> node1" in lines[0], cp.stderr
    assert "tcp/2379" in lines[0] and "filtered (no-response)" in lines[0], lines
    assert "node2" not in lines[0]  # the passing direction is not listed
