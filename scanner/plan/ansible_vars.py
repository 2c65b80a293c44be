"""Ansible's variable sources for an inventory, read as ansible-core reads them.

- ``group_vars/`` and ``host_vars/`` beside an inventory source (the file's folder, or the folder
  given as the inventory). For a group or host NAME the first of ``NAME``, ``NAME.yml``,
  ``NAME.yaml``, ``NAME.json`` that exists is read; when that is a folder, its files (no
  extension, or .yml/.yaml/.json; hidden files and ``~`` backups skipped) load in lexical order,
  sub-folders without an extension recursively (ansible-core's ``DataLoader.find_vars_files``).
- Precedence for one host, lowest first (ansible-core's ``VariableManager.get_vars`` with the
  default precedence): the inventory's own vars of group ``all``; of the host's other groups,
  sorted by (depth, ``ansible_group_priority``, name); ``group_vars/all``; ``group_vars/<group>``
  in the same group order; the inventory's host vars; ``host_vars/<host>``. Then portmesh's:
  ``--vars`` items in the order given. Later wins, one top-level key at a time (Ansible's
  ``hash_behaviour = replace``).
- kubespray's run-time groups (its ``dynamic_groups`` role): ``kube-master``, ``kube-node``,
  ``calico-rr`` join ``kube_control_plane``, ``kube_node``, ``calico_rr``, and ``k8s_cluster`` is
  ``kube_control_plane`` + ``kube_node`` + ``calico_rr``. An inventory that does not define them
  (kubespray's own sample has no ``k8s_cluster`` section) gets them as ``group_by`` makes them:
  groups one level below ``all`` with those hosts (see ``add_kubespray_groups``), so
  ``group_vars/k8s_cluster/*`` reaches the same hosts, in the same precedence, as under kubespray.

Pure but for reading the files named; every problem is one InventoryError naming the file.
"""

from __future__ import annotations

import os
import re
from collections import ChainMap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scanner.errors import InventoryError
from scanner.plan import kubean, yamldocs
from scanner.plan.endpoints import BASE_URLS, LB, LISTS, PRIMARY, PROXIES, SUFFIXES
from scanner.plan.inventory_files import Inventory
from scanner.plan.kubean import VarsLayer

VARS_EXTS = ("", ".yml", ".yaml", ".json")
# ansible-core's INVENTORY_IGNORE_EXTS default (REJECT_EXTS + .orig, .cfg, .retry)
IGNORED_EXTS = (
    ".pyc",
    ".pyo",
    ".swp",
    ".bak",
    "~",
    ".rpm",
    ".md",
    ".txt",
    ".rst",
    ".orig",
    ".cfg",
    ".retry",
)
# kubespray roles/dynamic_groups: group -> the groups whose hosts it gets (in kubespray's order)
KUBESPRAY_GROUPS: dict[str, tuple[str, ...]] = {
    "kube_control_plane": ("kube-master",),
    "kube_node": ("kube-node",),
    "calico_rr": ("calico-rr",),
    "no_floating": ("no-floating",),
    "k8s_cluster": ("kube_node", "kube_control_plane", "calico_rr"),
}
# portmesh roles -> the kubespray groups such a host is in (for --hosts and inline site hosts)
ROLE_GROUPS: dict[str, tuple[str, ...]] = {
    "node": ("k8s_cluster",),
    "control_plane": ("kube_control_plane", "k8s_cluster"),
    "worker": ("kube_node", "k8s_cluster"),
    "etcd": ("etcd",),
    "calico_rr": ("calico_rr", "k8s_cluster"),
}
_GROUP_ORDER = ("etcd", "k8s_cluster", "calico_rr", "kube_control_plane", "kube_node")


def role_groups(roles: Iterable[str]) -> list[str]:
    """The kubespray groups of a host given by roles (--hosts), in Ansible's variable order."""
    gs = {g for r in roles for g in ROLE_GROUPS.get(r, ())}
    return [g for g in _GROUP_ORDER if g in gs]


# --------------------------------------------------------------------------- files


def _dir_files(path: Path) -> list[Path]:
    out: list[Path] = []
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        raise InventoryError(f"{path}: cannot read folder: {e.strerror or e}") from None
    for name in names:
        if name.startswith(".") or name.endswith("~"):
            continue
        full = path / name
        ext = os.path.splitext(name)[1]
        if full.is_dir() and not ext:
            out.extend(_dir_files(full))
        elif full.is_file() and (not ext or ext in VARS_EXTS):
            out.append(full)
    return out


def find_vars_files(folder: Path, name: str, listing: set[str] | None = None) -> list[Path]:
    """The files Ansible reads for group or host ``name`` in ``folder`` (see the docstring).
    ``listing``: the folder's entries, read once by the caller (no stat per missing name)."""
    for ext in VARS_EXTS:
        if listing is not None and name + ext not in listing:
            continue
        p = folder / (name + ext)
        if p.is_dir():
            return _dir_files(p)
        if p.exists():
            return [p]
    return []


def load_vars_path(path: Path) -> VarsLayer:
    """One variables file (YAML or JSON): one layer labelled with its path."""
    text = yamldocs.read_text(path, "vars file")
    return VarsLayer(str(path), kubean.parse_vars_text(text, str(path)))


def _entry_name(name: str) -> str:
    stem, ext = os.path.splitext(name)
    return stem if ext in VARS_EXTS[1:] else name


@dataclass
class VarsDir:
    """A folder's ``group_vars/`` and ``host_vars/`` (files read once, on first use)."""

    base: Path
    group_dir: str = "group_vars"
    _cache: dict[tuple[str, str], list[VarsLayer]] = field(default_factory=dict)
    _listings: dict[str, set[str]] = field(default_factory=dict)

    def _listing(self, folder: Path) -> set[str]:
        key = str(folder)
        got = self._listings.get(key)
        if got is None:
            try:
                got = set(os.listdir(folder)) if folder.is_dir() else set()
            except OSError as e:
                raise InventoryError(f"{folder}: cannot read folder: {e.strerror or e}") from None
            self._listings[key] = got
        return got

    def layers(self, kind: str, name: str) -> list[VarsLayer]:
        key = (kind, name)
        got = self._cache.get(key)
        if got is None:
            folder = self.base / (self.group_dir if kind == "group" else "host_vars")
            listing = self._listing(folder)
            got = (
                [load_vars_path(p) for p in find_vars_files(folder, name, listing)]
                if listing
                else []
            )
            self._cache[key] = got
        return got

    def host_entries(self) -> list[tuple[str, Path]]:
        folder = self.base / "host_vars"
        if not folder.is_dir():
            return []
        return [
            (_entry_name(n), folder / n)
            for n in sorted(os.listdir(folder))
            if not n.startswith(".") and not n.endswith((*IGNORED_EXTS, ".ini"))
        ]

    def check_hosts(self, known: Iterable[str], where: str) -> None:
        names = set(known)
        for host, path in self.host_entries():
            if host not in names:
                raise InventoryError(
                    f"{path}: host_vars for host {host}, which is not in the inventory {where}"
                )


# --------------------------------------------------------------------------- groups


def add_kubespray_groups(inv: Inventory) -> None:
    """kubespray's run-time groups, as its ``dynamic_groups`` role makes them with ``group_by``:
    the hosts of the source groups join the group as hosts of its own (no group becomes another's
    child, so no group's depth changes), and a group the inventory does not define is made one
    level below ``all``, where Ansible sorts it among its siblings by priority and name. So a
    sibling with a higher ``ansible_group_priority`` beats ``kube_node``, and ``k8s_cluster``
    beats ``calico_rr`` by name, as in a kubespray run (tests/test_config_sources.py runs the
    role's task with ansible-playbook as the oracle). One difference remains: kubespray decides
    the five groups in one pass over the groups the inventory gave, so hosts under the old
    names (``kube-node``) reach ``k8s_cluster`` only here."""
    for group, sources in KUBESPRAY_GROUPS.items():
        srcs = [s for s in sources if s in inv.groups and s != group]
        if not srcs:
            continue
        have = inv.members((group,)) if group in inv.groups else set()
        add = inv.members(srcs) - have
        if not add:
            continue
        g = inv.group(group)
        if not g.defined:
            g.defined = True
            if group not in inv.groups["all"].children:
                inv.groups["all"].children.append(group)
        for h in inv.hostvars:  # inventory order
            if h in add:
                g.members.add(h)
                g.hosts.append(h)


def group_order(inv: Inventory) -> dict[str, tuple[int, int, str]]:
    """Sort key per group: (depth below all, ansible_group_priority, name), as Ansible sorts."""
    parents: dict[str, list[str]] = {}
    for name, g in inv.groups.items():
        for c in g.children:
            parents.setdefault(c, []).append(name)
    depth: dict[str, int] = {"all": 0}

    def d(name: str, seen: frozenset[str]) -> int:
        if name in depth:
            return depth[name]
        if name in seen:
            raise InventoryError(f"{inv.where}: group {name} is its own ancestor")
        ps = [p for p in parents.get(name, ()) if p in inv.groups]
        out = max((d(p, seen | {name}) + 1 for p in ps), default=1)
        depth[name] = out
        return out

    keys: dict[str, tuple[int, int, str]] = {}
    for name, g in inv.groups.items():
        prio = g.vars.get("ansible_group_priority", 1)
        try:
            prio = int(prio)
        except (TypeError, ValueError):
            raise InventoryError(
                f"{inv.where}: group {name}: ansible_group_priority {prio!r} is not a number"
            ) from None
        keys[name] = (d(name, frozenset()), prio, name)
    return keys


def host_groups(inv: Inventory) -> dict[str, list[str]]:
    """host -> every group it is in (directly or through children), without all, in Ansible's
    variable order."""
    parents: dict[str, set[str]] = {}
    for name, g in inv.groups.items():
        for c in g.children:
            parents.setdefault(c, set()).add(name)
    up: dict[str, frozenset[str]] = {}

    def ancestors(name: str) -> frozenset[str]:
        got = up.get(name)
        if got is None:
            up[name] = frozenset({name})  # cycle guard
            acc = {name}
            for p in parents.get(name, ()):
                acc |= ancestors(p)
            got = up[name] = frozenset(acc)
        return got

    direct: dict[str, set[str]] = {h: set() for h in inv.hostvars}
    for name, g in inv.groups.items():
        for h in g.hosts:
            direct.setdefault(h, set()).add(name)
    order = group_order(inv)
    cache: dict[frozenset[str], list[str]] = {}
    out: dict[str, list[str]] = {}
    for h, gs in direct.items():
        key = frozenset(gs)
        got = cache.get(key)
        if got is None:
            acc: set[str] = set()
            for g in gs:
                acc |= ancestors(g)
            acc.discard("all")
            got = cache[key] = sorted(acc, key=lambda n: order[n])
        out[h] = got
    return out


# --------------------------------------------------------------------------- per-host layers


@dataclass
class CliVars:
    """``--vars`` items in order: a file (every host) or a group_vars folder (by group)."""

    items: list[VarsLayer | VarsDir] = field(default_factory=list)

    def layers(self, groups: Sequence[str]) -> list[VarsLayer]:
        out: list[VarsLayer] = []
        for item in self.items:
            if isinstance(item, VarsLayer):
                out.append(item)
            else:
                for g in ("all", *groups):
                    out.extend(item.layers("group", g))
        return out


def host_layers(
    inv: Inventory, dirs: Sequence[VarsDir], cli: CliVars, extra: Sequence[VarsLayer] = ()
) -> dict[str, list[VarsLayer]]:
    """Every host's variable layers in Ansible's precedence (lowest first), then ``extra``
    (e.g. a Kubean vars ConfigMap) and the --vars items."""
    for d in dirs:
        d.check_hosts(inv.hostvars, inv.where)
    groups = host_groups(inv)

    def inv_group(g: str) -> list[VarsLayer]:
        v = inv.groups[g].vars if g in inv.groups else {}
        where = inv.origins.get(f"group {g}", inv.where)
        return [VarsLayer(f"{where} [{g} vars]", v)] if v else []

    cache: dict[tuple[str, ...], list[VarsLayer]] = {}
    out: dict[str, list[VarsLayer]] = {}
    for h, gs in groups.items():
        key = tuple(gs)
        shared = cache.get(key)
        if shared is None:
            shared = [*inv_group("all")]
            for g in gs:
                shared += inv_group(g)
            for d in dirs:
                shared += d.layers("group", "all")
            for d in dirs:
                for g in gs:
                    shared += d.layers("group", g)
            cache[key] = shared
        own: list[VarsLayer] = []
        hv = inv.hostvars.get(h)
        if hv:
            own.append(VarsLayer(f"{inv.origins.get(f'host {h}', inv.where)} [host {h}]", hv))
        for d in dirs:
            own += d.layers("host", h)
        out[h] = [*shared, *own, *extra, *cli.layers(gs)]
    return out


def chain(layers: Sequence[VarsLayer]) -> ChainMap[str, Any]:
    """A read-only merged view of ``layers`` (later wins) without copying them."""
    return ChainMap(*[layer.values for layer in reversed(layers)])  # type: ignore[arg-type]


def origin(layers: Sequence[VarsLayer], name: str) -> str:
    for layer in reversed(layers):
        if name in layer.values:
            return layer.label
    return kubean.DEFAULT


# Every cluster-wide variable the planner follows, in one place: the names, and the endpoint
# families by suffix (scanner.plan.endpoints). With clusters.PLAN_HOST_VARS, the per-host ones,
# these are what the Ansible playbook (scanner/ansible/portmesh.yml) passes from every host to
# every host's plan; tests/test_ansible.py checks the playbook's copy against these.
PLAN_VARS: tuple[str, ...] = tuple(
    dict.fromkeys((*kubean.KNOWN_VARS, LB, *PRIMARY, *BASE_URLS, *LISTS, *PROXIES))
)
PLAN_VAR_SUFFIXES: tuple[str, ...] = SUFFIXES


def is_plan_var(name: str) -> bool:
    """Does this cluster-wide variable decide the plan (KNOWN_VARS and the endpoint families)?"""
    return name in PLAN_VARS or name.endswith(PLAN_VAR_SUFFIXES)


def deciding_names(layers: Iterable[VarsLayer]) -> list[str]:
    """The variables that decide a cluster's plan, among those these layers set."""
    names = set(kubean.KNOWN_VARS) | {LB}
    for layer in layers:
        names.update(n for n in layer.values if is_plan_var(n))
    return sorted(names)


def cluster_layers(
    hosts: Sequence[Any], per_host: Mapping[str, Sequence[VarsLayer]], where: str
) -> list[VarsLayer]:
    """The layers that decide a cluster's plan: one node's, once every node agrees.

    portmesh plans one configuration per cluster. A variable that decides the plan (CNI, Calico
    modes, ports, VIPs, registry and download hosts) with different values on two nodes of one
    cluster (say ``kube_network_plugin`` in one host_vars file) is an error naming both hosts and
    files, not a guess. Hosts that are not nodes (an etcd-only host) are not compared: kubespray
    reads these variables on the Kubernetes nodes.
    """
    nodes = [h for h in hosts if not h.roles.isdisjoint({"node", "control_plane", "worker"})]
    ref_hosts = nodes or list(hosts)
    if not ref_hosts:
        return []
    first = ref_hosts[0]
    ref_layers = list(per_host[first.name])
    if len(ref_hosts) == 1:
        return ref_layers
    seen: set[int] = set()
    all_layers: list[VarsLayer] = []
    for h in ref_hosts:
        for layer in per_host[h.name]:
            if id(layer) not in seen:
                seen.add(id(layer))
                all_layers.append(layer)
    names = deciding_names(all_layers)
    # a layer that sets none of these names (nor a name their templates refer to) cannot change
    # the decision: hosts that differ only in such layers (ansible_host, ip) are decided once
    sensitive = _referenced(all_layers, names)
    quiet: dict[int, bool] = {id(x): sensitive.isdisjoint(x.values) for x in all_layers}
    ref = _decided(ref_layers, names)
    by_signature: dict[tuple[int, ...], dict[str, Any]] = {}
    for h in ref_hosts[1:]:
        layers = per_host[h.name]
        key = tuple(id(x) for x in layers if not quiet[id(x)])
        got = by_signature.get(key)
        if got is None:
            got = by_signature[key] = _decided(layers, names)
        if got == ref:
            continue
        differ = [n for n in names if got.get(n) != ref.get(n)]
        # blame a variable set differently, not one whose template merely refers to it
        # (kube_image_repo: "{{ registry_host }}" differs when registry_host does)
        ref_raw, raw = chain(ref_layers), chain(layers)
        written = [n for n in differ if ref_raw.get(n) != raw.get(n)]
        if written:
            n, a, b = written[0], ref, got
        else:
            base = sorted(
                r for r in _referenced(layers, differ) if ref_raw.get(r) != raw.get(r)
            )
            if base:
                n = base[0]
                a = {n: _scalar(ref_raw[n])} if n in ref_raw else {}
                b = {n: _scalar(raw[n])} if n in raw else {}
            else:
                n, a, b = differ[0], ref, got
        raise InventoryError(
            f"{where}: variable {n} is {_said(a, n)} on {first.name} ({origin(ref_layers, n)})"
            f" but {_said(b, n)} on {h.name} ({origin(layers, n)}); portmesh plans one"
            " configuration per cluster: set it for all nodes (group_vars/k8s_cluster)"
            " or give these hosts as a cluster of their own"
        )
    return ref_layers


def _said(values: Mapping[str, Any], name: str) -> str:
    return repr(values[name]) if name in values else "unset"


_REF = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)")


def _referenced(layers: Sequence[VarsLayer], names: Iterable[str]) -> set[str]:
    """``names`` and every variable their values' templates refer to, transitively."""
    out = set(names)
    frontier = set(out)
    while frontier:
        new: set[str] = set()
        for layer in layers:
            for n in layer.values.keys() & frontier:
                v = layer.values[n]
                if isinstance(v, str) and "{{" in v:
                    new.update(r for r in _REF.findall(v) if r not in out)
        out |= new
        frontier = new
    return out


def _scalar(v: Any) -> Any:
    """INI text and YAML values compare alike ("6443" == 6443, "True" == true)."""
    if isinstance(v, (bool, int, float, str)):
        return str(v).strip().lower()
    return v


def _decided(layers: Sequence[VarsLayer], names: Sequence[str]) -> dict[str, Any]:
    view = chain(layers)
    values, bad = kubean.resolve_templates(view, names)
    out = {n: _scalar(values[n]) for n in names if n in values and values[n] is not None}
    out.update({n: f"unresolved {raw}" for n, raw in bad.items()})
    return out
