"""Hosts and clusters from parsed inventories (pure): roles from kubespray's groups, addresses
and users from every host's merged variables, and one checked configuration per cluster.

Roles follow scanner/core/model.py: node (k8s_cluster, or kube_control_plane + kube_node),
control_plane, worker (kube_node minus control plane), etcd, calico_rr; nodes of the global
cluster also get "global". Both group-name generations are read (kube-master, kube-node,
k8s-cluster), and kubespray's run-time groups are added (scanner.plan.ansible_vars).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

from scanner.core.model import Cluster, Host
from scanner.errors import InventoryError, warn
from scanner.plan import kubean
from scanner.plan.ansible_vars import CliVars, chain, cluster_layers, host_layers, origin
from scanner.plan.inventory_files import (
    CLUSTER_GROUPS,
    CONTROL_PLANE_GROUPS,
    NODE_GROUPS,
    Inventory,
)
from scanner.plan.kubean import VarsLayer, redact

ADDRESS_VARS = ("access_ip", "ip", "ansible_host")
ADDRESS6_VARS = ("access_ip6", "ip6")  # kubespray's per-host IPv6 addresses (dual stack)
# every per-host variable the planner reads (the playbook passes them: ansible_vars.PLAN_VARS)
PLAN_HOST_VARS = (*ADDRESS_VARS, *ADDRESS6_VARS, "ansible_user")
# --role words for --hosts (and a site cluster's inline hosts) -> the roles each host gets
QUICK_ROLES: dict[str, frozenset[str]] = {
    "node": frozenset({"node"}),
    "worker": frozenset({"node", "worker"}),
    "control_plane": frozenset({"node", "control_plane"}),
    "etcd": frozenset({"etcd"}),
    "calico_rr": frozenset({"calico_rr"}),
    "global": frozenset({"node", "global"}),
}
# --------------------------------------------------------------------------- roles and hosts


def _first_set(
    name: str, view: Any, layers: Sequence[VarsLayer], names: Sequence[str]
) -> tuple[str, Any, str] | None:
    """The first of ``names`` the host sets: (variable, value with templates resolved, where)."""
    for var in names:
        value = view.get(var)
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        where = origin(layers, var)
        if kubean.is_template(value):
            resolved, _ = kubean.resolve_templates(view, [var])
            if var not in resolved:
                raise InventoryError(
                    f"{where}: host {name}: {var}={value!r} is a template that does not resolve"
                )
            value = resolved[var]
        return var, value, where
    return None


def _address(name: str, layers: Sequence[VarsLayer], where_inv: str) -> str:
    """access_ip, else ip, else ansible_host of the host's merged variables (templates resolved)."""
    got = _first_set(name, chain(layers), layers, ADDRESS_VARS)
    if got is not None:
        var, value, where = got
        if not isinstance(value, str) or not kubean.valid_address(value.strip()):
            raise InventoryError(f"{where}: host {name}: {var}={value!r} is not an address")
        return value.strip()
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        raise InventoryError(
            f"{where_inv}: host {name} has no address (set access_ip, ip or ansible_host)"
        ) from None


def _address6(name: str, layers: Sequence[VarsLayer], main: str) -> str | None:
    """A dual-stack host's IPv6 address: access_ip6, then ip6 (kubespray); an IPv6 main
    address (ansible_host/ip of an IPv6-only host) when neither is set."""
    got = _first_set(name, chain(layers), layers, ADDRESS6_VARS)
    if got is not None:
        var, value, where = got
        try:
            return str(ipaddress.IPv6Address(str(value).strip()))
        except ValueError:
            raise InventoryError(
                f"{where}: host {name}: {var}={value!r} is not an IPv6 address"
            ) from None
    return main if ":" in main else None


def inventory_hosts(
    inv: Inventory,
    cluster: str,
    is_global: bool = False,
    per_host: Mapping[str, Sequence[VarsLayer]] | None = None,
) -> tuple[Host, ...]:
    """The hosts of the Kubernetes groups with their roles, in inventory order; addresses and
    users from every host's variable layers (``per_host``; the inventory's own by default)."""
    if per_host is None:
        per_host = host_layers(inv, [], CliVars())
    if not inv.hostvars:
        raise InventoryError(f"{inv.where}: empty inventory (no hosts)")
    cp = inv.members(CONTROL_PLANE_GROUPS)
    kn = inv.members(NODE_GROUPS)
    nodes = inv.members(CLUSTER_GROUPS) | cp | kn
    etcd = inv.members(("etcd",))
    rr = inv.members(("calico_rr",))
    hosts: list[Host] = []
    for name in inv.hostvars:
        roles: set[str] = set()
        if name in nodes:
            roles.add("node")
            if name in cp:
                roles.add("control_plane")
            elif name in kn:
                roles.add("worker")
            if is_global:
                roles.add("global")
        if name in etcd:
            roles.add("etcd")
        if name in rr:
            roles.add("calico_rr")
        if not roles:
            continue  # e.g. a bastion: not part of the cluster's mesh
        layers = per_host[name]
        user = chain(layers).get("ansible_user")
        address = _address(name, layers, inv.where)
        hosts.append(
            Host(
                name=name,
                address=address,
                roles=frozenset(roles),
                cluster=cluster,
                user=str(user) if isinstance(user, (str, int)) and str(user) else None,
                address6=_address6(name, layers, address),
            )
        )
    if not hosts:
        raise InventoryError(
            f"{inv.where}: no host is in kube_control_plane, kube_node, k8s_cluster, etcd or"
            " calico_rr (nor kube-master, kube-node, k8s-cluster)"
        )
    return tuple(hosts)


def quick_hosts(
    items: Sequence[str], role: str, cluster: str, where: str = "--hosts"
) -> tuple[Host, ...]:
    """``--hosts a,b,name=addr --role node``: one host per item, every host with the role's roles."""
    roles: set[str] = set()
    for word in str(role).split(","):
        w = word.strip().replace("-", "_")
        if w not in QUICK_ROLES:
            raise InventoryError(
                f"--role: unknown role {word.strip()!r} (use {', '.join(QUICK_ROLES)})"
            )
        roles |= QUICK_ROLES[w]
    if "node" in roles and "control_plane" not in roles:
        roles.add("worker")
    hosts: list[Host] = []
    seen: set[str] = set()
    for item in items:
        for part in str(item).split(","):
            p = part.strip()
            if not p:
                continue
            name, eq, addr = p.partition("=")
            name, addr = name.strip(), (addr.strip() if eq else name.strip())
            if not name or not kubean.valid_address(addr):
                raise InventoryError(
                    f"{where}: {p!r} is not an address, a host name or name=address"
                )
            if name in seen:
                raise InventoryError(f"{where}: host {name} is listed twice")
            seen.add(name)
            hosts.append(Host(name, addr, frozenset(roles), cluster))
    if not hosts:
        raise InventoryError(f"{where}: no hosts given")
    return tuple(hosts)


# --------------------------------------------------------------------------- building clusters


def cluster_of(
    src_name: str,
    kind: str,
    hosts: tuple[Host, ...],
    per_host: Mapping[str, Sequence[VarsLayer]],
    vips: Mapping[str, str] | None = None,
    where: str = "",
) -> Cluster:
    """A cluster from its hosts and every host's variable layers (one configuration, checked)."""
    layers = cluster_layers(hosts, per_host, where or src_name)
    config = kubean.cluster_config(layers)
    for name, raw in config.unresolved.items():
        if raw == str(kubean.VAULTED):
            warn(
                f"{origin(layers, name)}: variable {name} is vault-encrypted (!vault) and"
                f" portmesh has no vault password; {kubean.instead(name)}: set {name} to a plain"
                " value with --vars to check what the cluster uses"
            )
            continue
        warn(
            f"{origin(layers, name)}: variable {name}={redact(raw)!r} is a template portmesh"
            f" cannot follow (it follows {{{{ name }}}} references and the filters int, string,"
            f" default, lower, upper, trim, bool); {kubean.instead(name)}: set {name} to a plain"
            " value (e.g. with --vars) to check what the cluster uses"
        )
    found: dict[str, str] = {}
    vip = kubean.kube_api_vip(layers)
    if vip is not None:
        found["kube_api"] = vip
    found.update(vips or {})
    return Cluster(src_name, kind, hosts, found, config)
