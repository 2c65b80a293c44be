"""Ansible inventory files, parsed (pure): the YAML form (``all.hosts.<name>``, groups with
``hosts`` / ``children`` / ``vars``) and the INI form (``[group]``, ``[group:children]``,
``[group:vars]``, ``host key=value``), and the JSON ``ansible-inventory --list`` prints (groups
with ``hosts`` / ``children`` lists, every host's resolved variables in ``_meta.hostvars``) -> an
``Inventory`` of groups, hosts and their variables.
What the groups mean to a cluster (roles, addresses, sites) is scanner.plan.inventory's business.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from scanner.errors import InventoryError
from scanner.plan import kubean, yamldocs
from scanner.plan.kubean import VarsLayer

CONTROL_PLANE_GROUPS = ("kube_control_plane", "kube-master")
NODE_GROUPS = ("kube_node", "kube-node")
CLUSTER_GROUPS = ("k8s_cluster", "k8s-cluster")
# Groups kubespray knows: a reference to one of these that is never defined is an empty group,
# any other undefined child is a typo worth an error.
KNOWN_GROUPS = frozenset(
    ("all", "ungrouped", "etcd", "calico_rr", "bastion", "kube_control_plane", "kube-master")
    + NODE_GROUPS
    + CLUSTER_GROUPS
)
MAX_EXPANDED_HOSTS = 100_000  # a host pattern like node[1:100000] is the most we expand

_SECTION = re.compile(r"\[([^\[\]\s]+)\]\s*(?:[#;].*)?\Z")
_RANGE = re.compile(r"\[([0-9a-zA-Z]+):([0-9a-zA-Z]+)(?::([0-9]+))?\]")
_GROUP_NAME = re.compile(r"[A-Za-z0-9_.-]+\Z")


# --------------------------------------------------------------------------- parsed inventory


@dataclass
class _Group:
    hosts: list[str] = field(default_factory=list)
    children: list[str] = field(default_factory=list)
    vars: dict[str, Any] = field(default_factory=dict)
    defined: bool = False  # had a body somewhere (a bare reference does not define a group)
    members: set[str] = field(default_factory=set, repr=False)  # = set(hosts), for O(1) adds


@dataclass
class Inventory:
    """An Ansible inventory as read, before roles: host vars, groups, and where it came from."""

    where: str
    hostvars: dict[str, dict[str, Any]] = field(default_factory=dict)
    groups: dict[str, _Group] = field(default_factory=dict)
    # "group NAME" / "host NAME" -> the file that set its variables, when several were merged
    origins: dict[str, str] = field(default_factory=dict)

    def group(self, name: str) -> _Group:
        g = self.groups.get(name)
        if g is None:
            g = self.groups[name] = _Group()
        return g

    def add_host(self, group: str, name: str, hvars: Mapping[str, Any] | None) -> None:
        self.hostvars.setdefault(name, {}).update(hvars or {})
        g = self.group(group)
        if name not in g.members:
            g.members.add(name)
            g.hosts.append(name)

    def members(self, names: Iterable[str]) -> set[str]:
        """Hosts of the groups ``names`` and of their children, cycle-safe."""
        out: set[str] = set()
        seen: set[str] = set()
        stack = [n for n in names if n in self.groups]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            g = self.groups[n]
            out.update(g.hosts)
            stack.extend(c for c in g.children if c in self.groups)
        return out

    def vars_layers(self) -> list[VarsLayer]:
        """Group vars from all down to the leaves (children override parents), as vars layers."""
        order: list[str] = []
        seen: set[str] = set()
        queue = ["all"] + [n for n in self.groups if n != "all"]
        # breadth first from "all", then any group not reachable from it
        frontier = ["all"]
        while frontier:
            nxt: list[str] = []
            for n in frontier:
                if n in seen or n not in self.groups:
                    continue
                seen.add(n)
                order.append(n)
                nxt.extend(self.groups[n].children)
            frontier = nxt
        order.extend(n for n in queue if n not in seen)
        return [
            VarsLayer(f"{self.where} [{n} vars]", self.groups[n].vars)
            for n in order
            if n in self.groups and self.groups[n].vars
        ]

    def merge(self, other: Inventory) -> None:
        """Add another source of the same inventory (a folder's files), as Ansible merges them."""
        for h, hv in other.hostvars.items():
            self.hostvars.setdefault(h, {}).update(hv)
            if hv:
                self.origins[f"host {h}"] = other.where
        for name, g in other.groups.items():
            if g.vars:
                self.origins[f"group {name}"] = other.where
            mine = self.group(name)
            mine.defined = mine.defined or g.defined
            for h in g.hosts:
                if h not in mine.members:
                    mine.members.add(h)
                    mine.hosts.append(h)
            mine.children.extend(c for c in g.children if c not in mine.children)
            mine.vars.update(g.vars)

    def check_children(self) -> None:
        for name, g in self.groups.items():
            for c in g.children:
                child = self.groups.get(c)
                if (child is None or not child.defined) and c not in KNOWN_GROUPS:
                    raise InventoryError(
                        f"{self.where}: group {name} references unknown child group {c}"
                    )


def expand_pattern(name: str, where: str) -> list[str]:
    """Ansible host ranges: node[01:03] -> node01, node02, node03; [a:c] letters; [1:9:2] step."""
    m = _RANGE.search(name)
    if m is None:
        return [name]
    lo, hi, step = m.group(1), m.group(2), int(m.group(3) or 1)
    if step < 1:
        raise InventoryError(f"{where}: host pattern {name}: step must be at least 1")
    if lo.isdigit() and hi.isdigit():
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        a, b = int(lo), int(hi)
        if a > b or (b - a) // step + 1 > MAX_EXPANDED_HOSTS:
            raise InventoryError(f"{where}: host pattern {name}: bad or too large range")
        items = [str(i).zfill(width) for i in range(a, b + 1, step)]
    elif len(lo) == 1 and len(hi) == 1 and lo.isalpha() and hi.isalpha() and lo <= hi:
        items = [chr(i) for i in range(ord(lo), ord(hi) + 1, step)]
    else:
        raise InventoryError(f"{where}: host pattern {name}: bad range [{m.group(0)[1:-1]}]")
    out: list[str] = []
    for item in items:
        for rest in expand_pattern(name[m.end() :], where):
            out.append(name[: m.start()] + item + rest)
            if len(out) > MAX_EXPANDED_HOSTS:
                raise InventoryError(f"{where}: host pattern {name}: too many hosts")
    return out


def _host_name(key: Any, where: str) -> str:
    if isinstance(key, bool) or not isinstance(key, (str, int)) or not str(key).strip():
        raise InventoryError(f"{where}: host name {key!r} is not a name")
    name = str(key).strip()
    if any(c.isspace() for c in name):
        raise InventoryError(f"{where}: host name {name!r} contains spaces")
    return name


def parse_yaml_inventory(data: Any, where: str) -> Inventory:
    """An Ansible YAML inventory: top-level groups (usually just ``all``) with hosts/children/vars."""
    if not isinstance(data, dict):
        raise InventoryError(f"{where}: not an inventory (expected a mapping with all: hosts:)")
    inv = Inventory(where)
    inv.group("all").defined = True

    done: set[tuple[str, int]] = set()
    active: set[int] = set()

    def walk(name: Any, body: Any, depth: int) -> None:
        if not isinstance(name, str) or not _GROUP_NAME.match(name):
            raise InventoryError(f"{where}: bad group name {name!r}")
        if depth > 64:
            raise InventoryError(f"{where}: groups nested deeper than 64 levels at {name}")
        g = inv.group(name)
        if body is None:
            return
        if not isinstance(body, dict):
            raise InventoryError(
                f"{where}: group {name}: expected hosts/children/vars, got {type(body).__name__}"
            )
        # YAML aliases can share one body between groups, or nest a group in itself
        if id(body) in active:
            raise InventoryError(f"{where}: group {name} contains itself (a YAML alias cycle)")
        if (name, id(body)) in done:
            return
        done.add((name, id(body)))
        g.defined = True
        for key in body:
            if key not in ("hosts", "children", "vars"):
                raise InventoryError(
                    f"{where}: group {name}: unexpected key {key!r} (expected hosts, children, vars)"
                )
        hosts = body.get("hosts")
        if hosts is not None:
            if not isinstance(hosts, dict):
                raise InventoryError(
                    f"{where}: group {name}: hosts must be a mapping of host names"
                )
            for key, hvars in hosts.items():
                hname = _host_name(key, f"{where}: group {name}")
                if hvars is not None and not isinstance(hvars, dict):
                    raise InventoryError(f"{where}: host {hname}: variables must be a mapping")
                for h in expand_pattern(hname, where):
                    inv.add_host(name, h, hvars)
        gvars = body.get("vars")
        if gvars is not None:
            g.vars.update(kubean.vars_mapping(gvars, f"{where}: group {name} vars"))
        children = body.get("children")
        if children is not None:
            if not isinstance(children, dict):
                raise InventoryError(f"{where}: group {name}: children must be a mapping of groups")
            for child, cbody in children.items():
                if isinstance(child, str) and child not in g.children:
                    g.children.append(child)
                active.add(id(body))
                walk(child, cbody, depth + 1)
                active.discard(id(body))

    for name, body in data.items():
        walk(name, body, 0)
        if name != "all" and name not in inv.groups["all"].children:
            inv.groups["all"].children.append(name)
    inv.check_children()
    return inv


def _ini_value(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def parse_ini_inventory(text: str, where: str) -> Inventory:
    """The INI form: host lines with key=value vars, [group], [group:children], [group:vars]."""
    inv = Inventory(where)
    inv.group("all").defined = True
    section, kind = "ungrouped", "hosts"
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s[0] in "#;":
            continue
        m = _SECTION.match(s)
        if m:
            name, _, kind = m.group(1).partition(":")
            kind = kind or "hosts"
            if kind not in ("hosts", "children", "vars") or not _GROUP_NAME.match(name):
                raise InventoryError(f"{where}: line {n}: bad section [{m.group(1)}]")
            section = name
            inv.group(section).defined = True
            if section != "all" and section not in inv.groups["all"].children:
                inv.groups["all"].children.append(section)
            continue
        if s.startswith("["):
            raise InventoryError(f"{where}: line {n}: bad section header {s!r}")
        if kind == "vars":
            key, eq, value = s.partition("=")
            if not eq or not key.strip():
                raise InventoryError(f"{where}: line {n}: expected key=value in [{section}:vars]")
            inv.group(section).vars[key.strip()] = _ini_value(value)
        elif kind == "children":
            child = s.split()[0]
            if not _GROUP_NAME.match(child):
                raise InventoryError(f"{where}: line {n}: bad group name {child!r}")
            g = inv.group(section)
            if child not in g.children:
                g.children.append(child)
            inv.group(child)
        else:
            try:
                tokens = shlex.split(s, comments=True)
            except ValueError as e:
                raise InventoryError(f"{where}: line {n}: {e}") from None
            if not tokens:
                continue
            hvars: dict[str, Any] = {}
            for tok in tokens[1:]:
                key, eq, value = tok.partition("=")
                if not eq or not key:
                    raise InventoryError(f"{where}: line {n}: expected key=value, got {tok!r}")
                hvars[key] = value
            for h in expand_pattern(
                _host_name(tokens[0], f"{where}: line {n}"), f"{where}: line {n}"
            ):
                inv.add_host(section, h, hvars)
    inv.check_children()
    return inv


def looks_like_ini(text: str) -> bool:
    for line in text.splitlines():
        s = line.strip()
        if not s or s[0] in "#;" or s == "---":
            continue
        return bool(_SECTION.match(s))
    return False


def parse_inventory_text(text: str, where: str) -> Inventory:
    """An inventory's text, YAML or INI (detected by content)."""
    if looks_like_ini(text):
        return parse_ini_inventory(text, where)
    docs = [d for d in yamldocs.load_yaml_documents(text, where) if d is not None]
    if not docs:
        raise InventoryError(f"{where}: empty inventory")
    if len(docs) == 1 and isinstance(docs[0], str) and "=" in docs[0]:
        return parse_ini_inventory(text, where)  # section-less INI reads as one YAML string
    if len(docs) > 1:
        raise InventoryError(f"{where}: several YAML documents in one inventory")
    return parse_yaml_inventory(docs[0], where)


# --------------------------------------------------------------------------- ansible-inventory --list


def looks_like_ansible_json(doc: Any) -> bool:
    """``ansible-inventory --list`` output: ``_meta``, or ``all.children`` as a list (a YAML
    inventory has mappings there)."""
    if not isinstance(doc, dict):
        return False
    top = doc.get("all")
    return "_meta" in doc or (isinstance(top, dict) and isinstance(top.get("children"), list))


def parse_ansible_json(doc: dict[str, Any], where: str) -> Inventory:
    """The JSON of ``ansible-inventory -i SOURCES --list``: groups with ``hosts`` / ``children``
    lists (and ``vars`` with ``--export``), every host's variables in ``_meta.hostvars``."""
    meta = doc.get("_meta")
    hostvars = meta.get("hostvars") if isinstance(meta, dict) else None
    if not isinstance(hostvars, dict):
        raise InventoryError(
            f"{where}: ansible-inventory output without _meta.hostvars"
            " (write it with `ansible-inventory -i INVENTORY --list`)"
        )
    inv = Inventory(where)
    inv.group("all").defined = True
    for name, body in doc.items():
        if name == "_meta":
            continue
        if not isinstance(name, str) or not _GROUP_NAME.match(name):
            raise InventoryError(f"{where}: bad group name {name!r}")
        if not isinstance(body, dict):
            raise InventoryError(f"{where}: group {name}: expected hosts/children/vars")
        g = inv.group(name)
        g.defined = True
        for key in body:
            if key not in ("hosts", "children", "vars"):
                raise InventoryError(f"{where}: group {name}: unexpected key {key!r}")
        for key in ("hosts", "children"):
            if not isinstance(body.get(key, []), list):
                raise InventoryError(f"{where}: group {name}: {key} must be a list")
        for h in body.get("hosts", []):
            inv.add_host(name, _host_name(h, f"{where}: group {name}"), None)
        for c in body.get("children", []):
            if not isinstance(c, str) or not _GROUP_NAME.match(c):
                raise InventoryError(f"{where}: group {name}: bad child group {c!r}")
            if c not in g.children:
                g.children.append(c)
            inv.group(c)
        g.vars.update(kubean.vars_mapping(body.get("vars"), f"{where}: group {name} vars"))
    children = inv.groups["all"].children
    for name in inv.groups:
        if name != "all" and not any(name in g.children for g in inv.groups.values()):
            children.append(name)
    for h, hv in hostvars.items():
        name = _host_name(h, f"{where}: _meta.hostvars")
        inv.hostvars.setdefault(name, {}).update(
            kubean.vars_mapping(hv, f"{where}: _meta.hostvars.{name}")
        )
    grouped = {h for g in inv.groups.values() for h in g.hosts}
    for h in inv.hostvars:
        if h not in grouped:
            inv.add_host("ungrouped", h, None)
    inv.check_children()
    return inv
