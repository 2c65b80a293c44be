"""kubespray variables -> ClusterConfig, Jinja references, vars files and ConfigMaps (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from scanner.errors import InventoryError
from scanner.plan.kubean import (
    DEFAULT,
    VarsLayer,
    cluster_config,
    kube_api_vip,
    load_vars_file,
    parse_host_port,
    parse_port_range,
    resolve_templates,
)

DATA = Path(__file__).parent / "data" / "inventories"


def config(**values):
    return cluster_config([VarsLayer("vars.yml", values)])


def feature(cfg, name):
    return cfg.features[name].value


def test_defaults_follow_kubespray():
    cfg = cluster_config([])
    assert cfg.cni.value == "calico"
    assert {k: s.value for k, s in cfg.features.items()} == {
        "bgp": False,
        "vxlan": True,
        "ipip": False,
        "wireguard": False,
        "wireguard6": False,
        "typha": False,
        "metallb": False,
        "kube-vip": False,
    }
    assert cfg.nodeport_range.value == (30000, 32767)
    assert cfg.apiserver_port.value == 6443
    assert cfg.registry is None and cfg.minio is None and cfg.unresolved == {}
    assert all(s.source.startswith(DEFAULT) for s in cfg.features.values())


# (variables, feature -> expected value)
FEATURE_TABLE = [
    ({"calico_ipip_mode": "Always", "calico_vxlan_mode": "Never"}, {"ipip": True, "vxlan": False}),
    ({"calico_ipip_mode": "Never", "calico_vxlan_mode": "Always"}, {"ipip": False, "vxlan": True}),
    (
        {"calico_ipip_mode": "CrossSubnet", "calico_vxlan_mode": "Never"},
        {"ipip": True, "vxlan": False},
    ),
    ({"calico_vxlan_mode": "crosssubnet"}, {"vxlan": True}),
    ({"calico_vxlan_mode": "Never"}, {"vxlan": False, "ipip": False}),
    ({"calico_network_backend": "bird"}, {"bgp": True}),
    ({"calico_network_backend": "vxlan"}, {"bgp": False}),
    ({"calico_network_backend": "none"}, {"bgp": False}),
    ({"calico_wireguard_enabled": True}, {"wireguard": True, "wireguard6": False}),
    (
        {"calico_wireguard_enabled": True, "enable_dual_stack_networks": True},
        {"wireguard": True, "wireguard6": True},
    ),
    ({"calico_wireguard_enabled": "yes", "ipv6_stack": "true"}, {"wireguard6": True}),
    (
        {"calico_wireguard_enabled": False, "enable_dual_stack_networks": True},
        {"wireguard6": False},
    ),
    ({"typha_enabled": True}, {"typha": True}),
    ({"typha_enabled": "False"}, {"typha": False}),
    ({"metallb_enabled": 1}, {"metallb": True}),
    ({"kube_vip_enabled": "on"}, {"kube-vip": True}),
]


@pytest.mark.parametrize(("values", "expected"), FEATURE_TABLE)
def test_features_from_variables(values, expected):
    cfg = config(**values)
    for name, value in expected.items():
        assert feature(cfg, name) is value, name


def test_setting_source_names_the_file_and_the_variable():
    cfg = config(calico_vxlan_mode="Always", calico_ipip_mode="Never")
    assert cfg.features["vxlan"].source == "vars.yml: calico_vxlan_mode=Always"
    assert cfg.features["ipip"].source == "vars.yml: calico_ipip_mode=Never"
    assert cfg.features["bgp"].source == f"{DEFAULT}: calico_network_backend=vxlan"


# (variables, attribute, expected value)
VALUE_TABLE = [
    ({"kube_network_plugin": "cilium"}, "cni", "cilium"),
    ({"kube_network_plugin": "Calico"}, "cni", "calico"),
    ({"kube_network_plugin": "flannel"}, "cni", "flannel"),
    ({"kube_apiserver_port": 8443}, "apiserver_port", 8443),
    ({"kube_apiserver_port": "9443"}, "apiserver_port", 9443),
    ({"kube_apiserver_node_port_range": "30000-32767"}, "nodeport_range", (30000, 32767)),
    ({"kube_apiserver_node_port_range": "31000-31099"}, "nodeport_range", (31000, 31099)),
    ({"kube_apiserver_node_port_range": " 20000 - 20010 "}, "nodeport_range", (20000, 20010)),
    ({"registry_host": "198.18.0.2:5000"}, "registry", ("198.18.0.2", 5000)),
    ({"registry_host": "198.18.0.2"}, "registry", ("198.18.0.2", 443)),
    ({"registry_host": "registry.lab:8443"}, "registry", ("registry.lab", 8443)),
    ({"registry_host": "[fd00::2]:5000"}, "registry", ("fd00::2", 5000)),
    ({"minio_address": "http://198.18.0.2:9000"}, "minio", ("198.18.0.2", 9000)),
    ({"minio_address": "https://198.18.0.2"}, "minio", ("198.18.0.2", 443)),
    ({"minio_address": "198.18.0.2:9000"}, "minio", ("198.18.0.2", 9000)),
]


@pytest.mark.parametrize(("values", "attr", "expected"), VALUE_TABLE)
def test_values_from_variables(values, attr, expected):
    setting = getattr(config(**values), attr)
    assert setting.value == expected
    name = next(iter(values))
    assert setting.source.startswith(f"vars.yml: {name}=")


def test_unknown_variables_are_ignored():
    cfg = config(kube_version="v1.29.5", some_thing={"nested": [1, 2]}, calico_mtu="not checked")
    assert cfg == cluster_config([])


# (variables, the variable the message must name)
BROKEN_VARS = [
    ({"calico_vxlan_mode": "Sometimes"}, "calico_vxlan_mode"),
    ({"calico_ipip_mode": True}, "calico_ipip_mode"),
    ({"calico_network_backend": "ospf"}, "calico_network_backend"),
    ({"calico_wireguard_enabled": "maybe"}, "calico_wireguard_enabled"),
    ({"typha_enabled": 2}, "typha_enabled"),
    ({"metallb_enabled": [True]}, "metallb_enabled"),
    ({"enable_dual_stack_networks": "dual"}, "enable_dual_stack_networks"),
    ({"kube_apiserver_port": 70000}, "kube_apiserver_port"),
    ({"kube_apiserver_port": 0}, "kube_apiserver_port"),
    ({"kube_apiserver_port": "https"}, "kube_apiserver_port"),
    ({"kube_apiserver_port": True}, "kube_apiserver_port"),
    ({"kube_apiserver_node_port_range": "32767-30000"}, "kube_apiserver_node_port_range"),
    ({"kube_apiserver_node_port_range": "30000"}, "kube_apiserver_node_port_range"),
    ({"kube_apiserver_node_port_range": "30000-70000"}, "kube_apiserver_node_port_range"),
    ({"kube_apiserver_node_port_range": 30000}, "kube_apiserver_node_port_range"),
    ({"kube_network_plugin": "calico cilium"}, "kube_network_plugin"),
    ({"kube_network_plugin": 3}, "kube_network_plugin"),
    ({"registry_host": "198.18.0.2:99999"}, "registry_host"),
    ({"registry_host": "198.18.0.2:"}, "registry_host"),
    ({"registry_host": "not a host"}, "registry_host"),
    ({"registry_host": 5000}, "registry_host"),
    ({"minio_address": "http://:9000"}, "minio_address"),
    ({"minio_address": "http://198.18.0.2:port"}, "minio_address"),
]


@pytest.mark.parametrize(("values", "name"), BROKEN_VARS)
def test_unusable_values_raise_naming_file_and_variable(values, name):
    with pytest.raises(InventoryError) as e:
        config(**values)
    msg = str(e.value)
    assert msg.startswith("vars.yml: variable ") and name in msg
    assert "\n" not in msg


# ---------------------------------------------------------------- Jinja references


def test_templates_resolve_recursively():
    values = {
        "minio_address": "http://198.18.0.2:9000",
        "files_repo": "{{ minio_address }}/kubean",
        "kubeadm_url": "{{files_repo}}/kubernetes/{{ kube_version }}/kubeadm",
        "kube_version": "v1.29.5",
        "port": 6443,
        "api_port": "{{ port }}",
        "api_url": "https://lb:{{ port }}",
    }
    resolved, unresolved = resolve_templates(values)
    assert unresolved == {}
    assert resolved["files_repo"] == "http://198.18.0.2:9000/kubean"
    assert resolved["kubeadm_url"] == "http://198.18.0.2:9000/kubean/kubernetes/v1.29.5/kubeadm"
    assert resolved["api_port"] == 6443  # a whole-value reference keeps the type
    assert resolved["api_url"] == "https://lb:6443"


@pytest.mark.parametrize(
    "template",
    [
        "{{ undefined_var }}",
        "{{ registry_host | regex_replace('a', 'b') }}",
        "{{ 'bird' if true else 'vxlan' }}",
        "{{ x | default(y) }}",
        "{{ ansible_system | lower }}",
        "{% if x %}a{% endif %}",
        "{{ a }}-{{ undefined_var }}",
        "{{ broken",
        "{{ groups['etcd'][0] }}",
    ],
)
def test_templates_that_are_not_simple_references_stay_unresolved(template):
    resolved, unresolved = resolve_templates({"a": "1", "x": template})
    assert "x" not in resolved
    assert unresolved == {"x": template}


def test_template_cycles_are_unresolved_not_infinite():
    values = {
        "a": "{{ b }}",
        "b": "{{ c }}/x",
        "c": "{{ a }}",
        "d": "{{ d }}",
        "e": "ok {{ f }}",
        "f": "1",
    }
    resolved, unresolved = resolve_templates(values)
    assert set(unresolved) == {"a", "b", "c", "d"}
    assert resolved["e"] == "ok 1"


def test_template_blowup_is_bounded():
    values = {f"v{i}": f"{{{{ v{i + 1} }}}}{{{{ v{i + 1} }}}}" for i in range(80)}
    values["v80"] = "x"
    resolved, unresolved = resolve_templates(values)
    assert resolved["v70"] == "x" * 1024
    assert "v0" in unresolved


def test_resolved_template_feeds_the_config_and_the_source_shows_it():
    layers = [
        VarsLayer("a.yml", {"bootstrap": "198.18.0.2", "registry_host": "{{ bootstrap }}:5000"}),
        VarsLayer(
            "b.yml",
            {"mode": "Always", "calico_ipip_mode": "{{ mode }}", "calico_vxlan_mode": "Never"},
        ),
    ]
    cfg = cluster_config(layers)
    assert cfg.registry.value == ("198.18.0.2", 5000)
    assert cfg.registry.source == "a.yml: registry_host={{ bootstrap }}:5000 -> 198.18.0.2:5000"
    assert feature(cfg, "ipip") is True and feature(cfg, "vxlan") is False


def test_unresolved_known_variable_is_reported_and_treated_as_unset():
    cfg = config(
        registry_host="{{ groups['bootstrap'][0] }}:5000",
        calico_vxlan_mode="{{ my_mode | mandatory }}",
        files_repo="{{ nowhere }}",  # an endpoint variable (issue 13): reported too
    )
    assert cfg.registry is None
    assert feature(cfg, "vxlan") is True  # the kubespray default, not a guess
    assert cfg.unresolved == {
        "registry_host": "{{ groups['bootstrap'][0] }}:5000",
        "calico_vxlan_mode": "{{ my_mode | mandatory }}",
        "files_repo": "{{ nowhere }}",
    }
    assert "unresolved" in cfg.features["vxlan"].source


# ---------------------------------------------------------------- layers and files


def test_later_layers_win():
    cfg = cluster_config(
        [
            VarsLayer("inv [all vars]", {"calico_vxlan_mode": "Always", "typha_enabled": True}),
            VarsLayer("one.yml", {"calico_vxlan_mode": "CrossSubnet"}),
            VarsLayer("two.yml", {"calico_vxlan_mode": "Never"}),
        ]
    )
    assert cfg.features["vxlan"].value is False
    assert cfg.features["vxlan"].source == "two.yml: calico_vxlan_mode=Never"
    assert cfg.features["typha"].source == "inv [all vars]: typha_enabled=true"


def test_template_resolves_across_layers():
    cfg = cluster_config(
        [
            VarsLayer("one.yml", {"registry_host": "{{ seed }}:5000"}),
            VarsLayer("two.yml", {"seed": "198.18.0.9"}),
        ]
    )
    assert cfg.registry.value == ("198.18.0.9", 5000)


def test_vars_configmap_air_gapped():
    layers = load_vars_file(DATA / "kubean-vars-cm.yml")
    assert [la.label for la in layers] == [
        f"{DATA / 'kubean-vars-cm.yml'} (ConfigMap prod-vars-conf)"
    ]
    cfg = cluster_config(layers)
    assert cfg.registry.value == ("198.18.10.2", 5000)
    assert cfg.minio.value == ("198.18.10.2", 9000)
    assert (
        feature(cfg, "ipip") is True
        and feature(cfg, "vxlan") is False
        and feature(cfg, "bgp") is True
    )
    resolved, unresolved = resolve_templates(layers[0].values)
    assert resolved["files_repo"] == "http://198.18.10.2:9000/kubean"
    assert resolved["kube_image_repo"] == "198.18.10.2:5000"
    assert "crictl_download_url" in unresolved  # uses a filter: not guessed


def test_plain_group_vars_file():
    layers = load_vars_file(DATA / "site" / "worker-a" / "group_vars.yml")
    cfg = cluster_config(layers)
    assert cfg.nodeport_range.value == (30000, 32000)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("calico_vxlan_mode: [Always\n", "YAML error at line"),
        ("- a\n- b\n", "must be a mapping"),
        (
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {hosts.yml: 'all: {}'}\n",
            "group_vars.yml",
        ),
        (
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {group_vars.yml: 1}\n",
            "not a string",
        ),
        (
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata:\n  group_vars.yml: |\n    a: [\n",
            "(ConfigMap x) group_vars.yml: YAML error at line",
        ),
        ("1: one\n", "variable name 1"),
        ("just a sentence\n", "must be a mapping, not str"),
    ],
)
def test_broken_vars_files(tmp_path, text, needle):
    p = tmp_path / "bad-vars.yml"
    p.write_text(text)
    with pytest.raises(InventoryError) as e:
        load_vars_file(p)
    assert str(p) in str(e.value) and needle in str(e.value)


def test_vars_file_not_utf8(tmp_path):
    p = tmp_path / "latin1.yml"
    p.write_bytes(b"registry_host: caf\xe9\n")
    with pytest.raises(InventoryError, match="latin1.yml: not UTF-8"):
        load_vars_file(p)


def test_missing_vars_file():
    with pytest.raises(InventoryError, match="nope.yml: cannot read vars file"):
        load_vars_file("/nonexistent/nope.yml")


# ---------------------------------------------------------------- small parsers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1-2", (1, 2)),
        ("80-80", (80, 80)),
        ("0-10", None),
        ("a-b", None),
        ("10-", None),
        (None, None),
    ],
)
def test_parse_port_range(text, expected):
    assert parse_port_range(text) == expected


@pytest.mark.parametrize(
    ("text", "default", "expected"),
    [
        ("h:1", 443, ("h", 1)),
        ("http://h", 9000, ("h", 80)),
        ("h/v2/library", 443, ("h", 443)),
        ("user@h:5000", 443, ("h", 5000)),
        ("ftp://h", 9000, ("h", 21)),  # review 13 item 14: ftp is port 21
        ("h:0", 443, None),
        ("", 443, None),
        ("http://", 443, None),
    ],
)
def test_parse_host_port(text, default, expected):
    assert parse_host_port(text, default) == expected


def test_kube_api_vip_from_variables():
    assert (
        kube_api_vip(
            [VarsLayer("v", {"kube_vip_enabled": True, "kube_vip_address": "198.18.1.100"})]
        )
        == "198.18.1.100"
    )
    assert (
        kube_api_vip(
            [VarsLayer("v", {"kube_vip_enabled": False, "kube_vip_address": "198.18.1.100"})]
        )
        is None
    )
    assert (
        kube_api_vip(
            [VarsLayer("v", {"loadbalancer_apiserver": {"address": "198.18.1.50", "port": 8443}})]
        )
        == "198.18.1.50"
    )
    with pytest.raises(InventoryError, match="v: variable kube_vip_address"):
        kube_api_vip([VarsLayer("v", {"kube_vip_enabled": True, "kube_vip_address": "not an ip"})])
