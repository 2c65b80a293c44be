"""Inventories: kubespray/Kubean Ansible inventories (YAML and INI, parsed by
scanner.plan.inventory_files), hosts ConfigMaps, the site file.

``load_site`` is the one entry point: it reads every input into a Site (scanner/core/model.py), the
pure data the planner consumes. Formats are detected by content:

- an Ansible YAML inventory (``all.hosts.<name>``, groups with ``hosts`` / ``children`` / ``vars``),
- the INI form (``[group]``, ``[group:children]``, ``[group:vars]``, ``host key=value``),
- Kubernetes YAML: ConfigMaps (several documents, or ``kind: List``) whose ``data["hosts.yml"]``
  is the inventory and ``data["group_vars.yml"]`` the variables, optionally with the Kubean
  ``Cluster`` resources that pair them,
- our site file (top-level ``portmesh_site:`` or ``site:``), documented in docs/site-file.md.

Roles follow scanner/core/model.py: node (k8s_cluster, or kube_control_plane + kube_node),
control_plane, worker (kube_node minus control plane), etcd, calico_rr; nodes of the global
cluster also get "global". Both group-name generations are read (kube-master, kube-node,
k8s-cluster). Every problem is one InventoryError line naming the file.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from scanner.core.model import Cluster, Host, Site
from scanner.errors import InventoryError
from scanner.plan import kubean
from scanner.plan.ansible_vars import (
    CliVars,
    chain,
    cluster_layers,
    host_layers,
    origin,
    role_groups,
)
from scanner.plan.inventory_files import (
    CLUSTER_GROUPS,
    CONTROL_PLANE_GROUPS,
    NODE_GROUPS,
    Inventory,
    parse_inventory_text,
)
from scanner.plan.kubean import VarsLayer
from scanner.plan.sources import SiteDoc, load_cli_vars, read_inventory_file

__all__ = ["load_site", "local_host", "local_addresses", "parse_inventory_text"]

ADDRESS_VARS = ("access_ip", "ip", "ansible_host")
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


def _address(name: str, layers: Sequence[VarsLayer], where_inv: str) -> str:
    """access_ip, else ip, else ansible_host of the host's merged variables (templates resolved)."""
    view = chain(layers)
    for var in ADDRESS_VARS:
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
        if not isinstance(value, str) or not kubean.valid_address(value.strip()):
            raise InventoryError(f"{where}: host {name}: {var}={value!r} is not an address")
        return value.strip()
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        raise InventoryError(
            f"{where_inv}: host {name} has no address (set access_ip, ip or ansible_host)"
        ) from None


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
        hosts.append(
            Host(
                name=name,
                address=_address(name, layers, inv.where),
                roles=frozenset(roles),
                cluster=cluster,
                user=str(user) if isinstance(user, (str, int)) and str(user) else None,
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
    found: dict[str, str] = {}
    vip = kubean.kube_api_vip(layers)
    if vip is not None:
        found["kube_api"] = vip
    found.update(vips or {})
    return Cluster(src_name, kind, hosts, found, config)


def _unique(name: str, taken: set[str]) -> str:
    out, i = name, 2
    while out in taken:
        out, i = f"{name}-{i}", i + 1
    taken.add(out)
    return out


def load_site(
    inventories: Sequence[str] = (),
    vars_files: Sequence[str] = (),
    hosts: Sequence[str] = (),
    role: str = "node",
) -> Site:
    """Read inventories / a site file / --hosts into a Site.

    ``vars_files`` (--vars: vars files, ConfigMaps with data["group_vars.yml"], group_vars
    folders) apply in order above every other variable source, to every cluster read here.
    """
    inventories = [str(p) for p in inventories]
    cli = load_cli_vars([str(v) for v in vars_files])
    if hosts and inventories:
        raise InventoryError("give either --hosts or --inventory, not both")
    if hosts:
        quick = quick_hosts(hosts, role, "cluster")
        per_host = {h.name: cli.layers(role_groups(h.roles)) for h in quick}
        cluster = cluster_of("cluster", "standalone", quick, per_host, where="--hosts")
        return _validated(Site((cluster,), source="--hosts"))
    if not inventories:
        raise InventoryError("no inventory: give --inventory FILE or --hosts a,b,c")
    read = [(p, read_inventory_file(p)) for p in inventories]
    sites = [r for _, r in read if isinstance(r, SiteDoc)]
    if sites:
        if len(read) > 1:
            raise InventoryError(f"{sites[0].path}: a site file must be the only --inventory")
        from scanner.plan.sitefile import site_from_doc

        return _validated(site_from_doc(sites[0], cli))
    clusters: list[Cluster] = []
    taken: set[str] = set()
    for _, sources in read:
        assert isinstance(sources, list)
        for s in sources:
            name = _unique(s.name, taken)
            per_host = s.host_layers(cli)
            hs = inventory_hosts(s.inventory, name, per_host=per_host)
            clusters.append(
                cluster_of(name, "standalone", hs, per_host, where=s.inventory.where)
            )
    return _validated(Site(tuple(clusters), source=", ".join(inventories)))


def _validated(site: Site) -> Site:
    """Host names may repeat across clusters (Kubean names every cluster's hosts node1...), but
    one address in two clusters is one machine claimed twice."""
    seen: dict[str, str] = {}
    owner: dict[str, tuple[str, str]] = {}
    for c in site.clusters:
        for h in c.hosts:
            seen.setdefault(h.name, c.name)
            other = owner.setdefault(_norm(h.address), (h.name, c.name))
            if other[1] != c.name:
                raise InventoryError(
                    f"{site.source}: address {h.address} is host {other[0]} of cluster {other[1]}"
                    f" and host {h.name} of cluster {c.name}"
                )
    if site.bootstrap is not None and site.bootstrap.name in seen:
        raise InventoryError(
            f"{site.source}: bootstrap name {site.bootstrap.name} is also a host of cluster"
            f" {seen[site.bootstrap.name]}"
        )
    return site


# --------------------------------------------------------------------------- this host


def _proc_addresses() -> set[str]:
    out: set[str] = set()
    try:  # IPv4 local addresses: "|-- a.b.c.d" followed by "/32 host LOCAL"
        lines = Path("/proc/net/fib_trie").read_text().splitlines()
        for prev, line in zip(lines, lines[1:], strict=False):
            if "/32 host LOCAL" in line and "|--" in prev:
                out.add(prev.split("|--")[1].strip())
    except OSError:
        pass
    try:  # IPv6: 32 hex digits per line
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            h = line.split()[0] if line.split() else ""
            if len(h) == 32:
                out.add(str(ipaddress.IPv6Address(bytes.fromhex(h))))
    except (OSError, ValueError):
        pass
    return out


def local_addresses() -> set[str]:
    """This machine's interface addresses (in this network namespace), read from /proc."""
    out = _proc_addresses()
    if not out:  # no /proc (containers without it): fall back to what the host name resolves to
        try:
            for info in socket.getaddrinfo(socket.gethostname(), None):
                out.add(str(info[4][0]))
        except OSError:
            pass
    return out


def _norm(addr: str) -> str:
    try:
        return str(ipaddress.ip_address(addr.split("%")[0]))
    except ValueError:
        return addr.lower()


def local_host(site: Site, addresses: Iterable[str] | None = None) -> Host | None:
    """Which host of the site this machine is: the first whose address is a local address.

    ``addresses`` replaces the local interface addresses (tests). Without it, a host whose name
    is this machine's host name also matches when no address does.
    """
    injected = addresses is not None
    local = {_norm(a) for a in (addresses if addresses is not None else local_addresses())}
    for h in site.hosts():
        if _norm(h.address) in local:
            return h
    if not injected:
        me = socket.gethostname().split(".")[0].lower()
        for h in site.hosts():
            if h.name.split(".")[0].lower() == me:
                return h
    return None
