"""What one ``--inventory`` or ``--vars`` argument holds, read from disk (the only I/O of the plan).

An ``--inventory`` is a file or a folder:

- a file: an Ansible inventory (YAML, INI, or the JSON of ``ansible-inventory --list``), Kubean
  ConfigMaps (with ``Cluster`` resources pairing them), or a site file. Beside a YAML or INI
  inventory, its folder's ``group_vars/`` and ``host_vars/`` are read as Ansible reads them
  (scanner.plan.ansible_vars); beside ``ansible-inventory`` JSON they are not, since Ansible
  already merged them into ``_meta.hostvars``.
- a folder: every inventory file in it, as Ansible reads a folder (sorted, sub-folders too;
  hidden entries, ``group_vars``, ``host_vars`` and Ansible's ignored extensions such as
  ``.md``, ``.txt``, ``.cfg``, ``.retry`` skipped), merged into one cluster named after the
  folder, plus the folder's own ``group_vars/`` and ``host_vars/``. Ansible warns about a file it
  cannot parse and goes on; portmesh stops with the file's name, so nothing is left out silently.
  Executable files (dynamic inventory scripts) are not run: feed their result through
  ``ansible-inventory -i FOLDER --list``.

A ``--vars`` is a vars file (YAML/JSON, or ConfigMaps with ``data["group_vars.yml"]``), a
``group_vars`` folder (entries named after groups, applied to the hosts of those groups as
Ansible applies them), or another folder, whose files apply to every host in lexical order. A
folder holding ``group_vars/`` or ``host_vars/`` (an inventory folder) is refused: its host_vars
would otherwise apply to every host.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from scanner.errors import InventoryError, warn
from scanner.plan import kubean, yamldocs
from scanner.plan.ansible_vars import (
    IGNORED_EXTS,
    CliVars,
    VarsDir,
    add_kubespray_groups,
    host_layers,
    load_vars_path,
)
from scanner.plan.ansible_vars import _dir_files as vars_dir_files
from scanner.plan.inventory_files import (
    Inventory,
    looks_like_ansible_json,
    looks_like_ini,
    parse_ansible_json,
    parse_ini_inventory,
    parse_inventory_text,
    parse_yaml_inventory,
)
from scanner.plan.kubean import VarsLayer

IGNORED_NAMES = ("group_vars", "host_vars", "vars_plugins")


@dataclass
class ClusterSource:
    """One cluster read from an --inventory: its inventory and where its variables come from."""

    name: str
    inventory: Inventory
    dirs: list[VarsDir] = field(default_factory=list)  # group_vars/ + host_vars/ beside it
    extra: list[VarsLayer] = field(default_factory=list)  # vars ConfigMaps of the same file

    def __post_init__(self) -> None:
        add_kubespray_groups(self.inventory)

    def host_layers(self, cli: CliVars) -> dict[str, list[VarsLayer]]:
        return host_layers(self.inventory, self.dirs, cli, self.extra)


@dataclass
class SiteDoc:
    path: str
    body: dict[str, Any]


def _strip_suffix(name: str) -> str:
    for suffix in ("-hosts-conf", "-hosts", "-inventory"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _from_configmaps(docs: list[Any], path: str) -> list[ClusterSource]:
    objects = list(yamldocs.kubernetes_objects(docs, path))
    cms = [yamldocs.configmap(o, path) for o in objects if o.get("kind") == "ConfigMap"]
    by_name = {c.name: c for c in cms}
    hosts_cms = [c for c in cms if kubean.HOSTS_KEY in c.data]
    vars_cms = [c for c in cms if kubean.VARS_KEY in c.data]
    clusters = [o for o in objects if o.get("kind") == "Cluster"]

    def source(name: str, hcm: yamldocs.ConfigMap, vcms: list[yamldocs.ConfigMap]) -> ClusterSource:
        inv = parse_inventory_text(hcm.data[kubean.HOSTS_KEY], f"{hcm.where} {kubean.HOSTS_KEY}")
        layers = [
            VarsLayer(
                v.where,
                kubean.parse_vars_text(v.data[kubean.VARS_KEY], f"{v.where} {kubean.VARS_KEY}"),
            )
            for v in vcms
        ]
        return ClusterSource(name, inv, [], layers)

    if clusters:  # Kubean Cluster resources pair the hosts and vars ConfigMaps by name
        out = []
        for c in clusters:
            cname = yamldocs.object_name(c)
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


def _documents(text: str, path: str) -> list[Any]:
    """The YAML documents of a file; JSON (ansible-inventory output can be large) via orjson."""
    if text.lstrip().startswith("{"):
        try:
            return [orjson.loads(text)]
        except orjson.JSONDecodeError:
            pass  # YAML flow style, or broken: the YAML loader says where
    return [d for d in yamldocs.load_yaml_documents(text, path) if d is not None]


def _ansible_file(path: str, text: str, docs: list[Any] | None) -> Inventory:
    """An Ansible inventory file (INI, YAML, or ansible-inventory JSON), or an error."""
    if looks_like_ini(text):
        return parse_ini_inventory(text, path)
    if docs is None:
        docs = _documents(text, path)
    if not docs:
        raise InventoryError(f"{path}: empty inventory")
    first = docs[0]
    if len(docs) == 1 and isinstance(first, str) and "=" in first:
        return parse_ini_inventory(text, path)
    if len(docs) > 1:
        raise InventoryError(f"{path}: several YAML documents, but none is a Kubernetes object")
    if looks_like_ansible_json(first):
        return parse_ansible_json(first, path)
    if isinstance(first, dict) and isinstance(first.get("plugin"), str):
        raise InventoryError(
            f"{path}: an inventory plugin configuration (plugin: {first['plugin']}); portmesh"
            " runs no plugins: give it the output of `ansible-inventory -i INVENTORY --list`"
        )
    return parse_yaml_inventory(first, path)


def read_inventory_file(path: str) -> list[ClusterSource] | SiteDoc:
    """Read one --inventory: the clusters it defines, or the site file it is."""
    if os.path.isdir(path):
        return [read_inventory_dir(path)]
    text = yamldocs.read_text(path, "inventory")
    stem = Path(path).stem or "cluster"
    beside = [VarsDir(Path(path).parent)]
    if looks_like_ini(text):
        return [ClusterSource(stem, parse_ini_inventory(text, path), beside)]
    docs = _documents(text, path)
    if not docs:
        raise InventoryError(f"{path}: empty inventory")
    if any(yamldocs.is_kubernetes_object(d) for d in docs):
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
        return SiteDoc(path, body)
    inv = _ansible_file(path, text, docs)
    if len(docs) == 1 and looks_like_ansible_json(first):
        beside = []  # ansible-inventory already merged group_vars/host_vars into _meta.hostvars
        _check_json_groups(inv, path)
    return [ClusterSource(stem, inv, beside)]


def _check_json_groups(inv: Inventory, path: str) -> None:
    """ansible-inventory applies group_vars/k8s_cluster only when the inventory defines that
    group; kubespray's own sample does not (kubespray adds it at run time), so such JSON lacks
    those variables. portmesh cannot get them back: it says so."""
    groups = {n for n, g in inv.groups.items() if g.defined and (g.hosts or g.children)}
    if groups & {"kube_control_plane", "kube_node", "kube-master", "kube-node"} and not groups & {
        "k8s_cluster",
        "k8s-cluster",
    }:
        warn(
            f"{path}: ansible-inventory JSON without a k8s_cluster group, so it holds no"
            " group_vars/k8s_cluster/ variables (kubespray adds that group only at run time); give"
            " portmesh the inventory folder, or add [k8s_cluster:children] kube_control_plane"
            " kube_node calico_rr to the inventory before running ansible-inventory"
        )


def _inventory_files(folder: Path) -> list[Path]:
    out: list[Path] = []
    try:
        names = sorted(os.listdir(folder))
    except OSError as e:
        raise InventoryError(f"{folder}: cannot read inventory folder: {e.strerror or e}") from None
    for name in names:
        if name.startswith(".") or name in IGNORED_NAMES or name.endswith(IGNORED_EXTS):
            continue
        p = folder / name
        if p.is_dir():
            out.extend(_inventory_files(p))
        elif p.is_file():
            out.append(p)
    return out


def read_inventory_dir(path: str) -> ClusterSource:
    """Every inventory file of a folder as one inventory, with the folder's group/host vars."""
    folder = Path(path)
    files = _inventory_files(folder)
    if not files:
        raise InventoryError(f"{path}: no inventory file in this folder")
    merged = Inventory(path)
    merged.group("all").defined = True
    for f in files:
        p = str(f)
        if os.access(f, os.X_OK):
            raise InventoryError(
                f"{p}: an executable file (a dynamic inventory script?); portmesh runs no scripts:"
                f" give the output of `ansible-inventory -i {path} --list` instead"
            )
        text = yamldocs.read_text(p, "inventory")
        docs = None
        if not looks_like_ini(text):
            docs = _documents(text, p)
            if any(yamldocs.is_kubernetes_object(d) for d in docs) or any(
                isinstance(d, dict) and ("portmesh_site" in d or "site" in d) for d in docs
            ):
                raise InventoryError(
                    f"{p}: Kubean ConfigMaps and site files are given as files, not inside an"
                    " inventory folder"
                )
        merged.merge(_ansible_file(p, text, docs))
    name = folder.resolve().name or "cluster"
    return ClusterSource(name, merged, [VarsDir(folder)])


def load_cli_vars(paths: list[str]) -> CliVars:
    """--vars items in order (see the module docstring)."""
    cli = CliVars()
    for p in paths:
        path = Path(p)
        if path.is_dir():
            names = [n for n in os.listdir(path) if not n.startswith(".")]
            entries = {Path(n).stem for n in names}
            if path.name == "host_vars" or "host_vars" in names or (
                path.name != "group_vars" and "group_vars" in names
            ):
                raise InventoryError(
                    f"{p}: --vars takes a vars file or a group_vars folder, and this is an"
                    " inventory folder (group_vars/, host_vars/): give it as --inventory, or"
                    " give its group_vars/ as --vars"
                )
            if path.name == "group_vars" or "all" in entries:
                cli.items.append(VarsDir(path.parent, path.name))
            else:
                files = vars_dir_files(path)
                if not files:
                    raise InventoryError(f"{p}: no vars file (.yml, .yaml, .json) in this folder")
                cli.items.extend(load_vars_path(f) for f in files)
        else:
            cli.items.extend(kubean.load_vars_file(p))
    return cli
