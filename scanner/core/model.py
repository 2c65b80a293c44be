"""The shared data model of hosts, clusters and the site (pure data, no I/O).

Inventory readers (scanner/plan/inventory.py, scanner/plan/kubean.py) build a Site; the planner
(scanner/plan/planner.py) turns catalog x Site x Selection into flows.

Role vocabulary (used by the catalog's dst_role / src_roles):
  node            every Kubernetes node of a cluster (control plane and workers)
  control_plane   kube_control_plane / kube-master members
  etcd            etcd members
  worker          kube_node members that are not control plane
  calico_rr       calico route reflectors
  bootstrap       the bootstrap (seed) node of an air-gapped install
  global          every node of the global service cluster
  scanner         the host running the check (the "browser or API client" of the document)
  vip:kube_api, vip:istio_gateway, vip:insight, vip:registry   virtual IPs
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

ROLES = (
    "node",
    "control_plane",
    "etcd",
    "worker",
    "calico_rr",
    "bootstrap",
    "global",
    "scanner",
    "vip:kube_api",
    "vip:istio_gateway",
    "vip:insight",
    "vip:registry",
)

CLUSTER_KINDS = ("global", "worker", "standalone")


QUALIFIER = "@"  # node1@worker-a: a host name that repeats across clusters, made unique


@dataclass(frozen=True, slots=True)
class Host:
    """One machine. ``name`` is unique in a Site: the inventory name, or ``NAME@CLUSTER`` when
    the inventory name repeats across clusters (Kubean names every cluster's hosts node1,
    node2...), so that results, pairs, agents and ``--from`` never mix two machines up."""

    name: str  # unique host name (the inventory name, qualified when it repeats)
    address: str  # the address to probe: access_ip, then ip, then ansible_host
    roles: frozenset[str] = frozenset()
    cluster: str | None = None  # cluster name; None for the bootstrap node
    user: str | None = None  # ansible_user, for the mesh's exec template
    address6: str | None = None  # IPv6 address of a dual-stack host: access_ip6, then ip6

    @property
    def inventory_name(self) -> str:
        """The name as the inventory writes it (without the ``@cluster`` qualifier)."""
        c = self.cluster
        if c and self.name.endswith(QUALIFIER + c):
            return self.name[: -len(c) - 1]
        return self.name


@dataclass(frozen=True, slots=True)
class Setting:
    """A value with where it came from, for `plan --explain`."""

    value: object
    source: str  # e.g. "default", "flag --cni", "vars.yml: calico_vxlan_mode=Always"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A host outside the inventory every node must reach (scanner/plan/endpoints.py).

    name: the variable it is named after (registry_host, minio_address, files_repo, ...).
    host: an address or a host name (resolved when probing).
    port: the TCP port.
    vars: every variable whose value points at this host:port, name first.
    source: where ``name`` was set, "file: name=value".
    """

    name: str
    host: str
    port: int
    vars: tuple[str, ...]
    source: str


@dataclass(frozen=True)
class ClusterConfig:
    """What decides which requirements apply to a cluster (from kubespray vars, flags, defaults).

    cni: "calico" (default) | "cilium" | "spiderpool" | other kube_network_plugin values.
    features: feature name -> Setting(True/False, source). Feature names are the catalog's
        condition words: vxlan, ipip, bgp, typha, wireguard, wireguard6, metallb, kube-vip,
        istio, insight, deploy.
    nodeport_range: (lo, hi), default (30000, 32767).
    apiserver_port: default 6443.
    registry: (host, port) of the image registry, when known (kubespray registry_host).
    minio: (host, port) of MinIO on the bootstrap node, when known (minio_address).
    unresolved: variable name -> raw value, for templated values that could not be resolved.
    families: the address families, main one first (ipv4_stack, ipv6_stack,
        enable_dual_stack_networks); vxlan6: calico_vxlan_mode_ipv6 is on.
    endpoints: hosts outside the inventory the variables point at (registry, files, mirrors).
    """

    cni: Setting = field(default_factory=lambda: Setting("calico", "default"))
    features: dict[str, Setting] = field(default_factory=dict)
    nodeport_range: Setting = field(default_factory=lambda: Setting((30000, 32767), "default"))
    apiserver_port: Setting = field(default_factory=lambda: Setting(6443, "default"))
    registry: Setting | None = None
    minio: Setting | None = None
    unresolved: dict[str, str] = field(default_factory=dict)
    # the address families the cluster runs: ("ipv4",), ("ipv4", "ipv6") or ("ipv6",), the
    # first being the one its API server, kubelet and etcd use (kubespray's main_ip)
    families: Setting = field(default_factory=lambda: Setting(("ipv4",), "default"))
    # Calico VXLAN over IPv6 (calico_vxlan_mode_ipv6 other than Never)
    vxlan6: Setting = field(default_factory=lambda: Setting(False, "default"))
    endpoints: tuple[Endpoint, ...] = ()


@dataclass(frozen=True)
class Cluster:
    name: str
    kind: str  # one of CLUSTER_KINDS
    hosts: tuple[Host, ...]
    vips: dict[str, str] = field(default_factory=dict)  # "kube_api" -> address
    config: ClusterConfig = field(default_factory=ClusterConfig)


@dataclass(frozen=True)
class Site:
    """The whole topology: clusters, the bootstrap node and the site-wide VIPs."""

    clusters: tuple[Cluster, ...]
    bootstrap: Host | None = None
    vips: dict[str, str] = field(default_factory=dict)  # "istio_gateway", "insight", "registry"
    source: str = ""  # the file(s) it was read from, for messages

    def hosts(self) -> list[Host]:
        out: list[Host] = []
        if self.bootstrap is not None:
            out.append(self.bootstrap)
        for c in self.clusters:
            out.extend(c.hosts)
        return out

    def host(self, name: str) -> Host | None:
        for h in self.hosts():
            if h.name == name:
                return h
        return None

    def match(self, key: str) -> list[Host]:
        """The hosts ``key`` may mean: its unique name (``node1@worker-a``), its address, or
        its inventory name (``node1``: several hosts when the name repeats across clusters)."""
        h = self.host(key)
        if h is not None:
            return [h]
        norm = _norm_addr(key)
        if norm is not None:
            by_addr = [h for h in self.hosts() if _norm_addr(h.address) == norm]
            if by_addr:
                return by_addr
        named = [h for h in self.hosts() if h.inventory_name == key]
        if named or QUALIFIER not in key:
            return named
        # NAME@CLUSTER where NAME is unique and so not qualified in h.name (one cluster uses it)
        name, _, cluster = key.rpartition(QUALIFIER)
        return [h for h in self.hosts() if h.inventory_name == name and h.cluster == cluster]


def _norm_addr(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        return None

_DIGITS = re.compile(r"([0-9]+)")


def natural_key(s: str) -> tuple:
    """Sort key for host names as people number them: node2 before node10 (ASCII digits only;
    '²' is a digit to str.isdigit, not to int())."""
    return tuple(int(t) if i % 2 else t for i, t in enumerate(_DIGITS.split(s)))
