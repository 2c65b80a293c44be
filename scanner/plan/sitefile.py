"""The site file (docs/site-file.md): a whole DCE 5.0 installation in one file, the bootstrap
node, the global service cluster and the worker clusters, each from its own inventory.

Relative paths are resolved from the site file's folder; unknown keys are errors, so a typo does
not silently drop a cluster. Variables per cluster, lowest first: the cluster inventory's own
(Ansible's sources and precedence, scanner.plan.ansible_vars), the site's ``vars``, the cluster's
``vars``, the command's ``--vars``; then the cluster's explicit ``cni`` and ``features``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from scanner.catalog.loader import FEATURES  # the catalog's feature words: one list
from scanner.core.model import Cluster, Host, Setting, Site
from scanner.errors import InventoryError
from scanner.plan import kubean
from scanner.plan.ansible_vars import CliVars, role_groups
from scanner.plan.clusters import cluster_of, inventory_hosts, quick_hosts
from scanner.plan.sources import SiteDoc, read_inventory_file

# --------------------------------------------------------------------------- the site file

_SITE_KEYS = ("name", "version", "bootstrap", "vips", "vars", "clusters")
_CLUSTER_KEYS = ("name", "kind", "inventory", "hosts", "role", "vars", "vips", "cni", "features")
_SITE_VIPS = ("istio_gateway", "insight", "registry")
_CLUSTER_VIPS = ("kube_api",)


def _load_vars(files: Sequence[str]) -> list[kubean.VarsLayer]:
    out: list[kubean.VarsLayer] = []
    for f in files:
        out.extend(kubean.load_vars_file(f))
    return out


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
    """The files a site file names, resolved from its folder; a missing one is an error that
    names the site file, the key, the path as written and the full path looked at."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for v in items:
        p = os.path.normpath(os.path.join(base, _str(v, where)))
        if not os.path.exists(p):
            raise InventoryError(
                f"{where}: {v}: no such file: {os.path.abspath(p)} (paths in a site file are "
                "relative to its folder)"
            )
        out.append(p)
    return out


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


def site_from_doc(doc: SiteDoc, cli: CliVars) -> Site:
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
            if isinstance(read, SiteDoc):
                raise InventoryError(
                    f"{where}: inventory {inv_path[0]} is a site file, not an inventory"
                )
            if len(read) != 1:
                raise InventoryError(
                    f"{where}: inventory {inv_path[0]} holds {len(read)} clusters; use one per site cluster"
                )
            src = read[0]
            cluster_cli = CliVars(
                [
                    *site_layers,
                    *_load_vars(_paths(c.get("vars"), base, f"{where}.vars")),
                    *cli.items,
                ]
            )
            per_host = src.host_layers(cluster_cli)
            hosts = inventory_hosts(src.inventory, name, kind == "global", per_host)
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
            cluster_cli = CliVars(
                [
                    *site_layers,
                    *_load_vars(_paths(c.get("vars"), base, f"{where}.vars")),
                    *cli.items,
                ]
            )
            per_host = {h.name: cluster_cli.layers(role_groups(h.roles)) for h in hosts}
        cluster = cluster_of(
            name,
            kind,
            hosts,
            per_host,
            _vips(c.get("vips"), _CLUSTER_VIPS, f"{where}.vips"),
            where,
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
