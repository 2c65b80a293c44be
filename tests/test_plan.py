"""The planner: who gets which flow, counts without flows, sampling, sources, flags over vars."""

from __future__ import annotations

import itertools
import tracemalloc
from dataclasses import replace

import pytest

import scanner.plan.planner as plan_mod
from scanner.catalog import load_catalog
from scanner.core.model import Cluster, ClusterConfig, Host, Setting, Site
from scanner.errors import InputError
from scanner.plan.planner import count_plan, explain, plan, plan_meta, sample_ports
from scanner.plan.selection import Selection, SelectionOptions

CATALOG = load_catalog()


def _hosts(prefix: str, net: int, n: int, cluster: str, cp: int = 1, extra=(), etcd=True):
    out = []
    for i in range(1, n + 1):
        roles = {"node", *extra}
        if i <= cp:
            roles.add("control_plane")
            if etcd:
                roles.add("etcd")
        else:
            roles.add("worker")
        out.append(Host(f"{prefix}{i}", f"198.18.{net}.{i}", frozenset(roles), cluster))
    return tuple(out)


GLOBAL = Cluster("g", "global", _hosts("g", 1, 3, "g", extra=("global",)))
WORKER = Cluster("w", "worker", _hosts("w", 2, 3, "w"), vips={"kube_api": "198.18.2.100"})
BOOT = Host("boot", "198.18.0.2", frozenset({"bootstrap"}))
SITE = Site(
    (GLOBAL, WORKER),
    bootstrap=BOOT,
    vips={"insight": "198.18.1.200", "istio_gateway": "198.18.1.201"},
    source="test-site",
)
G = [h.name for h in GLOBAL.hosts]
W = [h.name for h in WORKER.hosts]
ALL = G + W


def _pairs(flows, req):
    return {(f.src_host, f.host) for f in flows if f.req == req}


def _ordered(names):
    return {(a, b) for a, b in itertools.permutations(names, 2)}


PLAN = list(plan(CATALOG, SITE, Selection(nodeport_sample=2)))


@pytest.mark.parametrize(
    ("req", "expected"),
    [
        ("etcd.client", {("g2", "g1"), ("g3", "g1"), ("w2", "w1"), ("w3", "w1")}),
        ("k8s.apiserver", {("g2", "g1"), ("g3", "g1"), ("w2", "w1"), ("w3", "w1")}),
        ("k8s.scheduler", {("g2", "g1"), ("g3", "g1"), ("w2", "w1"), ("w3", "w1")}),
        ("k8s.kubelet", _ordered(G) | _ordered(W)),
        ("node.ssh", _ordered(G) | _ordered(W)),
        ("calico.vxlan", _ordered(G) | _ordered(W)),
        ("calico.ipip", set()),
        ("calico.bgp", set()),
        ("cilium.health", set()),
        ("metallb.memberlist.udp", set()),
        ("bootstrap.chartmuseum", {(n, "boot") for n in ALL}),
        ("bootstrap.registry", {(n, "boot") for n in ALL}),
        ("insight.traces", {(n, "vip:insight") for n in ALL}),
        ("istio.gateway.https", {("scanner", "vip:istio_gateway")}),
        ("worker.ssh", {(g, w) for g in G for w in W}),
        ("worker.apiserver", {(g, "vip:kube_api@w") for g in G}),
        ("registry.entry", set()),
    ],
)
def test_who_gets_which_flow(req, expected):
    assert _pairs(PLAN, req) == expected


def test_flow_fields():
    by_req = {}
    for f in PLAN:
        by_req.setdefault(f.req, f)
    f = by_req["etcd.client"]
    assert (f.dst, f.port, f.proto, f.host, f.src, f.src_host) == (
        "198.18.1.1",
        2379,
        "tcp",
        "g1",
        "198.18.1.2",
        "g2",
    )
    assert by_req["istio.gateway.http"].src is None
    assert by_req["istio.gateway.http"].dst == "198.18.1.201"
    assert by_req["worker.apiserver"].dst == "198.18.2.100"
    assert by_req["worker.apiserver"].port == 6443
    assert by_req["calico.vxlan"].proto == "udp"


def test_no_self_flows():
    flows = list(plan(CATALOG, SITE, Selection(with_features=frozenset(CATALOG.features()))))
    assert flows
    for f in flows:
        assert f.src_host != f.host and f.src != f.dst, f


def test_same_address_under_another_name_is_self():
    a = Host("a", "198.18.5.1", frozenset({"node"}), "c")
    b = Host("b", "198.18.5.1", frozenset({"node"}), "c")  # the same machine, twice
    c = Host("c", "198.18.5.3", frozenset({"node"}), "c")
    site = Site((Cluster("c", "standalone", (a, b, c)),))
    sel = Selection()
    flows = [f for f in plan(CATALOG, site, sel) if f.req == "node.ssh"]
    assert {(f.src_host, f.host) for f in flows} == {("a", "c"), ("b", "c"), ("c", "a"), ("c", "b")}
    assert count_plan(CATALOG, site, sel) == len(list(plan(CATALOG, site, sel)))


def test_worker_api_falls_back_to_control_plane_without_vip():
    site = replace(SITE, clusters=(GLOBAL, replace(WORKER, vips={})))
    flows = list(plan(CATALOG, site, Selection(nodeport_sample=0)))
    assert _pairs(flows, "worker.apiserver") == {(g, "w1") for g in G}
    why = next(
        e
        for e in explain(CATALOG, site, Selection())
        if e["req"] == "worker.apiserver" and e["cluster"] == "w"
    )
    assert why["included"] and "control_plane instead" in why["why"]


def test_etcd_falls_back_to_control_plane():
    hosts = _hosts("e", 3, 3, "e", etcd=False)
    site = Site((Cluster("e", "standalone", hosts),))
    assert _pairs(plan(CATALOG, site, Selection()), "etcd.peer") == {("e2", "e1"), ("e3", "e1")}


def test_registry_vip_from_every_node():
    site = replace(SITE, vips={**SITE.vips, "registry": "198.18.0.50"})
    assert _pairs(plan(CATALOG, site, Selection()), "registry.entry") == {
        (n, "vip:registry") for n in ALL
    }


SELECTIONS = [
    Selection(),
    Selection(nodeport_sample=0),
    Selection(nodeport_sample=5),
    Selection(cni="cilium"),
    Selection(cni="spiderpool", with_features=frozenset({"metallb", "kube-vip"})),
    Selection(with_features=frozenset(CATALOG.features())),
    Selection(without_features=frozenset(CATALOG.features())),
    Selection(sources=frozenset({"g2"})),
    Selection(sources=frozenset({"w3", "scanner"})),
    Selection(sources=frozenset({"g1"}), scanner="g1"),
]


@pytest.mark.parametrize("sel", SELECTIONS)
@pytest.mark.parametrize(
    "site",
    [
        SITE,
        replace(SITE, bootstrap=None, vips={}),
        Site((Cluster("s", "standalone", _hosts("s", 4, 5, "s", cp=3)),)),
    ],
)
def test_count_equals_the_flows(site, sel):
    flows = list(plan(CATALOG, site, sel))
    assert count_plan(CATALOG, site, sel) == len(flows)
    assert sum(e["flows"] for e in explain(CATALOG, site, sel)) == len(flows)
    assert len(set(flows)) == len(flows)  # no duplicate flow


def _big_site(n: int) -> Site:
    hosts = tuple(
        Host(
            f"n{i}",
            f"198.18.{i // 250}.{i % 250 + 1}",
            frozenset({"node", "control_plane", "etcd"} if i < 3 else {"node", "worker"}),
            "big",
        )
        for i in range(n)
    )
    return Site((Cluster("big", "standalone", hosts),))


def test_a_thousand_hosts_are_counted_without_building_flows(monkeypatch):
    site = _big_site(1000)

    def no_flows(*a, **k):
        raise AssertionError("count_plan built a flow")

    monkeypatch.setattr(plan_mod, "Flow", no_flows)
    monkeypatch.setattr(plan_mod.Leg, "flows", no_flows)
    n = 1000
    nodeports = 32767 - 30000 + 1
    # every-node reqs (kubelet, ssh, exporter, calico vxlan) and the NodePort range between all
    # pairs; 6 control-plane reqs (etcd x3, apiserver, controller-manager, scheduler) to 3 hosts
    expected = (4 + nodeports) * n * (n - 1) + 6 * 3 * (n - 1)
    tracemalloc.start()
    try:
        got = count_plan(CATALOG, site, Selection())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == expected  # 2.77 billion flows
    assert peak < 16 * 1024 * 1024, peak  # flat: O(hosts), not O(flows)
    assert count_plan(CATALOG, site, Selection(nodeport_sample=10)) == (
        (4 + 12) * n * (n - 1) + 6 * 3 * (n - 1)
    )


def test_plan_is_lazy_on_a_thousand_hosts():
    gen = plan(CATALOG, _big_site(1000), Selection())
    first = list(itertools.islice(gen, 5000))
    assert len(first) == 5000  # returned at once; the other 2.77e9 were never built


@pytest.mark.parametrize(
    ("n", "k", "expected"),
    [
        (10, 0, [0, 9]),
        (10, 1, [0, 4, 9]),
        (11, 1, [0, 5, 10]),
        (10, 8, list(range(10))),
        (10, 50, list(range(10))),
        (2, 0, [0, 1]),
        (1, 0, [0]),
        (101, 3, [0, 25, 50, 75, 100]),
    ],
)
def test_sample_ports(n, k, expected):
    assert sample_ports(list(range(n)), k) == expected


def test_sample_ports_spread_over_the_nodeport_range():
    ports = list(range(30000, 32768))
    got = sample_ports(ports, 8)
    assert len(got) == 10 and got[0] == 30000 and got[-1] == 32767
    assert got == sorted(set(got))
    gaps = [b - a for a, b in itertools.pairwise(got)]
    assert max(gaps) - min(gaps) <= 1
    assert sample_ports(ports, 8) == got  # deterministic


def test_nodeport_sampling_in_the_plan_and_meta():
    sel = Selection(nodeport_sample=3)
    flows = [f for f in plan(CATALOG, SITE, sel) if f.req == "k8s.nodeport"]
    per_pair = {}
    for f in flows:
        per_pair.setdefault((f.src_host, f.host), []).append(f.port)
    assert len(per_pair) == len(_ordered(G) | _ordered(W))
    assert {tuple(v) for v in per_pair.values()} == {(30000, 30692, 31384, 32075, 32767)}
    assert plan_meta(CATALOG, SITE, sel)["nodeport"] == "sample"
    assert plan_meta(CATALOG, SITE, sel)["nodeport_sample"] == 3
    full = plan_meta(CATALOG, SITE, Selection())
    assert full["nodeport"] == "full" and full["nodeport_sample"] is None
    assert count_plan(CATALOG, SITE, Selection()) - count_plan(CATALOG, SITE, sel) == 12 * (
        2768 - 5
    )


def test_sources_filter():
    sel = Selection(sources=frozenset({"g2"}), nodeport_sample=0)
    flows = list(plan(CATALOG, SITE, sel))
    assert flows and {f.src_host for f in flows} == {"g2"}
    assert {f.req for f in flows} >= {"etcd.client", "worker.ssh", "insight.logs"}
    assert "istio.gateway.http" not in {f.req for f in flows}


def test_the_scanner_named_by_the_selection():
    sel = Selection(sources=frozenset({"g1"}), scanner="g1")
    istio = [f for f in plan(CATALOG, SITE, sel) if f.req.startswith("istio.")]
    assert [(f.src, f.src_host, f.port) for f in istio] == [
        ("198.18.1.1", "g1", 80),
        ("198.18.1.1", "g1", 443),
    ]


def test_consecutive_flows_go_to_different_hosts():
    sel = Selection(sources=frozenset({"w1"}), nodeport_sample=4)
    flows = [f for f in plan(CATALOG, SITE, sel) if f.req == "k8s.nodeport"]
    assert len(flows) == 12
    assert all(a.host != b.host for a, b in itertools.pairwise(flows))


def _configured(**config):
    cfg = ClusterConfig(**config)
    return Site((replace(WORKER, kind="standalone", config=cfg),), bootstrap=BOOT)


IPIP_VARS = {
    "vxlan": Setting(False, "vars.yml: calico_vxlan_mode=Never"),
    "ipip": Setting(True, "vars.yml: calico_ipip_mode=Always"),
    "bgp": Setting(True, "vars.yml: calico_network_backend=bird"),
}


@pytest.mark.parametrize(
    ("config", "sel", "present", "absent"),
    [
        ({}, Selection(), {"calico.vxlan"}, {"calico.ipip", "calico.bgp"}),
        ({"features": IPIP_VARS}, Selection(), {"calico.ipip", "calico.bgp"}, {"calico.vxlan"}),
        (
            {"features": IPIP_VARS},
            Selection(with_features=frozenset({"vxlan"}), without_features=frozenset({"ipip"})),
            {"calico.vxlan", "calico.bgp"},
            {"calico.ipip"},
        ),
        (
            {"features": {"wireguard": Setting(True, "vars.yml: calico_wireguard_enabled=true")}},
            Selection(),
            {"calico.wireguard"},
            {"calico.wireguard6", "cilium.wireguard"},
        ),
        (
            {"cni": Setting("cilium", "vars.yml: kube_network_plugin=cilium")},
            Selection(),
            {"cilium.vxlan", "cilium.icmp"},
            {"calico.vxlan"},
        ),
        (
            {"cni": Setting("cilium", "vars.yml: kube_network_plugin=cilium")},
            Selection(cni="calico"),
            {"calico.vxlan"},
            {"cilium.vxlan"},
        ),
        (
            {"features": {"metallb": Setting(True, "vars.yml: metallb_enabled=true")}},
            Selection(),
            {"metallb.memberlist.udp", "metallb.memberlist.tcp", "metallb.metrics.tcp"},
            set(),
        ),
        (
            {"features": {"metallb": Setting(True, "vars.yml: metallb_enabled=true")}},
            Selection(without_features=frozenset({"metallb"})),
            set(),
            {"metallb.memberlist.udp"},
        ),
        ({}, Selection(with_features=frozenset({"kube-vip"})), {"kube-vip.metrics"}, set()),
    ],
)
def test_flags_win_over_variables(config, sel, present, absent):
    site = _configured(**config)
    reqs = {f.req for f in plan(CATALOG, site, sel)}
    assert present <= reqs
    assert not (absent & reqs)


def test_explain_names_the_deciding_setting():
    site = _configured(features=IPIP_VARS)
    sel = Selection(with_features=frozenset({"vxlan"}))
    rec = {e["req"]: e for e in explain(CATALOG, site, sel)}
    assert rec["calico.vxlan"]["included"] and "flag --with" in rec["calico.vxlan"]["why"]
    assert rec["calico.ipip"]["included"] and "calico_ipip_mode=Always" in rec["calico.ipip"]["why"]
    assert not rec["cilium.health"]["included"]
    assert "needs cni cilium" in rec["cilium.health"]["why"]
    assert not rec["istio.gateway.http"]["included"]
    assert "only for global clusters" in rec["istio.gateway.http"]["why"]
    assert set(rec["etcd.client"]) == {
        "type",
        "req",
        "cluster",
        "kind",
        "included",
        "flows",
        "af",
        "why",
    }
    # an IPv4-only cluster: af says the family, the why stays about the requirement
    assert rec["etcd.client"]["af"] == "ipv4" and "IPv4" not in rec["etcd.client"]["why"]


def test_ports_follow_the_cluster_config():
    site = _configured(
        nodeport_range=Setting((31000, 31009), "vars.yml: kube_apiserver_node_port_range"),
        apiserver_port=Setting(16443, "vars.yml: kube_apiserver_port=16443"),
        registry=Setting(("198.18.0.2", 5000), "vars.yml: registry_host=198.18.0.2:5000"),
        minio=Setting(("198.18.0.2", 9500), "vars.yml: minio_address"),
    )
    flows = list(plan(CATALOG, site, Selection()))
    ports = {}
    for f in flows:
        ports.setdefault(f.req, set()).add(f.port)
    assert ports["k8s.nodeport"] == set(range(31000, 31010))
    assert ports["k8s.apiserver"] == {16443}
    assert ports["bootstrap.registry"] == {5000}
    assert ports["bootstrap.minio.api"] == {9500}
    assert ports["bootstrap.minio.ui"] == {9001}
    rec = {e["req"]: e for e in explain(CATALOG, site, Selection())}
    assert "registry_host=198.18.0.2:5000" in rec["bootstrap.registry"]["why"]
    assert plan_meta(CATALOG, site, Selection())["clusters"][0]["nodeport_range"] == "31000-31009"


def test_placeholder_without_value_leaves_the_entry_out(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        '[[requirement]]\nid = "harbor.api"\ncomponent = "harbor"\nproto = "tcp"\n'
        'ports = "${registry_port}"\ndescription = "x"\ndst_role = "bootstrap"\n'
        'src_roles = ["node"]\n'
    )
    cat = load_catalog([str(path)])
    site = _configured(unresolved={"registry_host": "{{ registry }}:5000"})
    rec = {e["req"]: e for e in explain(cat, site, Selection())}
    assert not rec["harbor.api"]["included"]
    assert "registry_host unresolved" in rec["harbor.api"]["why"]
    assert "harbor.api" not in {f.req for f in plan(cat, site, Selection())}
    site2 = _configured(registry=Setting(("198.18.0.2", 5000), "vars"))
    assert {f.port for f in plan(cat, site2, Selection()) if f.req == "harbor.api"} == {5000}


@pytest.mark.parametrize(
    ("opts", "words"),
    [
        ({"with_features": ("vxlan,nope",)}, "--with: unknown feature 'nope'"),
        ({"without_features": ("Bogus",)}, "--without: unknown feature 'bogus'"),
        ({"with_features": ("ipip",), "without_features": ("ipip",)}, "both name 'ipip'"),
        ({"cni": "cillium"}, "--cni: unknown CNI 'cillium'"),
    ],
)
def test_selection_errors(opts, words):
    with pytest.raises(InputError, match=words):
        SelectionOptions(**opts).selection(CATALOG)


def test_selection_words():
    sel = SelectionOptions(
        cni=" Cilium ", with_features=("metallb, kube-vip", "WIREGUARD"), nodeport_sample=4
    ).selection(CATALOG, sources=["n1"], scanner="n1")
    assert sel == Selection(
        cni="cilium",
        with_features=frozenset({"metallb", "kube-vip", "wireguard"}),
        nodeport_sample=4,
        sources=frozenset({"n1"}),
        scanner="n1",
    )
