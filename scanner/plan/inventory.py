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
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from scanner.catalog.loader import FEATURES  # the catalog's feature words: one list
from scanner.core.model import QUALIFIER, Cluster, Host, Setting, Site
from scanner.errors import InventoryError
from scanner.plan import kubean
from scanner.plan.inventory_files import (
    CLUSTER_GROUPS,
    CONTROL_PLANE_GROUPS,
    NODE_GROUPS,
    Inventory,
    looks_like_ini,
    parse_ini_inventory,
    parse_inventory_text,
    parse_yaml_inventory,
)
from scanner.plan.kubean import VarsLayer

__all__ = ["load_site", "local_host", "local_addresses", "parse_inventory_text"]

ADDRESS_VARS = ("access_ip", "ip", "ansible_host")
ADDRESS6_VARS = ("access_ip6", "ip6")  # kubespray's per-host IPv6 addresses (dual stack)
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


def _address(inv: Inventory, name: str, group_vars: Mapping[str, Any]) -> str:
    hv = inv.hostvars.get(name, {})
    for var in ADDRESS_VARS:
        value = hv.get(var)
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if kubean.is_template(value):
            resolved, _ = kubean.resolve_templates({**group_vars, **hv})
            if var not in resolved:
                raise InventoryError(
                    f"{inv.where}: host {name}: {var}={value!r} is a template that does not resolve"
                )
            value = resolved[var]
        if not isinstance(value, str) or not kubean.valid_address(value.strip()):
            raise InventoryError(f"{inv.where}: host {name}: {var}={value!r} is not an address")
        return value.strip()
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        raise InventoryError(
            f"{inv.where}: host {name} has no address (set access_ip, ip or ansible_host)"
        ) from None


def _address6(inv: Inventory, name: str, group_vars: Mapping[str, Any], main: str) -> str | None:
    """A dual-stack host's IPv6 address: access_ip6, then ip6 (kubespray); an IPv6 main
    address (ansible_host/ip of an IPv6-only host) when neither is set."""
    hv = inv.hostvars.get(name, {})
    for var in ADDRESS6_VARS:
        value = hv.get(var)
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if kubean.is_template(value):
            resolved, _ = kubean.resolve_templates({**group_vars, **hv})
            if var not in resolved:
                raise InventoryError(
                    f"{inv.where}: host {name}: {var}={value!r} is a template that does not resolve"
                )
            value = resolved[var]
        try:
            return str(ipaddress.IPv6Address(str(value).strip()))
        except ValueError:
            raise InventoryError(
                f"{inv.where}: host {name}: {var}={value!r} is not an IPv6 address"
            ) from None
    return main if ":" in main else None


def inventory_hosts(inv: Inventory, cluster: str, is_global: bool = False) -> tuple[Host, ...]:
    """The hosts of the Kubernetes groups with their roles, in inventory order."""
    if not inv.hostvars:
        raise InventoryError(f"{inv.where}: empty inventory (no hosts)")
    cp = inv.members(CONTROL_PLANE_GROUPS)
    kn = inv.members(NODE_GROUPS)
    nodes = inv.members(CLUSTER_GROUPS) | cp | kn
    etcd = inv.members(("etcd",))
    rr = inv.members(("calico_rr",))
    group_vars = kubean.merge_vars(inv.vars_layers()).values
    hosts: list[Host] = []
    for name, hv in inv.hostvars.items():
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
        user = hv.get("ansible_user")
        address = _address(inv, name, group_vars)
        hosts.append(
            Host(
                name=name,
                address=address,
                roles=frozenset(roles),
                cluster=cluster,
                user=str(user) if isinstance(user, (str, int)) and str(user) else None,
                address6=_address6(inv, name, group_vars, address),
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


# --------------------------------------------------------------------------- inventory files


@dataclass
class _ClusterSource:
    """One cluster read from an inventory file: its inventory and the vars that came with it."""

    name: str
    inventory: Inventory
    layers: list[VarsLayer]  # the inventory's own group vars, then vars ConfigMaps of the file


@dataclass
class _SiteDoc:
    path: str
    body: dict[str, Any]


def _strip_suffix(name: str) -> str:
    for suffix in ("-hosts-conf", "-hosts", "-inventory"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _from_configmaps(docs: list[Any], path: str) -> list[_ClusterSource]:
    objects = list(kubean.kubernetes_objects(docs, path))
    cms = [kubean.configmap(o, path) for o in objects if o.get("kind") == "ConfigMap"]
    by_name = {c.name: c for c in cms}
    hosts_cms = [c for c in cms if kubean.HOSTS_KEY in c.data]
    vars_cms = [c for c in cms if kubean.VARS_KEY in c.data]
    clusters = [o for o in objects if o.get("kind") == "Cluster"]

    def source(name: str, hcm: kubean.ConfigMap, vcms: list[kubean.ConfigMap]) -> _ClusterSource:
        inv = parse_inventory_text(hcm.data[kubean.HOSTS_KEY], f"{hcm.where} {kubean.HOSTS_KEY}")
        layers = inv.vars_layers()
        for v in vcms:
            layers.append(
                VarsLayer(
                    v.where,
                    kubean.parse_vars_text(v.data[kubean.VARS_KEY], f"{v.where} {kubean.VARS_KEY}"),
                )
            )
        return _ClusterSource(name, inv, layers)

    if clusters:  # Kubean Cluster resources pair the hosts and vars ConfigMaps by name
        out = []
        for c in clusters:
            cname = kubean.object_name(c)
            spec = c.get("spec") if isinstance(c.get("spec"), dict) else {}
            refs = {}
            for key in ("hostsConfRef", "varsConfRef"):
                ref = spec.get(key)
                refs[key] = ref.get("name") if isinstance(ref, dict) else None
            hcm = (
                by_name.get(refs["hostsConfRef"]) if isinstance(refs["hostsConfRef"], str) else None
            )
            if hcm is None or kubean.HOSTS_KEY not in hcm.data:
                raise InventoryError(
                    f"{path}: Cluster {cname}: hostsConfRef {refs['hostsConfRef']!r} is not a ConfigMap"
                    f' with data["{kubean.HOSTS_KEY}"] in this file'
                )
            vref = refs["varsConfRef"]
            vcm = by_name.get(vref) if isinstance(vref, str) else None
            if vref is not None and (vcm is None or kubean.VARS_KEY not in vcm.data):
                raise InventoryError(
                    f"{path}: Cluster {cname}: varsConfRef {vref!r} is not a ConfigMap"
                    f' with data["{kubean.VARS_KEY}"] in this file'
                )
            out.append(source(cname, hcm, [vcm] if vcm else []))
        return out
    if not hosts_cms:
        found = ", ".join(c.name for c in cms) or "no ConfigMap"
        raise InventoryError(
            f'{path}: no ConfigMap with data["{kubean.HOSTS_KEY}"] (found {found})'
        )
    if len(hosts_cms) > 1:
        names = ", ".join(c.name for c in hosts_cms)
        raise InventoryError(
            f'{path}: several ConfigMaps with data["{kubean.HOSTS_KEY}"] ({names}); give one per'
            " --inventory, or add the Kubean Cluster resources that pair them"
        )
    return [source(_strip_suffix(hosts_cms[0].name), hosts_cms[0], vars_cms)]


def read_inventory_file(path: str) -> list[_ClusterSource] | _SiteDoc:
    """Read one --inventory file: clusters it defines, or the site file it is."""
    text = kubean.read_text(path, "inventory")
    stem = Path(path).stem or "cluster"
    if looks_like_ini(text):
        ini = parse_ini_inventory(text, path)
        return [_ClusterSource(stem, ini, ini.vars_layers())]
    docs = [d for d in kubean.load_yaml_documents(text, path) if d is not None]
    if not docs:
        raise InventoryError(f"{path}: empty inventory")
    if any(kubean.is_kubernetes_object(d) for d in docs):
        return _from_configmaps(docs, path)
    first = docs[0]
    if isinstance(first, dict) and ("portmesh_site" in first or "site" in first):
        if len(docs) > 1:
            raise InventoryError(f"{path}: a site file holds one YAML document")
        key = "portmesh_site" if "portmesh_site" in first else "site"
        if len(first) > 1:
            extra = ", ".join(str(k) for k in first if k != key)
            raise InventoryError(f"{path}: site file: unexpected top-level key(s) {extra}")
        body = first[key]
        if not isinstance(body, dict):
            raise InventoryError(f"{path}: site file: {key} must be a mapping")
        return _SiteDoc(path, body)
    if len(docs) == 1 and isinstance(first, str) and "=" in first:
        ini = parse_ini_inventory(text, path)
        return [_ClusterSource(stem, ini, ini.vars_layers())]
    if len(docs) > 1:
        raise InventoryError(f"{path}: several YAML documents, but none is a Kubernetes object")
    inv = parse_yaml_inventory(first, path)
    return [_ClusterSource(stem, inv, inv.vars_layers())]


# --------------------------------------------------------------------------- building clusters


def _cluster(
    src_name: str,
    kind: str,
    hosts: tuple[Host, ...],
    layers: Sequence[VarsLayer],
    vips: Mapping[str, str] | None = None,
) -> Cluster:
    config = kubean.cluster_config(layers)
    found: dict[str, str] = {}
    vip = kubean.kube_api_vip(layers)
    if vip is not None:
        found["kube_api"] = vip
    found.update(vips or {})
    return Cluster(src_name, kind, hosts, found, config)


def _load_vars(files: Sequence[str]) -> list[VarsLayer]:
    out: list[VarsLayer] = []
    for f in files:
        out.extend(kubean.load_vars_file(f))
    return out


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

    ``vars_files`` (kubespray group_vars YAML or ConfigMaps with data["group_vars.yml"]) merge in
    order over the inventories' own variables, later wins, and apply to every cluster read here.
    """
    inventories = [str(p) for p in inventories]
    cli_layers = _load_vars([str(v) for v in vars_files])
    if hosts and inventories:
        raise InventoryError("give either --hosts or --inventory, not both")
    if hosts:
        quick = quick_hosts(hosts, role, "cluster")
        return _validated(
            Site((_cluster("cluster", "standalone", quick, cli_layers),), source="--hosts")
        )
    if not inventories:
        raise InventoryError("no inventory: give --inventory FILE or --hosts a,b,c")
    read = [(p, read_inventory_file(p)) for p in inventories]
    sites = [r for _, r in read if isinstance(r, _SiteDoc)]
    if sites:
        if len(read) > 1:
            raise InventoryError(f"{sites[0].path}: a site file must be the only --inventory")
        return _validated(_site_from_doc(sites[0], cli_layers))
    clusters: list[Cluster] = []
    taken: set[str] = set()
    for _, sources in read:
        assert isinstance(sources, list)
        for s in sources:
            name = _unique(s.name, taken)
            hs = inventory_hosts(s.inventory, name)
            clusters.append(_cluster(name, "standalone", hs, [*s.layers, *cli_layers]))
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


# --------------------------------------------------------------------------- the site file

_SITE_KEYS = ("name", "version", "bootstrap", "vips", "vars", "clusters")
_CLUSTER_KEYS = ("name", "kind", "inventory", "hosts", "role", "vars", "vips", "cni", "features")
_SITE_VIPS = ("istio_gateway", "insight", "registry")
_CLUSTER_VIPS = ("kube_api",)


def _keys(body: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    for k in body:
        if k not in allowed:
            raise InventoryError(f"{where}: unexpected key {k!r} (expected {', '.join(allowed)})")


def _str(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise InventoryError(f"{where}: expected a non-empty string, got {value!r}")
    return str(value).strip()


def _vips(value: Any, allowed: Sequence[str], where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InventoryError(f"{where}: must be a mapping of {', '.join(allowed)}")
    out: dict[str, str] = {}
    for k, v in value.items():
        if k not in allowed:
            raise InventoryError(f"{where}: unknown VIP {k!r} (expected {', '.join(allowed)})")
        addr = _str(v, f"{where}.{k}")
        if not kubean.valid_address(addr):
            raise InventoryError(f"{where}.{k}: {addr!r} is not an address")
        out[k] = addr
    return out


def _paths(value: Any, base: str, where: str) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    return [os.path.normpath(os.path.join(base, _str(v, where))) for v in items]


def _site_features(value: Any, where: str) -> dict[str, Setting]:
    if value is None:
        return {}
    if isinstance(value, list):
        value = {_str(f, where): True for f in value}
    if not isinstance(value, dict):
        raise InventoryError(
            f"{where}: must be a list of features or a mapping feature: true/false"
        )
    out: dict[str, Setting] = {}
    for k, v in value.items():
        if k not in FEATURES:
            raise InventoryError(f"{where}: unknown feature {k!r} (expected {', '.join(FEATURES)})")
        if not isinstance(v, bool):
            raise InventoryError(f"{where}.{k}: expected true or false, got {v!r}")
        out[k] = Setting(v, f"{where}.{k}={'true' if v else 'false'}")
    return out


def _site_from_doc(doc: _SiteDoc, cli_layers: Sequence[VarsLayer]) -> Site:
    path, body = doc.path, doc.body
    base = os.path.dirname(path)
    _keys(body, _SITE_KEYS, f"{path}: site")
    version = body.get("version", 1)
    if version != 1:
        raise InventoryError(f"{path}: site.version {version!r} is not supported (expected 1)")

    bootstrap = None
    b = body.get("bootstrap")
    if b is not None:
        if isinstance(b, str):
            b = {"address": b}
        if not isinstance(b, dict):
            raise InventoryError(f"{path}: site.bootstrap must be an address or a mapping")
        _keys(b, ("name", "address", "user"), f"{path}: site.bootstrap")
        addr = _str(b.get("address"), f"{path}: site.bootstrap.address")
        if not kubean.valid_address(addr):
            raise InventoryError(f"{path}: site.bootstrap.address {addr!r} is not an address")
        bname = _str(b.get("name", "bootstrap"), f"{path}: site.bootstrap.name")
        user = (
            _str(b["user"], f"{path}: site.bootstrap.user") if b.get("user") is not None else None
        )
        bootstrap = Host(bname, addr, frozenset({"bootstrap"}), None, user)

    site_vips = _vips(body.get("vips"), _SITE_VIPS, f"{path}: site.vips")
    site_layers = _load_vars(_paths(body.get("vars"), base, f"{path}: site.vars"))

    raw = body.get("clusters")
    if isinstance(raw, dict):
        items = []
        for k, v in raw.items():
            if v is not None and not isinstance(v, dict):
                raise InventoryError(f"{path}: site.clusters.{k} must be a mapping")
            items.append({"name": k, **(v or {})})
        raw = items
    if not isinstance(raw, list) or not raw:
        raise InventoryError(f"{path}: site.clusters must list at least one cluster")

    # site-wide features: what the VIPs and the bootstrap node imply, for every cluster
    implied: dict[str, Setting] = {}
    if bootstrap is not None:
        implied["deploy"] = Setting(True, f"{path}: site.bootstrap.address={bootstrap.address}")
    if "insight" in site_vips:
        implied["insight"] = Setting(True, f"{path}: site.vips.insight={site_vips['insight']}")

    clusters: list[Cluster] = []
    taken: set[str] = set()
    globals_: list[str] = []
    for i, c in enumerate(raw):
        where = f"{path}: site.clusters[{i}]"
        if not isinstance(c, dict):
            raise InventoryError(f"{where} must be a mapping")
        _keys(c, _CLUSTER_KEYS, where)
        name = _str(c.get("name"), f"{where}.name")
        where = f"{path}: cluster {name}"
        if name in taken:
            raise InventoryError(f"{where}: cluster name used twice")
        taken.add(name)
        kind = c.get("kind", "worker")
        if kind not in ("global", "worker", "standalone"):
            raise InventoryError(f"{where}: kind {kind!r} (expected global, worker or standalone)")
        if kind == "global":
            globals_.append(name)
        if (c.get("inventory") is None) == (c.get("hosts") is None):
            raise InventoryError(f"{where}: give exactly one of inventory or hosts")
        if c.get("inventory") is not None:
            inv_path = _paths(c["inventory"], base, f"{where}.inventory")
            if len(inv_path) != 1:
                raise InventoryError(f"{where}: inventory is one file")
            read = read_inventory_file(inv_path[0])
            if isinstance(read, _SiteDoc):
                raise InventoryError(
                    f"{where}: inventory {inv_path[0]} is a site file, not an inventory"
                )
            if len(read) != 1:
                raise InventoryError(
                    f"{where}: inventory {inv_path[0]} holds {len(read)} clusters; use one per site cluster"
                )
            src = read[0]
            hosts = inventory_hosts(src.inventory, name, kind == "global")
            inv_layers = src.layers
        else:
            if c.get("role") is not None:
                role = _str(c.get("role"), f"{where}.role")
            else:
                role = "global" if kind == "global" else "node"
            items = c["hosts"] if isinstance(c["hosts"], list) else [c["hosts"]]
            hosts = quick_hosts(
                [_str(h, f"{where}.hosts") for h in items], role, name, f"{where}.hosts"
            )
            if kind == "global":
                hosts = tuple(
                    replace(h, roles=h.roles | {"global"}) if "node" in h.roles else h
                    for h in hosts
                )
            inv_layers = []
        layers = [
            *inv_layers,
            *site_layers,
            *_load_vars(_paths(c.get("vars"), base, f"{where}.vars")),
            *cli_layers,
        ]
        cluster = _cluster(
            name, kind, hosts, layers, _vips(c.get("vips"), _CLUSTER_VIPS, f"{where}.vips")
        )
        config = cluster.config
        if c.get("cni") is not None:
            cni = _str(c["cni"], f"{where}.cni").lower()
            config = replace(config, cni=Setting(cni, f"{path}: cluster {name} cni={cni}"))
        features = {**config.features, **implied}
        if kind == "global" and "istio_gateway" in site_vips:
            features["istio"] = Setting(
                True, f"{path}: site.vips.istio_gateway={site_vips['istio_gateway']}"
            )
        features.update(_site_features(c.get("features"), f"{path}: cluster {name} features"))
        clusters.append(replace(cluster, config=replace(config, features=features)))
    if len(globals_) > 1:
        raise InventoryError(f"{path}: more than one global cluster ({', '.join(globals_)})")
    return Site(tuple(clusters), bootstrap, site_vips, source=path)


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
