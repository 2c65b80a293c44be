"""Inventories: kubespray/Kubean Ansible inventories (YAML, INI and ``ansible-inventory --list``
JSON, parsed by scanner.plan.inventory_files; files and folders read by scanner.plan.sources, with
Ansible's group_vars/host_vars by scanner.plan.ansible_vars), hosts ConfigMaps, the site file
(scanner.plan.sitefile).

``load_site`` is the one entry point: it reads every input into a Site (scanner/core/model.py), the
pure data the planner consumes. Formats are detected by content:

- an Ansible YAML inventory (``all.hosts.<name>``, groups with ``hosts`` / ``children`` / ``vars``),
- the INI form (``[group]``, ``[group:children]``, ``[group:vars]``, ``host key=value``),
- the JSON of ``ansible-inventory --list`` (``_meta.hostvars``),
- a folder of inventory files with its ``group_vars/`` and ``host_vars/``,
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
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

from scanner.core.model import QUALIFIER, Cluster, Host, Site
from scanner.errors import InventoryError
from scanner.plan.ansible_vars import role_groups
from scanner.plan.clusters import cluster_of, inventory_hosts, quick_hosts
from scanner.plan.inventory_files import parse_inventory_text
from scanner.plan.sitefile import site_from_doc
from scanner.plan.sources import SiteDoc, load_cli_vars, read_inventory_file

__all__ = [
    "inventory_hosts",
    "load_site",
    "local_addresses",
    "local_host",
    "parse_inventory_text",
]


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

        return _validated(site_from_doc(sites[0], cli))
    clusters: list[Cluster] = []
    taken: set[str] = set()
    for _, sources in read:
        assert isinstance(sources, list)
        for s in sources:
            name = _unique(s.name, taken)
            per_host = s.host_layers(cli)
            hs = inventory_hosts(s.inventory, name, per_host=per_host)
            clusters.append(cluster_of(name, "standalone", hs, per_host, where=s.inventory.where))
    return _validated(Site(tuple(clusters), source=", ".join(inventories)))


def _validated(site: Site) -> Site:
    """Host names may repeat across clusters (Kubean names every cluster's hosts node1...), but
    one address in two clusters is one machine claimed twice.

    A repeated name is qualified with its cluster (``node1@worker-a``, see
    ``scanner.core.model.Host``): every host of the site has a name of its own, which results,
    pair records, mesh agents and ``--from`` use; ``Host.inventory_name`` keeps the original."""
    seen: dict[str, str] = {}
    clusters_of: dict[str, set[str]] = {}
    owner: dict[str, tuple[str, str]] = {}
    for c in site.clusters:
        for h in c.hosts:
            seen.setdefault(h.name, c.name)
            clusters_of.setdefault(h.name, set()).add(c.name)
            other = owner.setdefault(_norm(h.address), (h.name, c.name))
            if other[1] == c.name and other[0] != h.name:
                raise InventoryError(
                    f"{site.source}: hosts {other[0]} and {h.name} of cluster {c.name} both have"
                    f" address {h.address}; a flow between them would check nothing (give every"
                    " host its own address: access_ip, ip or ansible_host)"
                )
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
    repeated = {n for n, cs in clusters_of.items() if len(cs) > 1}
    if not repeated:
        return site
    taken = set(seen)
    clusters = []
    for c in site.clusters:
        hosts = []
        for h in c.hosts:
            if h.name in repeated:
                q = f"{h.name}{QUALIFIER}{c.name}"
                if q in taken:
                    raise InventoryError(
                        f"{site.source}: host {h.name} of cluster {c.name} would be named {q},"
                        " which another host already is"
                    )
                h = replace(h, name=q)
            hosts.append(h)
        clusters.append(replace(c, hosts=tuple(hosts)))
    return replace(site, clusters=tuple(clusters))


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
        if _norm(h.address) in local or (h.address6 and _norm(h.address6) in local):
            return h
    if not injected:
        me = socket.gethostname().split(".")[0].lower()
        named = [h for h in site.hosts() if h.inventory_name.split(".")[0].lower() == me]
        if len(named) == 1:  # node1 of two clusters: the name alone does not say which
            return named[0]
    return None
