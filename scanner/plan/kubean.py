"""Kubean's cluster definition: ConfigMaps, kubespray variables, and the ClusterConfig they decide.

A Kubean ``Cluster`` points at two ConfigMaps: ``data["hosts.yml"]`` is the Ansible inventory and
``data["group_vars.yml"]`` holds the kubespray variables. scanner.plan.yamldocs reads the YAML
documents and ConfigMaps (also ``kind: List`` as ``kubectl get cm -o yaml`` prints several); this
module merges variable layers (later wins), resolves simple Jinja references
(``"{{ registry_host }}"``), and turns the variables that decide the port plan into a
ClusterConfig whose every Setting says where it came from. Pure: the only I/O is reading the files named by the caller.

Defaults follow kubespray (roles/network_plugin/calico_defaults/defaults/main.yml and
roles/kubespray-defaults): calico, VXLAN Always, IP-in-IP Never, backend vxlan (no BGP), no
WireGuard, no Typha, API server port 6443, NodePort range 30000-32767.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from scanner.core.model import ClusterConfig, Setting
from scanner.errors import InventoryError
from scanner.plan.endpoints import endpoints, is_endpoint_var
from scanner.plan.templates import (
    _SCALARS,
    UNRESOLVED,
    VAULTED,
    Vaulted,
    eval_expr,
    redact,
)
from scanner.plan.yamldocs import configmaps, is_kubernetes_object, load_yaml_documents, read_text

HOSTS_KEY = "hosts.yml"
VARS_KEY = "group_vars.yml"
DEFAULT = "default (kubespray)"

# The variables that decide the plan; only these are reported in ClusterConfig.unresolved.
KNOWN_VARS = (
    "kube_network_plugin",
    "calico_network_backend",
    "calico_vxlan_mode",
    "calico_ipip_mode",
    "calico_wireguard_enabled",
    "enable_dual_stack_networks",
    "ipv4_stack",
    "ipv6_stack",
    "calico_vxlan_mode_ipv6",
    "typha_enabled",
    "metallb_enabled",
    "kube_vip_enabled",
    "kube_vip_address",
    "kube_apiserver_port",
    "kube_apiserver_node_port_range",
    "registry_host",
    "minio_address",
)

# What the plan does when one of KNOWN_VARS does not resolve (for the warning line).
INSTEAD = {
    "kube_network_plugin": "kubespray's default calico",
    "calico_network_backend": "kubespray's default vxlan (no BGP, TCP 179)",
    "calico_vxlan_mode": "kubespray's default Always",
    "calico_ipip_mode": "kubespray's default Never",
    "calico_wireguard_enabled": "the default false (no WireGuard ports)",
    "enable_dual_stack_networks": "the default false (IPv4 only)",
    "ipv6_stack": "the default false (IPv4 only)",
    "typha_enabled": "the default false (no Typha port)",
    "metallb_enabled": "the default false (no MetalLB ports)",
    "kube_vip_enabled": "the default false (no kube-vip)",
    "kube_vip_address": "no kube-vip VIP",
    "kube_apiserver_port": "kubespray's default 6443",
    "kube_apiserver_node_port_range": "kubespray's default 30000-32767",
}


def instead(name: str) -> str:
    """What the plan does in place of following variable ``name``."""
    if name in INSTEAD:
        return f"the plan uses {INSTEAD[name]}"
    return "no flow to that host is planned"


CALICO_MODES = ("Always", "CrossSubnet", "Never")
CALICO_BACKENDS = ("bird", "vxlan", "none")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,252}[A-Za-z0-9])?\Z")


# --------------------------------------------------------------------------- variables


@dataclass(frozen=True)
class VarsLayer:
    """One source of variables; layers merge in order, later wins."""

    label: str  # the file (and ConfigMap or inventory group) the values came from
    values: Mapping[str, Any]


def vars_mapping(doc: Any, where: str) -> dict[str, Any]:
    """Check that a parsed group_vars document is a mapping of variable names."""
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise InventoryError(f"{where}: variables must be a mapping, not {type(doc).__name__}")
    for k in doc:
        if not isinstance(k, str):
            raise InventoryError(f"{where}: variable name {k!r} is not a string")
    return doc


def parse_vars_text(text: str, where: str) -> dict[str, Any]:
    docs = [d for d in load_yaml_documents(text, where) if d is not None]
    out: dict[str, Any] = {}
    for d in docs:
        out.update(vars_mapping(d, where))
    return out


def load_vars_file(path: str | Path) -> list[VarsLayer]:
    """A kubespray group_vars YAML file, or ConfigMaps whose data["group_vars.yml"] holds vars."""
    p = str(path)
    text = read_text(p, "vars file")
    docs = [d for d in load_yaml_documents(text, p) if d is not None]
    if any(is_kubernetes_object(d) for d in docs):
        cms = [c for c in configmaps(docs, p) if VARS_KEY in c.data]
        if not cms:
            raise InventoryError(f'{p}: no ConfigMap with data["{VARS_KEY}"]')
        return [
            VarsLayer(c.where, parse_vars_text(c.data[VARS_KEY], f"{c.where} {VARS_KEY}"))
            for c in cms
        ]
    out: dict[str, Any] = {}
    for d in docs:
        out.update(vars_mapping(d, p))
    return [VarsLayer(p, out)]


@dataclass(frozen=True)
class MergedVars:
    values: dict[str, Any]
    origin: dict[str, str]  # variable -> label of the layer that set it last


def merge_vars(layers: Sequence[VarsLayer]) -> MergedVars:
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for layer in layers:
        for k, v in layer.values.items():
            values[k] = v
            origin[k] = layer.label
    return MergedVars(values, origin)


# --------------------------------------------------------------------------- Jinja references

_UNRESOLVED = UNRESOLVED
_EXPR = re.compile(r"\{\{((?:(?!\}\}).)*?)\}\}", re.S)  # one {{ ... }}, never across "}}"
_NAME = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*\Z")
MAX_RENDERED = 65536


def is_template(value: Any) -> bool:
    return isinstance(value, str) and ("{{" in value or "{%" in value or "{#" in value)


def _render(template: str, lookup: Callable[[str], Any]) -> Any:
    """Substitute ``{{ name }}`` references; anything else Jinja can do is not guessed."""
    if "{%" in template or "{#" in template:
        return _UNRESOLVED
    rest = _EXPR.sub("", template)
    if "{{" in rest or "}}" in rest:
        return _UNRESOLVED  # an unbalanced brace pair
    whole = _EXPR.fullmatch(template.strip())
    if whole and template == template.strip():
        # "{{ x }}" keeps x's type, as Ansible's native rendering does
        return eval_expr(whole.group(1), lookup)
    failed = False

    def sub(m: re.Match[str]) -> str:
        nonlocal failed
        value = eval_expr(m.group(1), lookup)
        if value is _UNRESOLVED or not isinstance(value, _SCALARS):
            failed = True
            return ""
        return str(value)

    out = _EXPR.sub(sub, template)
    # "{{ b }}{{ b }}" chains double at every level; a value this long is no address or mode
    return _UNRESOLVED if failed or len(out) > MAX_RENDERED else out


def resolve_templates(
    values: Mapping[str, Any], names: Iterable[str] | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """Resolve templated top-level values that only reference other variables of ``values``.

    Returns (resolved, unresolved): ``resolved`` holds every variable (or only ``names``) with
    its templates substituted, minus the ones that could not be resolved, which are in
    ``unresolved`` with their raw text. Recursive references resolve; cycles and filters do not.
    """
    cache: dict[str, Any] = {}

    def resolve(name: str, stack: set[str]) -> Any:
        if name in cache:
            return cache[name]
        if name not in values:
            return _UNRESOLVED
        raw = values[name]
        if isinstance(raw, Vaulted) or (isinstance(raw, dict) and "__ansible_vault" in raw):
            return _UNRESOLVED
        if not is_template(raw):
            cache[name] = raw
            return raw
        if name in stack:
            return _UNRESOLVED  # a cycle: every member is unresolvable, so caching below is sound
        stack.add(name)
        out = _render(raw, lambda ref: resolve(ref, stack))
        stack.discard(name)
        cache[name] = out
        return out

    resolved: dict[str, Any] = {}
    unresolved: dict[str, str] = {}
    for name in values if names is None else (n for n in names if n in values):
        v = resolve(name, set())
        if v is _UNRESOLVED:
            raw = values[name]
            vaulted = isinstance(raw, dict) and "__ansible_vault" in raw
            unresolved[name] = str(VAULTED if vaulted else raw)
        else:
            resolved[name] = v
    return resolved, unresolved


# --------------------------------------------------------------------------- value parsers


class _Vars:
    """Merged, resolved variables with their origins, and the error/source wording."""

    def __init__(self, layers: Sequence[VarsLayer]) -> None:
        merged = merge_vars(layers)
        self.raw = merged.values
        self.origin = merged.origin
        self.values, self.unresolved = resolve_templates(merged.values)

    def has(self, name: str) -> bool:
        return name in self.values and self.values[name] is not None

    def source(self, name: str) -> str:
        raw = self.raw[name]
        shown = _show(self.values[name])
        if is_template(raw):
            shown = f"{raw} -> {shown}"
        return redact(f"{self.origin[name]}: {name}={shown}")

    def default(self, name: str, value: Any = None) -> str:
        said = (
            f"{DEFAULT}: {name}={_show(value)}" if value is not None else f"{DEFAULT}: {name} unset"
        )
        if name in self.unresolved:
            return redact(f"{said}; {name} unresolved: {self.unresolved[name]}")
        return said

    def error(self, name: str, why: str) -> InventoryError:
        return InventoryError(
            redact(f"{self.origin[name]}: variable {name}: {why} (got {self.raw[name]!r})")
        )

    def boolean(self, name: str, default: bool) -> tuple[bool, str]:
        if not self.has(name):
            return default, self.default(name, default)
        v = self.values[name]
        if isinstance(v, bool):
            return v, self.source(name)
        if isinstance(v, int) and v in (0, 1):
            return bool(v), self.source(name)
        if isinstance(v, str) and v.strip().lower() in _TRUE + _FALSE:
            return v.strip().lower() in _TRUE, self.source(name)
        raise self.error(name, "not a boolean (use true or false)")

    def choice(self, name: str, choices: Sequence[str], default: str) -> tuple[str, str]:
        if not self.has(name):
            return default, self.default(name, default)
        v = self.values[name]
        if isinstance(v, str):
            for c in choices:
                if v.strip().lower() == c.lower():
                    return c, self.source(name)
        raise self.error(name, f"not one of {', '.join(choices)}")

    def port(self, name: str, default: int) -> tuple[int, str]:
        if not self.has(name):
            return default, self.default(name, default)
        p = _port(self.values[name])
        if p is None:
            raise self.error(name, "not a port number 1-65535")
        return p, self.source(name)


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _port(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v.strip())
    if isinstance(v, int) and 1 <= v <= 65535:
        return v
    return None


def parse_port_range(value: Any) -> tuple[int, int] | None:
    """ "30000-32767" -> (30000, 32767); None when it does not parse or is out of order."""
    if not isinstance(value, str):
        return None
    lo, sep, hi = value.strip().partition("-")
    if not sep:
        return None
    a, b = _port(lo), _port(hi)
    if a is None or b is None or a > b:
        return None
    return a, b


def valid_address(value: str) -> bool:
    """An IP literal or a plausible host name (no spaces, schemes, ports or paths)."""
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return bool(_HOSTNAME.match(value)) and not value.replace(".", "").isdigit()


def parse_host_port(value: Any, default_port: int) -> tuple[str, int] | None:
    """ "host:port", "host", "[v6]:port", or a URL "scheme://host:port/path" -> (host, port)."""
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    if "://" in text:
        scheme = text.split("://", 1)[0].lower()
        if scheme == "http":
            default_port = 80
        elif scheme == "https":
            default_port = 443
        elif scheme == "ftp":
            default_port = 21
    else:
        text = "//" + text
    try:
        parts = urlsplit(text)
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host or not valid_address(host):
        return None
    if port is None:
        # urlsplit maps "host:" to None; an explicit empty or zero port is unusable
        netloc = parts.netloc.rsplit("@", 1)[-1]
        if netloc.endswith(":") or netloc.endswith(":0"):
            return None
        port = default_port
    if not 1 <= port <= 65535:
        return None
    return host, port


# --------------------------------------------------------------------------- ClusterConfig


def cluster_config(layers: Sequence[VarsLayer]) -> ClusterConfig:
    """Decide the CNI, features, ports, registry and MinIO from kubespray variable layers.

    Unknown variables are ignored; an unusable value of a known one raises InventoryError naming
    the file and the variable. Calico features are derived whatever the CNI: the catalog pairs
    them with the calico CNI, and a --cni flag may still switch to calico.
    """
    v = _Vars(layers)
    features: dict[str, Setting] = {}

    if v.has("kube_network_plugin"):
        plugin = v.values["kube_network_plugin"]
        if not isinstance(plugin, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", plugin.strip()):
            raise v.error("kube_network_plugin", "not a network plugin name")
        cni = Setting(plugin.strip().lower(), v.source("kube_network_plugin"))
    else:
        cni = Setting("calico", v.default("kube_network_plugin", "calico"))

    backend, src = v.choice("calico_network_backend", CALICO_BACKENDS, "vxlan")
    features["bgp"] = Setting(backend == "bird", src)
    for feature, name, default in (
        ("vxlan", "calico_vxlan_mode", "Always"),
        ("ipip", "calico_ipip_mode", "Never"),
    ):
        mode, src = v.choice(name, CALICO_MODES, default)
        features[feature] = Setting(mode != "Never", src)

    wg, wg_src = v.boolean("calico_wireguard_enabled", False)
    features["wireguard"] = Setting(wg, wg_src)
    dual, dual_src = v.boolean("enable_dual_stack_networks", False)
    v6, v6_src = v.boolean("ipv6_stack", False)
    if not wg:
        features["wireguard6"] = Setting(False, wg_src)
    elif dual or v6:
        features["wireguard6"] = Setting(True, f"{wg_src} and {dual_src if dual else v6_src}")
    else:
        features["wireguard6"] = Setting(False, f"{wg_src} but IPv6 is off ({dual_src})")

    families = _families(v)
    mode6, src6 = v.choice("calico_vxlan_mode_ipv6", CALICO_MODES, "Never")
    if "ipv6" not in families.value:
        vxlan6 = Setting(False, f"{src6}; the cluster has no IPv6 ({families.source})")
    else:
        vxlan6 = Setting(mode6 != "Never", src6)

    for feature, name in (
        ("typha", "typha_enabled"),
        ("metallb", "metallb_enabled"),
        ("kube-vip", "kube_vip_enabled"),
    ):
        on, src = v.boolean(name, False)
        features[feature] = Setting(on, src)

    port, src = v.port("kube_apiserver_port", 6443)
    apiserver_port = Setting(port, src)

    name = "kube_apiserver_node_port_range"
    if v.has(name):
        rng = parse_port_range(v.values[name])
        if rng is None:
            raise v.error(name, "not a port range lo-hi within 1-65535")
        nodeport_range = Setting(rng, v.source(name))
    else:
        nodeport_range = Setting((30000, 32767), v.default(name, "30000-32767"))

    registry = minio = None
    if v.has("registry_host") and v.values["registry_host"] != "":
        hp = parse_host_port(v.values["registry_host"], 443)
        if hp is None:
            raise v.error("registry_host", "not host:port")
        registry = Setting(hp, v.source("registry_host"))
    if v.has("minio_address") and v.values["minio_address"] != "":
        hp = parse_host_port(v.values["minio_address"], 9000)
        if hp is None:
            raise v.error("minio_address", "not a URL like http://host:9000")
        minio = Setting(hp, v.source("minio_address"))

    def lookup(name: str) -> Any:
        return v.values.get(name)

    def source(name: str) -> str:
        if name in v.values:
            return v.source(name)
        return redact(f"{v.origin[name]}: {name}={v.raw[name]}")

    found, partial = endpoints(v.raw, lookup, source, parse_host_port)
    unresolved = {
        k: r
        for k, r in v.unresolved.items()
        if k in KNOWN_VARS or (is_endpoint_var(k) and k in partial)
    }
    return ClusterConfig(
        cni=cni,
        features=features,
        nodeport_range=nodeport_range,
        apiserver_port=apiserver_port,
        registry=registry,
        minio=minio,
        unresolved=unresolved,
        families=families,
        vxlan6=vxlan6,
        endpoints=found,
    )


def _families(v: _Vars) -> Setting:
    """The address families and the main one (kubespray 2.27+: ipv4_stack / ipv6_stack, its
    main_ip is IPv4 whenever ipv4_stack is on; before: enable_dual_stack_networks)."""
    v4, v4_src = v.boolean("ipv4_stack", True)
    v6, v6_src = v.boolean("ipv6_stack", False)
    dual, dual_src = v.boolean("enable_dual_stack_networks", False)
    if v6 and not v4:
        return Setting(("ipv6",), f"IPv6 only: {v6_src} and {v4_src}")
    if v6:
        return Setting(("ipv4", "ipv6"), f"dual stack, IPv4 main: {v6_src}")
    if dual:
        return Setting(("ipv4", "ipv6"), f"dual stack, IPv4 main: {dual_src}")
    if not v4:
        raise v.error("ipv4_stack", "false with ipv6_stack off leaves no address family")
    return Setting(("ipv4",), f"IPv4 only: {v6_src}")


def kube_api_vip(layers: Sequence[VarsLayer]) -> str | None:
    """The Kubernetes API VIP from the variables: kube_vip_address (with kube_vip_enabled), or
    loadbalancer_apiserver.address. None when neither is set."""
    v = _Vars(layers)
    enabled, _ = v.boolean("kube_vip_enabled", False)
    if enabled and v.has("kube_vip_address"):
        addr = v.values["kube_vip_address"]
        if not isinstance(addr, str) or not valid_address(addr.strip()):
            raise v.error("kube_vip_address", "not an IP address")
        return addr.strip()
    lb = v.values.get("loadbalancer_apiserver")
    if (
        isinstance(lb, dict)
        and isinstance(lb.get("address"), str)
        and valid_address(lb["address"].strip())
    ):
        return lb["address"].strip()
    return None
