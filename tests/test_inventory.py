"""Inventory readers: kubespray/Kubean YAML and INI, ConfigMaps, the site file, --hosts (pure)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scanner.core.model import Site
from scanner.errors import InventoryError
from scanner.plan.inventory import load_site, local_host
from scanner.plan.inventory_files import expand_pattern, parse_inventory_text

DATA = Path(__file__).parent / "data" / "inventories"
ROOT = Path(__file__).parent.parent


def inv(name: str) -> str:
    return str(DATA / name)


def roles(site: Site) -> dict[str, set[str]]:
    return {h.name: set(h.roles) for h in site.hosts()}


CP = {"node", "control_plane"}
CP_ETCD = CP | {"etcd"}
WORKER = {"node", "worker"}

# (fixture, expected name -> roles, expected name -> address)
FIXTURES = [
    (
        "kubean-hosts-cm.yml",
        {
            "master1": CP_ETCD,
            "master2": CP_ETCD,
            "master3": CP_ETCD,
            "worker1": WORKER,
            "worker2": WORKER,
        },
        {"master1": "198.18.10.11", "worker1": "198.18.10.21", "worker2": "198.18.10.22"},
    ),
    (
        "kubean-cluster.yml",
        {"edge1": CP_ETCD, "edge2": WORKER},
        {"edge1": "198.18.20.11", "edge2": "198.18.20.12"},
    ),
    (
        "kubectl-list.yml",
        {"node1": CP_ETCD, "node2": WORKER},
        {"node1": "198.18.30.11"},
    ),
    (
        "kubespray-hosts.yml",
        {
            "cp1": CP_ETCD,
            "cp2": CP,
            "w1": WORKER,
            "w2": WORKER,
            "etcd1": {"etcd"},
            "rr1": {"node", "calico_rr"},
        },
        {"cp1": "198.18.40.11", "w2": "198.18.40.22", "etcd1": "198.18.40.31"},
    ),
    (
        "kubespray-legacy.yml",
        {"node1": CP_ETCD, "node2": WORKER, "node3": WORKER},
        {"node1": "198.18.50.11", "node2": "198.18.50.12", "node3": "198.18.50.13"},
    ),
    (
        "inventory.ini",
        {"node1": CP_ETCD, "node2": WORKER, "198.18.60.13": WORKER},
        {"node1": "198.18.60.11", "node2": "198.18.60.12", "198.18.60.13": "198.18.60.13"},
    ),
]


@pytest.mark.parametrize(("fixture", "expected_roles", "addresses"), FIXTURES)
def test_fixture_roles_and_addresses(fixture, expected_roles, addresses):
    site = load_site([inv(fixture)])
    assert len(site.clusters) == 1
    cluster = site.clusters[0]
    assert cluster.kind == "standalone"
    assert roles(site) == expected_roles  # bastions and ungrouped spares are not cluster hosts
    got = {h.name: h.address for h in site.hosts()}
    for name, addr in addresses.items():
        assert got[name] == addr
    assert all(h.cluster == cluster.name for h in cluster.hosts)
    assert site.bootstrap is None and site.source == inv(fixture)


def test_address_order_is_access_ip_then_ip_then_ansible_host():
    text = """
all:
  hosts:
    a: {access_ip: 198.18.0.1, ip: 198.18.0.2, ansible_host: 198.18.0.3}
    b: {ip: 198.18.0.2, ansible_host: 198.18.0.3}
    c: {ansible_host: 198.18.0.3}
    d: {access_ip: "", ip: 198.18.0.4}
  children:
    kube_node: {hosts: {a: , b: , c: , d: }}
"""
    i = parse_inventory_text(text, "x.yml")
    from scanner.plan.inventory import inventory_hosts

    assert [h.address for h in inventory_hosts(i, "c")] == [
        "198.18.0.1",
        "198.18.0.2",
        "198.18.0.3",
        "198.18.0.4",
    ]


def test_ansible_user_and_cluster_names():
    site = load_site([inv("kubean-hosts-cm.yml")])
    assert site.clusters[0].name == "prod"  # from the ConfigMap name prod-hosts-conf
    users = {h.name: h.user for h in site.hosts()}
    assert users["master1"] == "root" and users["worker1"] == "ops"
    assert load_site([inv("kubean-cluster.yml")]).clusters[0].name == "edge"  # the Cluster resource
    assert load_site([inv("kubespray-hosts.yml")]).clusters[0].name == "kubespray-hosts"


def test_kubean_cluster_resource_pairs_the_vars_configmap():
    cfg = load_site([inv("kubean-cluster.yml")]).clusters[0].config
    assert cfg.cni.value == "cilium"  # not flannel from the unrelated ConfigMap in the same file
    assert cfg.nodeport_range.value == (31000, 31999)
    assert "(ConfigMap edge-vars-conf)" in cfg.cni.source


def test_kubectl_list_reads_hosts_and_vars():
    cfg = load_site([inv("kubectl-list.yml")]).clusters[0].config
    assert cfg.features["wireguard"].value is True
    assert cfg.features["wireguard6"].value is True
    assert cfg.features["typha"].value is True


def test_hosts_configmap_with_vars_configmap_air_gapped():
    site = load_site([inv("kubean-hosts-cm.yml")], [inv("kubean-vars-cm.yml")])
    cfg = site.clusters[0].config
    assert cfg.registry.value == ("198.18.10.2", 5000)
    assert cfg.minio.value == ("198.18.10.2", 9000)
    assert cfg.features["ipip"].value is True and cfg.features["vxlan"].value is False
    assert cfg.features["bgp"].value is True
    assert cfg.registry.source.startswith(
        inv("kubean-vars-cm.yml") + " (ConfigMap prod-vars-conf): registry_host="
    )


def test_inventory_group_vars_children_override_parents():
    cfg = load_site([inv("kubespray-hosts.yml")]).clusters[0].config
    # all.vars says CrossSubnet, k8s_cluster.vars says Always: the child group wins
    assert (
        cfg.features["vxlan"].source
        == f"{inv('kubespray-hosts.yml')} [k8s_cluster vars]: calico_vxlan_mode=Always"
    )
    assert cfg.features["typha"].value is True


def test_ini_vars_and_quotes():
    cfg = load_site([inv("inventory.ini")]).clusters[0].config
    assert cfg.features["ipip"].value is True and cfg.features["vxlan"].value is False
    assert cfg.features["ipip"].source.endswith("[k8s_cluster vars]: calico_ipip_mode=Always")


def test_precedence_inventory_vars_then_vars_files_in_order(tmp_path):
    hosts = tmp_path / "hosts.yml"
    hosts.write_text(
        "all:\n  vars:\n    calico_vxlan_mode: Always\n    typha_enabled: true\n    metallb_enabled: true\n"
        "  hosts:\n    n1: {ip: 198.18.0.1}\n  children:\n    kube_node: {hosts: {n1: }}\n"
    )
    one = tmp_path / "one.yml"
    one.write_text("calico_vxlan_mode: CrossSubnet\ntypha_enabled: false\n")
    two = tmp_path / "two.yml"
    two.write_text("calico_vxlan_mode: Never\n")
    cfg = load_site([str(hosts)], [str(one), str(two)]).clusters[0].config
    assert cfg.features["vxlan"].value is False
    assert cfg.features["vxlan"].source == f"{two}: calico_vxlan_mode=Never"
    assert cfg.features["typha"].value is False
    assert cfg.features["typha"].source == f"{one}: typha_enabled=false"
    assert cfg.features["metallb"].source == f"{hosts} [all vars]: metallb_enabled=true"
    # the other order: one.yml wins
    cfg = load_site([str(hosts)], [str(two), str(one)]).clusters[0].config
    assert cfg.features["vxlan"].source == f"{one}: calico_vxlan_mode=CrossSubnet"


def test_several_inventories_are_several_standalone_clusters():
    site = load_site([inv("kubespray-legacy.yml"), inv("kubectl-list.yml")])
    assert [c.name for c in site.clusters] == ["kubespray-legacy", "lab"]
    assert {c.kind for c in site.clusters} == {"standalone"}
    # Kubean names every cluster's hosts node1, node2...: the same name in two clusters is fine,
    # and each is told apart by its cluster (issue 19: agents, flows, pairs never mix them up)
    node1 = [h for h in site.hosts() if h.inventory_name == "node1"]
    assert [h.cluster for h in node1] == ["kubespray-legacy", "lab"]
    assert [h.name for h in node1] == ["node1@kubespray-legacy", "node1@lab"]
    assert len({h.name for h in site.hosts()}) == len(site.hosts())


def test_same_host_in_two_inventories_is_an_error():
    with pytest.raises(
        InventoryError, match="address 198.18.50.11 is host node1 of cluster kubespray-legacy and"
    ):
        load_site([inv("kubespray-legacy.yml"), inv("kubespray-legacy.yml")])


def test_address_template_resolves_from_host_vars():
    text = "all:\n  vars: {net: 198.18.7}\n  hosts:\n    n1: {ip: '{{ net }}.1'}\n  children:\n    kube_node: {hosts: {n1: }}\n"
    from scanner.plan.inventory import inventory_hosts

    assert inventory_hosts(parse_inventory_text(text, "t.yml"), "c")[0].address == "198.18.7.1"


# ---------------------------------------------------------------- the site file


def test_site_file():
    site = load_site([inv("site/site.yml")])
    assert site.source == inv("site/site.yml")
    assert site.bootstrap is not None
    assert (site.bootstrap.name, site.bootstrap.address, site.bootstrap.roles) == (
        "bootstrap",
        "198.18.0.2",
        frozenset({"bootstrap"}),
    )
    assert site.vips == {
        "istio_gateway": "198.18.0.200",
        "insight": "198.18.0.201",
        "registry": "198.18.0.2",
    }
    g, a, b = site.clusters
    assert (g.name, g.kind, a.kind, b.kind) == ("kpanda-global", "global", "worker", "worker")
    assert g.vips == {"kube_api": "198.18.1.100"}
    assert all(h.roles == {"node", "control_plane", "etcd", "global"} for h in g.hosts)
    assert all("global" not in h.roles for h in a.hosts + b.hosts)
    assert {h.name: set(h.roles) for h in b.hosts} == {"wb1": CP, "wb2": CP}
    # vars: the global inventory file's own vars ConfigMap; common vars for all
    assert g.config.features["kube-vip"].value is True
    assert all(c.config.registry.value == ("198.18.0.2", 443) for c in site.clusters)
    assert a.config.nodeport_range.value == (30000, 32000)  # worker-a's own vars file
    assert a.config.features["metallb"].value is True
    assert a.config.features["metallb"].source.endswith("cluster worker-a features.metallb=true")
    assert b.config.cni.value == "cilium" and g.config.cni.value == "calico"
    # what the site implies
    assert g.config.features["istio"].value is True and "istio" not in a.config.features
    assert all(c.config.features["insight"].value for c in site.clusters)
    assert all(c.config.features["deploy"].value for c in site.clusters)
    assert site.host("g2").cluster == "kpanda-global"


def test_cli_vars_apply_to_every_site_cluster_but_site_features_win(tmp_path):
    v = tmp_path / "v.yml"
    v.write_text("metallb_enabled: false\ntypha_enabled: true\n")
    site = load_site([inv("site/site.yml")], [str(v)])
    assert all(c.config.features["typha"].value for c in site.clusters)
    a = site.clusters[1]
    assert a.config.features["metallb"].value is True  # the site file states it explicitly


def write_site(tmp_path: Path, body: str) -> str:
    (tmp_path / "hosts.yml").write_text(
        "all:\n  hosts:\n    n1: {ip: 198.18.0.1}\n  children:\n    kube_node: {hosts: {n1: }}\n"
    )
    p = tmp_path / "site.yml"
    p.write_text(body)
    return str(p)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("portmesh_site: []\n", "must be a mapping"),
        ("portmesh_site:\n  clusters: []\n", "at least one cluster"),
        ("portmesh_site:\n  clusterz: []\n", "unexpected key 'clusterz'"),
        ("portmesh_site:\n  clusters: [{name: a}]\n", "exactly one of inventory or hosts"),
        (
            "portmesh_site:\n  clusters: [{name: a, inventory: missing.yml}]\n",
            "inventory: missing.yml: no such file: ",
        ),
        (
            "portmesh_site:\n  clusters: [{name: a, kind: big, inventory: hosts.yml}]\n",
            "kind 'big'",
        ),
        (
            "portmesh_site:\n  clusters: [{name: a, kind: global, inventory: hosts.yml},"
            " {name: b, kind: global, hosts: 198.18.0.9}]\n",
            "more than one global cluster",
        ),
        (
            "portmesh_site:\n  clusters: [{name: a, hosts: x}, {name: a, hosts: y}]\n",
            "cluster name used twice",
        ),
        (
            "portmesh_site:\n  clusters: [{name: a, inventory: hosts.yml, features: {teleport: true}}]\n",
            "unknown feature 'teleport'",
        ),
        (
            "portmesh_site:\n  clusters: [{name: a, inventory: hosts.yml, features: {ipip: maybe}}]\n",
            "features.ipip: expected true or false",
        ),
        (
            "portmesh_site:\n  clusters: [{name: a, inventory: hosts.yml, vips: {insight: 198.18.0.1}}]\n",
            "unknown VIP",
        ),
        (
            "portmesh_site:\n  vips: {istio_gateway: 'not an ip'}\n  clusters: [{name: a, hosts: x}]\n",
            "not an address",
        ),
        (
            "portmesh_site:\n  bootstrap: {name: b}\n  clusters: [{name: a, hosts: x}]\n",
            "bootstrap.address",
        ),
        ("portmesh_site:\n  version: 2\n  clusters: [{name: a, hosts: x}]\n", "version 2"),
        ("portmesh_site:\n  clusters: [{name: a, inventory: site.yml}]\n", "is a site file"),
        ("portmesh_site:\n  clusters: [{name: a, hosts: x, role: king}]\n", "unknown role 'king'"),
        (
            "portmesh_site:\n  clusters: [{name: a, inventory: hosts.yml, vars: nope.yml}]\n",
            "vars: nope.yml: no such file: ",
        ),
        (
            "portmesh_site: {clusters: [{name: a, hosts: x}]}\nother: 1\n",
            "unexpected top-level key",
        ),
        (
            "portmesh_site:\n  bootstrap: 198.18.0.1\n  clusters: [{name: a, hosts: [bootstrap=198.18.0.3]}]\n",
            "bootstrap name bootstrap is also a host",
        ),
    ],
)
def test_broken_site_files(tmp_path, body, needle):
    p = write_site(tmp_path, body)
    with pytest.raises(InventoryError) as e:
        load_site([p])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_site_file_must_be_alone(tmp_path):
    with pytest.raises(InventoryError, match="site file must be the only"):
        load_site([inv("site/site.yml"), inv("kubespray-legacy.yml")])


def test_site_key_alias_and_cluster_mapping(tmp_path):
    p = write_site(
        tmp_path,
        "site:\n  bootstrap: 198.18.0.5\n  clusters:\n    only:\n      kind: standalone\n      inventory: hosts.yml\n",
    )
    site = load_site([p])
    assert site.bootstrap.address == "198.18.0.5" and site.bootstrap.name == "bootstrap"
    assert site.clusters[0].name == "only" and site.clusters[0].hosts[0].cluster == "only"


# ---------------------------------------------------------------- --hosts


@pytest.mark.parametrize(
    ("role", "expected"),
    [
        ("node", {"node", "worker"}),
        ("worker", {"node", "worker"}),
        ("control_plane", {"node", "control_plane"}),
        ("control-plane,etcd", {"node", "control_plane", "etcd"}),
        ("etcd", {"etcd"}),
        ("calico_rr", {"calico_rr"}),
    ],
)
def test_quick_hosts_roles(role, expected):
    site = load_site(hosts=["198.18.0.1,198.18.0.2", "db=198.18.0.3"], role=role)
    (c,) = site.clusters
    assert c.kind == "standalone" and c.name == "cluster"
    assert [(h.name, h.address) for h in c.hosts] == [
        ("198.18.0.1", "198.18.0.1"),
        ("198.18.0.2", "198.18.0.2"),
        ("db", "198.18.0.3"),
    ]
    assert all(h.roles == expected for h in c.hosts)


def test_quick_hosts_with_vars(tmp_path):
    v = tmp_path / "v.yml"
    v.write_text("kube_network_plugin: cilium\n")
    assert (
        load_site(hosts=["198.18.0.1"], vars_files=[str(v)]).clusters[0].config.cni.value
        == "cilium"
    )


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({}, "no inventory"),
        ({"hosts": ["a b"]}, "not an address"),
        ({"hosts": [","]}, "no hosts given"),
        ({"hosts": ["198.18.0.1", "198.18.0.1"]}, "listed twice"),
        ({"hosts": ["198.18.0.1"], "role": "boss"}, "unknown role"),
        ({"hosts": ["198.18.0.1"], "inventories": ["x.yml"]}, "not both"),
    ],
)
def test_quick_hosts_errors(kwargs, needle):
    with pytest.raises(InventoryError, match=needle):
        load_site(**kwargs)


# ---------------------------------------------------------------- broken inventories

HOSTS_CM = "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c-hosts-conf}}\ndata:\n  hosts.yml: |\n{body}"


def cm(body: str) -> str:
    return HOSTS_CM.format(body="".join("    " + line + "\n" for line in body.splitlines()))


BROKEN = [
    ("yaml-error.yml", "all:\n  hosts:\n    n1: {ip: 198.18.0.1\n", "YAML error at line"),
    ("empty.yml", "", "empty inventory"),
    ("comments.yml", "# nothing here\n", "empty inventory"),
    ("list.yml", "- 198.18.0.1\n- 198.18.0.2\n", "not an inventory"),
    ("scalar.yml", "42\n", "not an inventory"),
    (
        "no-hosts.yml",
        "all:\n  children:\n    kube_node: {hosts: {}}\n",
        "empty inventory (no hosts)",
    ),
    (
        "no-address.yml",
        "all:\n  hosts:\n    n1: {ansible_user: root}\n  children:\n    kube_node: {hosts: {n1: }}\n",
        "host n1 has no address",
    ),
    (
        "bad-address.yml",
        "all:\n  hosts:\n    n1: {ip: 'not an ip'}\n  children:\n    kube_node: {hosts: {n1: }}\n",
        "ip='not an ip' is not an address",
    ),
    (
        "unresolved-address.yml",
        "all:\n  hosts:\n    n1: {ip: '{{ nowhere }}'}\n  children:\n    kube_node: {hosts: {n1: }}\n",
        "does not resolve",
    ),
    (
        "unknown-child.yml",
        "all:\n  hosts:\n    n1: {ip: 198.18.0.1}\n  children:\n    kube_node: {hosts: {n1: }}\n    k8s_cluster:\n      children:\n        kube_nodes:\n",
        "references unknown child group kube_nodes",
    ),
    (
        "no-groups.yml",
        "all:\n  hosts:\n    n1: {ip: 198.18.0.1}\n",
        "no host is in kube_control_plane",
    ),
    ("bad-key.yml", "all:\n  host:\n    n1: {ip: 198.18.0.1}\n", "unexpected key 'host'"),
    ("hosts-list.yml", "all:\n  hosts:\n    - n1\n", "hosts must be a mapping"),
    ("hostvars-list.yml", "all:\n  hosts:\n    n1: [1]\n", "variables must be a mapping"),
    ("group-list.yml", "all:\n  children:\n    kube_node: [n1]\n", "expected hosts/children/vars"),
    ("vars-list.yml", "all:\n  vars: [1]\n  hosts: {n1: {ip: 198.18.0.1}}\n", "must be a mapping"),
    (
        "bad-var.yml",
        "all:\n  vars: {calico_vxlan_mode: Sometimes}\n  hosts: {n1: {ip: 198.18.0.1}}\n  children:\n    kube_node: {hosts: {n1: }}\n",
        "variable calico_vxlan_mode",
    ),
    ("bad-range.yml", "all:\n  hosts:\n    'n[9:1]': {ip: 198.18.0.1}\n", "bad or too large range"),
    ("huge-range.yml", "all:\n  hosts:\n    'n[1:99999999]': {ip: 198.18.0.1}\n", "too large"),
    ("two-docs.yml", "all: {}\n---\nall: {}\n", "none is a Kubernetes object"),
    (
        "cm-no-hosts.yml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: v}\ndata: {group_vars.yml: 'a: 1'}\n",
        'no ConfigMap with data["hosts.yml"] (found v)',
    ),
    (
        "secret.yml",
        "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n",
        'no ConfigMap with data["hosts.yml"]',
    ),
    (
        "cm-data-list.yml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: [1]\n",
        "(ConfigMap c): data is not a mapping",
    ),
    (
        "cm-bad-inner.yml",
        cm("all:\n  hosts: [\n"),
        "(ConfigMap c-hosts-conf) hosts.yml: YAML error at line",
    ),
    (
        "cm-inner-empty.yml",
        cm("# nothing\n"),
        "(ConfigMap c-hosts-conf) hosts.yml: empty inventory",
    ),
    (
        "two-hosts-cms.yml",
        cm("all: {hosts: {n1: {ip: 198.18.0.1}}}")
        + "---\n"
        + cm("all: {hosts: {n2: {ip: 198.18.0.2}}}"),
        "several ConfigMaps",
    ),
    ("list-items.yml", "apiVersion: v1\nkind: List\nitems: 3\n", "items is not a list"),
    (
        "cluster-ref.yml",
        "apiVersion: kubean.io/v1alpha1\nkind: Cluster\nmetadata: {name: k}\nspec: {hostsConfRef: {name: gone}}\n",
        "Cluster k: hostsConfRef 'gone'",
    ),
    (
        "doc-scalar.yml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\nhello\n",
        "not a mapping",
    ),
    ("tabs.yml", "all:\n\thosts: {}\n", "YAML error at line 2"),
    ("ini-bad-section.ini", "[kube_node:hosts:x]\nn1\n", "line 1: bad section"),
    ("ini-bad-var.ini", "[kube_node]\nn1 ansible_host\n", "line 2: expected key=value"),
    ("ini-quote.ini", "[kube_node]\nn1 ansible_host='198.18.0.1\n", "line 2:"),
    ("ini-no-address.ini", "[kube_node]\nn1 ansible_user=root\n", "host n1 has no address"),
    (
        "ini-unknown-child.ini",
        "[kube_node]\n198.18.0.1\n[k8s_cluster:children]\nkube_nodes\n",
        "unknown child group kube_nodes",
    ),
    (
        "ini-vars.ini",
        "[all:vars]\njust words\n[kube_node]\n198.18.0.1\n",
        "expected key=value in [all:vars]",
    ),
]


@pytest.mark.parametrize(("name", "text", "needle"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_inventories_raise_one_line_naming_the_file(tmp_path, name, text, needle):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(InventoryError) as e:
        load_site([str(p)])
    msg = str(e.value)
    assert msg.startswith(str(p)), msg
    assert needle in msg
    assert "\n" not in msg


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(InventoryError, match="nope.yml: cannot read inventory"):
        load_site([str(tmp_path / "nope.yml")])
    with pytest.raises(InventoryError, match="no inventory file in this folder"):
        load_site([str(tmp_path)])  # an empty folder (a folder is an inventory, as in Ansible)
    bad = tmp_path / "latin1.yml"
    bad.write_bytes(b"all: {hosts: {caf\xe9: {}}}\n")
    with pytest.raises(InventoryError, match="latin1.yml: not UTF-8"):
        load_site([str(bad)])


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("node1", ["node1"]),
        ("node[1:3]", ["node1", "node2", "node3"]),
        ("node[01:03]", ["node01", "node02", "node03"]),
        ("198.18.0.[1:5:2]", ["198.18.0.1", "198.18.0.3", "198.18.0.5"]),
        ("r[a:b]n[1:2]", ["ran1", "ran2", "rbn1", "rbn2"]),
    ],
)
def test_host_patterns(pattern, expected):
    assert expand_pattern(pattern, "x") == expected


# ---------------------------------------------------------------- this host


def test_local_host_by_address():
    site = load_site([inv("site/site.yml")])
    assert local_host(site, ["127.0.0.1", "198.18.2.12"]).name == "wa2"
    assert local_host(site, ["198.18.0.2"]).name == "bootstrap"
    assert local_host(site, ["127.0.0.1"]) is None
    assert local_host(site, []) is None


def test_local_host_normalises_ipv6():
    site = load_site(hosts=["v6=fd00:0:0::1"])
    assert local_host(site, ["fd00::1"]).name == "v6"


def test_local_host_reads_this_machines_addresses():
    from scanner.plan.inventory import local_addresses

    addrs = local_addresses()
    assert "127.0.0.1" in addrs  # /proc/net/fib_trie always lists loopback
    site = load_site(hosts=["me=127.0.0.1"])
    assert local_host(site).name == "me"


# ---------------------------------------------------------------- garbage in, InventoryError out

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 70000),
    st.sampled_from(
        [
            "198.18.0.1",
            "{{ x }}",
            "Always",
            "30000-32767",
            "hosts.yml",
            "",
            "a b",
            "[1:3]",
            "n[1:2]",
        ]
    ),
    st.text(max_size=8),
)
_keys = st.sampled_from(
    [
        "all",
        "hosts",
        "children",
        "vars",
        "kube_node",
        "kube_control_plane",
        "k8s_cluster",
        "etcd",
        "ip",
        "access_ip",
        "ansible_host",
        "n1",
        "kind",
        "apiVersion",
        "data",
        "items",
        "metadata",
        "name",
        "portmesh_site",
        "clusters",
        "inventory",
        "calico_vxlan_mode",
        "kube_apiserver_node_port_range",
        "registry_host",
    ]
)
_trees = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=5)),
    max_leaves=25,
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tree=_trees, mangle=st.integers(0, 3), cut=st.integers(0, 400))
def test_garbage_only_raises_inventory_error(tmp_path, tree, mangle, cut):
    text = yaml.safe_dump(tree, default_flow_style=False, allow_unicode=True)
    if mangle == 1:
        text = text[:cut]  # truncated YAML
    elif mangle == 2:
        text = text.replace("  ", "\t", 1)
    elif mangle == 3:
        text = "[kube_node]\n" + text  # INI header over YAML-ish lines
    p = tmp_path / "garbage.yml"
    p.write_text(text)
    try:
        site = load_site([str(p)], [str(p)] if cut % 2 else [])
    except InventoryError as e:
        assert "\n" not in str(e)
    else:
        assert site.clusters and all(c.hosts for c in site.clusters)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_garbage_text_inventory(text):
    with contextlib.suppress(InventoryError):
        parse_inventory_text(text, "t.yml")


# ---------------------------------------------------------------- the CLI


@pytest.mark.skipif(
    not (ROOT / "scanner" / "commands" / "plan.py").exists(),
    reason="scanner/commands/plan.py not written yet",
)
def test_plan_with_broken_inventory_exits_2_with_one_line(tmp_path):
    p = tmp_path / "broken.yml"
    p.write_text("all:\n  hosts:\n    n1: {ip: 198.18.0.1\n")
    r = subprocess.run(
        [sys.executable, "-m", "scanner", "plan", "--inventory", str(p), "--count"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(p) in lines[0] and "YAML error at line" in lines[0]


def test_documented_example_is_the_fixture(tmp_path):
    """The site file example in docs/site-file.md loads, and means what the fixture means."""
    import re
    import shutil

    doc = (ROOT / "docs" / "site-file.md").read_text()
    example = re.search(r"```yaml\n(portmesh_site:.*?)```", doc, re.S).group(1)
    shutil.copytree(DATA / "site", tmp_path / "site")
    (tmp_path / "site" / "site.yml").write_text(example)
    documented = load_site([str(tmp_path / "site" / "site.yml")])
    fixture = load_site([inv("site/site.yml")])
    assert [(h.name, h.address, h.roles, h.cluster) for h in documented.hosts()] == [
        (h.name, h.address, h.roles, h.cluster) for h in fixture.hosts()
    ]
    assert documented.vips == fixture.vips
    assert [c.vips for c in documented.clusters] == [c.vips for c in fixture.clusters]
    assert [{k: s.value for k, s in c.config.features.items()} for c in documented.clusters] == [
        {k: s.value for k, s in c.config.features.items()} for c in fixture.clusters
    ]


def test_site_file_missing_inventory_names_the_site_file_and_the_full_path(tmp_path):
    """Issue 20: which site file, which cluster, the path as written and where it was looked."""
    site = tmp_path / "dce" / "site.yml"
    site.parent.mkdir()
    site.write_text("portmesh_site:\n  clusters: [{name: a, inventory: nothere/hosts.yml}]\n")
    with pytest.raises(InventoryError) as e:
        load_site([str(site)])
    msg = str(e.value)
    assert msg.startswith(f"{site}: cluster a.inventory: nothere/hosts.yml: no such file: "), msg
    assert str(tmp_path / "dce" / "nothere" / "hosts.yml") in msg
