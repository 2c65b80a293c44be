"""Load and validate catalog files (the format is documented in scanner/catalog/__init__.py)."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from scanner.core.flows import PROTOS
from scanner.core.model import CLUSTER_KINDS, ROLES
from scanner.core.ports import parse_ports
from scanner.errors import CatalogError, InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

PACKAGED = "requirements.toml"

# Placeholders a ports string may hold, with a representative value used to validate the spec.
PORT_VARS: dict[str, str] = {
    "nodeport_range": "30000-32767",
    "apiserver_port": "6443",
    "registry_port": "443",
    "minio_port": "9000",
}

FEATURES = (
    "vxlan",
    "ipip",
    "bgp",
    "typha",
    "wireguard",
    "wireguard6",
    "metallb",
    "kube-vip",
    "istio",
    "insight",
    "deploy",
)

# kubespray's kube_network_plugin values, plus spiderpool (an optional CNI in DCE 5.0).
KNOWN_CNIS = (
    "calico",
    "cilium",
    "spiderpool",
    "flannel",
    "kube-ovn",
    "kube-router",
    "macvlan",
    "custom_cni",
    "cni",
    "none",
)

_ID = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_WORD = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::([^}]*))?\}")

_FIELDS = {
    "id",
    "section",
    "component",
    "proto",
    "ports",
    "description",
    "dst_role",
    "dst_fallback",
    "src_roles",
    "src_scope",
    "condition",
    "sample",
    "reference",
    "note",
    "disabled",
}
_REQUIRED = ("id", "component", "proto", "description", "dst_role", "src_roles")
_COND_KEYS = {"cni", "feature", "cluster"}
_DST_ROLES = tuple(r for r in ROLES if r != "scanner")
_SRC_ROLES = tuple(r for r in ROLES if not r.startswith("vip:"))
_PORTLESS = ("icmp", "ipip")


@dataclass(frozen=True, slots=True)
class Condition:
    """When a requirement applies: cni any-of, features all-of, cluster kind any-of."""

    cni: tuple[str, ...] = ()
    features: tuple[str, ...] = ()
    cluster: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any] | None:
        out: dict[str, Any] = {}
        for key, vals in (("cni", self.cni), ("feature", self.features), ("cluster", self.cluster)):
            if vals:
                out[key] = vals[0] if len(vals) == 1 else list(vals)
        return out or None

    def text(self) -> str:
        """Short form for tables: ``cni=calico feature=vxlan``; lists as a|b (any) or a+b (all)."""
        parts = []
        if self.cni:
            parts.append("cni=" + "|".join(self.cni))
        if self.features:
            parts.append("feature=" + "+".join(self.features))
        if self.cluster:
            parts.append("cluster=" + "|".join(self.cluster))
        return " ".join(parts) or "always"


@dataclass(frozen=True, slots=True)
class Requirement:
    id: str
    component: str
    proto: str
    ports: str | None
    description: str
    dst_role: str
    src_roles: tuple[str, ...]
    condition: Condition = field(default_factory=Condition)
    reference: str = ""
    note: str | None = None
    dst_fallback: str | None = None
    src_scope: str = "cluster"
    sample: bool = False
    section: str = ""
    origin: str = ""  # the file it was read from

    def record(self) -> dict[str, Any]:
        """The NDJSON record of ``portmesh catalog``."""
        rec: dict[str, Any] = {
            "type": "requirement",
            "id": self.id,
            "component": self.component,
            "proto": self.proto,
            "ports": self.ports,
            "description": self.description,
            "dst_role": self.dst_role,
            "src_roles": list(self.src_roles),
            "condition": self.condition.as_dict(),
            "reference": self.reference,
        }
        if self.dst_fallback:
            rec["dst_fallback"] = self.dst_fallback
        if self.src_scope != "cluster":
            rec["src_scope"] = self.src_scope
        if self.sample:
            rec["sample"] = True
        if self.section:
            rec["section"] = self.section
        if self.note:
            rec["note"] = self.note
        return rec

    def default_ports(self) -> list[int]:
        """The ports with every placeholder at its documented default (the document's view)."""
        spec = expand_ports(self.ports, {}) if self.ports else None
        return [p for _, p in parse_ports(spec)] if spec else []


class Catalog:
    """The ordered requirements, addressable by id."""

    def __init__(self, requirements: Sequence[Requirement], files: Sequence[str] = ()) -> None:
        self.requirements: tuple[Requirement, ...] = tuple(requirements)
        self.files: tuple[str, ...] = tuple(files)
        self._by_id = {r.id: r for r in self.requirements}

    def __iter__(self) -> Iterator[Requirement]:
        return iter(self.requirements)

    def __len__(self) -> int:
        return len(self.requirements)

    def __contains__(self, rid: object) -> bool:
        return rid in self._by_id

    def get(self, rid: str) -> Requirement | None:
        return self._by_id.get(rid)

    def features(self) -> tuple[str, ...]:
        """Every feature word: the known ones, then those user files introduce."""
        seen = list(FEATURES)
        for r in self.requirements:
            for f in r.condition.features:
                if f not in seen:
                    seen.append(f)
        return tuple(seen)

    def cnis(self) -> tuple[str, ...]:
        seen = list(KNOWN_CNIS)
        for r in self.requirements:
            for c in r.condition.cni:
                if c not in seen:
                    seen.append(c)
        return tuple(seen)


def expand_ports(spec: str, values: Mapping[str, str | None]) -> str | None:
    """Substitute ``${name}`` / ``${name:default}``; None when a value without default is unknown.

    ``values`` maps placeholder names to their per-cluster value (None: unknown). Names missing
    from ``values`` fall back to the placeholder's default, then to the documented default in
    PORT_VARS for nodeport_range and apiserver_port.
    """
    missing = False

    def sub(m: re.Match[str]) -> str:
        nonlocal missing
        name, default = m.group(1), m.group(2)
        val = values.get(name)
        if val is None:
            val = default
        if val is None and name in ("nodeport_range", "apiserver_port"):
            val = PORT_VARS[name]
        if val is None:
            missing = True
            return ""
        return str(val)

    out = _PLACEHOLDER.sub(sub, spec)
    return None if missing else out


def load_catalog(extra_files: Sequence[str] = ()) -> Catalog:
    """The packaged catalog, extended and overridden by ``extra_files`` in order."""
    text = resources.files("scanner.catalog").joinpath(PACKAGED).read_text(encoding="utf-8")
    reqs = _parse(text, f"scanner/catalog/{PACKAGED}", packaged=True)
    order = [r.id for r in reqs if not isinstance(r, str)]
    by_id: dict[str, Requirement] = {r.id: r for r in reqs if isinstance(r, Requirement)}
    for path in extra_files:
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except OSError as e:
            raise CatalogError(f"{path}: cannot read catalog file: {e.strerror}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CatalogError(f"{path}: not UTF-8 text") from None
        for item in _parse(text, path, packaged=False):
            if isinstance(item, str):  # disabled id
                if item not in by_id:
                    raise CatalogError(
                        f"{path}: requirement {item!r}: field 'disabled': no such requirement to disable"
                    )
                del by_id[item]
                order.remove(item)
            else:
                if item.id not in by_id:
                    order.append(item.id)
                by_id[item.id] = item
    return Catalog([by_id[i] for i in order], (f"scanner/catalog/{PACKAGED}", *extra_files))


def _parse(text: str, path: str, packaged: bool) -> list[Requirement | str]:
    """Entries of one file: a Requirement, or the id (str) of a ``disabled = true`` entry."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise CatalogError(f"{path}: not valid TOML: {e}") from None
    extra = sorted(set(doc) - {"requirement"})
    if extra:
        raise CatalogError(f"{path}: unknown top-level key {extra[0]!r} (expected [[requirement]])")
    entries = doc.get("requirement", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise CatalogError(f"{path}: 'requirement' must be an array of tables ([[requirement]])")
    if not entries and packaged:
        raise CatalogError(f"{path}: no requirements")
    out: list[Requirement | str] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries, 1):
        item = _entry(entry, path, i)
        rid = item if isinstance(item, str) else item.id
        if rid in seen:
            raise CatalogError(
                f"{path}: requirement {rid!r}: field 'id': duplicate id in this file"
            )
        seen.add(rid)
        out.append(item)
    return out


def _entry(e: dict[str, Any], path: str, index: int) -> Requirement | str:
    rid = e.get("id")
    name = repr(rid) if isinstance(rid, str) and rid else f"#{index}"

    def fail(fld: str, msg: str) -> CatalogError:
        return CatalogError(f"{path}: requirement {name}: field {fld!r}: {msg}")

    unknown = sorted(set(e) - _FIELDS)
    if unknown:
        raise fail(unknown[0], "unknown field")
    if not isinstance(rid, str) or not _ID.match(rid):
        raise fail("id", "missing or not an id ([a-z0-9][a-z0-9._-]*)")
    disabled = e.get("disabled", False)
    if not isinstance(disabled, bool):
        raise fail("disabled", "must be true or false")
    if disabled:
        return rid
    for fld in _REQUIRED:
        if fld not in e:
            raise fail(fld, "missing")

    def text(fld: str, required: bool = True) -> str | None:
        v = e.get(fld)
        if v is None and not required:
            return None
        if not isinstance(v, str) or not v.strip():
            raise fail(fld, "must be a non-empty string")
        return v.strip()

    proto = text("proto")
    if proto not in PROTOS:
        raise fail("proto", f"{proto!r} is not one of {', '.join(PROTOS)}")
    ports = e.get("ports")
    if proto in _PORTLESS:
        if ports not in (None, ""):
            raise fail("ports", f"must be absent for proto {proto}")
        ports = None
    else:
        if isinstance(ports, int) and not isinstance(ports, bool):
            ports = str(ports)
        if not isinstance(ports, str) or not ports.strip():
            raise fail(
                "ports", f'missing (nmap syntax, e.g. "22" or "30000-32767") for proto {proto}'
            )
        ports = ports.strip()
        _check_ports(ports, fail)
    dst = text("dst_role")
    if dst not in _DST_ROLES:
        raise fail("dst_role", f"{dst!r} is not a role ({', '.join(_DST_ROLES)})")
    fallback = text("dst_fallback", required=False)
    if fallback is not None and fallback not in _DST_ROLES:
        raise fail("dst_fallback", f"{fallback!r} is not a role")
    srcs = e.get("src_roles")
    if isinstance(srcs, str):
        srcs = [srcs]
    if not isinstance(srcs, list) or not srcs or not all(isinstance(s, str) for s in srcs):
        raise fail("src_roles", "must be a non-empty list of roles")
    for s in srcs:
        if s not in _SRC_ROLES:
            raise fail("src_roles", f"{s!r} is not a source role ({', '.join(_SRC_ROLES)})")
    scope = e.get("src_scope", "cluster")
    if scope not in ("cluster", "site"):
        raise fail("src_scope", f"{scope!r} is not cluster or site")
    sample = e.get("sample", False)
    if not isinstance(sample, bool):
        raise fail("sample", "must be true or false")
    reference = e.get("reference", "")
    if not isinstance(reference, str):
        raise fail("reference", "must be a string")
    return Requirement(
        id=rid,
        component=text("component") or "",
        proto=proto,
        ports=ports,
        description=text("description") or "",
        dst_role=dst,
        src_roles=tuple(srcs),
        condition=_condition(e.get("condition"), fail),
        reference=reference,
        note=text("note", required=False),
        dst_fallback=fallback,
        src_scope=scope,
        sample=sample,
        section=text("section", required=False) or "",
        origin=path,
    )


def _check_ports(ports: str, fail: Any) -> None:
    for m in _PLACEHOLDER.finditer(ports):
        if m.group(1) not in PORT_VARS:
            raise fail(
                "ports", f"unknown placeholder ${{{m.group(1)}}} (known: {', '.join(PORT_VARS)})"
            )
    if "$" in _PLACEHOLDER.sub("", ports):
        raise fail("ports", f"bad placeholder in {ports!r} (write ${{name}} or ${{name:default}})")
    spec = _PLACEHOLDER.sub(lambda m: m.group(2) or PORT_VARS[m.group(1)], ports)
    if ":" in spec:
        raise fail("ports", f"{ports!r}: no T:/U: prefixes here, the proto field says the protocol")
    try:
        parse_ports(spec)
    except InputError as err:
        raise fail("ports", str(err)) from None


def _condition(raw: Any, fail: Any) -> Condition:
    if raw is None:
        return Condition()
    if not isinstance(raw, dict):
        raise fail("condition", 'must be a table, e.g. { cni = "calico", feature = "vxlan" }')
    unknown = sorted(set(raw) - _COND_KEYS)
    if unknown:
        raise fail(f"condition.{unknown[0]}", "unknown key (cni, feature, cluster)")
    vals: dict[str, tuple[str, ...]] = {}
    for key in _COND_KEYS:
        v = raw.get(key)
        if v is None:
            vals[key] = ()
            continue
        if isinstance(v, str):
            v = [v]
        if (
            not isinstance(v, list)
            or not v
            or not all(isinstance(x, str) and _WORD.match(x) for x in v)
        ):
            raise fail(f"condition.{key}", "must be a word or a list of words")
        vals[key] = tuple(v)
    for k in vals["cluster"]:
        if k not in CLUSTER_KINDS:
            raise fail(
                "condition.cluster", f"{k!r} is not a cluster kind ({', '.join(CLUSTER_KINDS)})"
            )
    return Condition(cni=vals["cni"], features=vals["feature"], cluster=vals["cluster"])
