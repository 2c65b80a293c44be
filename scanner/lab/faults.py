"""Injected faults for the lab: the fault file, its parsing, random fault sets (pure: no I/O but
reading a file).

A fault file is YAML::

    # faults.yml: what `portmesh lab up --faults faults.yml` breaks
    roles:                      # optional: inventory roles per lab host; default: the first
      node1: [control_plane, etcd]   # host is control plane + etcd, the others workers
    faults:
      - host: node2             # the lab host whose firewall gets the rule
        direction: in           # in: packets arriving at host; out: packets it sends
        proto: tcp              # tcp | udp | icmp | ipip
        ports: "2380"           # tcp/udp: "2380", "30000-30100", "2379,2380", 2380 or null (all)
        action: drop            # drop | reject | reject-admin
        from: node3             # optional (direction in): only packets from this lab host
        family: ipv6            # optional: only IPv6 (or ipv4) packets; default both families
      - {host: node1, direction: out, proto: udp, ports: 4789, action: drop, to: node2}

A bare list of faults (without ``faults:``) is accepted too. Each fault becomes one nftables
rule in the host's table ``inet portmesh`` (chains ``input`` / ``output``), matching only the
first packet of a connection (``ct state new``), so replies and ICMP errors of other flows are
never caught by a fault. ``icmp`` means ICMP echo requests; ``ipip`` means IP protocol 4 (every
packet: conntrack cannot tell the directions of protocol 4 apart).

Actions, and what a prober then sees (measured in the lab, kernel 6.x):

  action        tcp                    udp                     icmp echo / ipip
  drop          no answer              no answer               no answer
  reject        RST (conn-refused)     ICMP port-unreachable   ICMP port-unreachable (icmp only)
  reject-admin  ICMP admin-prohibited  ICMP admin-prohibited   ICMP admin-prohibited

``reject`` is refused for ipip: a host without a tunnel endpoint may itself answer IP-in-IP with
an ICMP port/protocol unreachable, so the probe could not tell a reject from a pass.

On the sending side (``direction: out``) the kernel reports the fault to the sending socket:
a UDP, ICMP or raw send fails with EPERM; a TCP SYN that is dropped is retried until the
connect times out, a rejected one gets the RST / ICMP error locally.

The nftables rules a fault becomes: scanner.lab.nft; the ground truth it implies:
scanner.lab.truth.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml

from scanner.errors import InputError

DIRECTIONS = ("in", "out")
FAULT_PROTOS = ("tcp", "udp", "icmp", "ipip")
ACTIONS = ("drop", "reject", "reject-admin")
MODES = ("responder", "bare")
_KEYS = {"host", "direction", "proto", "ports", "action", "from", "to", "comment", "family"}
FAMILIES = ("ipv4", "ipv6")
_FAMILY_NAME = {"ipv4": "IPv4", "ipv6": "IPv6"}


@dataclass(frozen=True, slots=True)
class Fault:
    host: str
    direction: str  # in | out
    proto: str  # tcp | udp | icmp | ipip
    ports: tuple[tuple[int, int], ...] | None  # inclusive ranges; None: every port
    action: str  # drop | reject | reject-admin
    peer: str | None = None  # in: only from this host; out: only to this host
    comment: str | None = None
    family: str | None = None  # "ipv4" | "ipv6": only packets of that family; None: both

    def matches_family(self, af: str) -> bool:
        if self.proto == "ipip":
            return af == "ipv4"  # IP protocol 4 carries IPv4 packets over IPv4
        return self.family is None or self.family == af

    def matches_port(self, port: int | None) -> bool:
        if self.ports is None:
            return True
        if port is None:
            return False
        return any(lo <= port <= hi for lo, hi in self.ports)

    def describe(self) -> str:
        where = "from" if self.direction == "in" else "to"
        peer = f" {where} {self.peer}" if self.peer else ""
        ports = "" if self.ports is None else f" {ports_text(self.ports)}"
        fam = f" ({_FAMILY_NAME[self.family]} only)" if self.family else ""
        return f"{self.host} {self.direction} {self.proto}{ports}{peer}{fam}: {self.action}"


@dataclass(frozen=True)
class FaultFile:
    faults: tuple[Fault, ...]
    roles: dict[str, tuple[str, ...]] = field(default_factory=dict)
    source: str = ""


# ---- loading --------------------------------------------------------------------------------


def ports_text(ports: tuple[tuple[int, int], ...]) -> str:
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ports)


def parse_fault_ports(value: object, where: str) -> tuple[tuple[int, int], ...] | None:
    """ "2380", "30000-30100", "2379,2380", 2380 or None -> inclusive ranges (None: all ports)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InputError(
            f"{where}: field 'ports': expected a port, a range or a list, not {value!r}"
        )
    if isinstance(value, int):
        items = [str(value)]
    elif isinstance(value, str):
        items = [t.strip() for t in value.split(",")]
    elif isinstance(value, list):
        items = [str(t).strip() for t in value]
    else:
        raise InputError(
            f"{where}: field 'ports': expected a port, a range or a list, not {value!r}"
        )
    out: list[tuple[int, int]] = []
    for tok in items:
        lo_s, sep, hi_s = tok.partition("-")
        try:
            lo = int(lo_s)
            hi = int(hi_s) if sep else lo
        except ValueError:
            raise InputError(f"{where}: field 'ports': bad port or range {tok!r}") from None
        if not (1 <= lo <= hi <= 65535):
            raise InputError(f"{where}: field 'ports': {tok!r} is not within 1-65535 (low-high)")
        out.append((lo, hi))
    if not out:
        raise InputError(f"{where}: field 'ports': empty")
    return tuple(out)


def parse_fault(entry: object, where: str) -> Fault:
    """One fault mapping -> Fault; ``where`` names the file and entry for error messages."""
    if not isinstance(entry, dict):
        raise InputError(f"{where}: expected a mapping with host, direction, proto, action")
    unknown = sorted(set(map(str, entry)) - _KEYS)
    if unknown:
        raise InputError(
            f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(sorted(_KEYS))})"
        )

    def word(key: str, choices: tuple[str, ...]) -> str:
        v = entry.get(key)
        if v is None:
            raise InputError(f"{where}: field {key!r} is missing (one of {', '.join(choices)})")
        if not isinstance(v, str) or v.strip().lower() not in choices:
            raise InputError(f"{where}: field {key!r}: {v!r} is not one of {', '.join(choices)}")
        return v.strip().lower()

    host = entry.get("host")
    if not isinstance(host, str) or not host.strip():
        raise InputError(f"{where}: field 'host' is missing or not a host name")
    direction = word("direction", DIRECTIONS)
    proto = word("proto", FAULT_PROTOS)
    action = word("action", ACTIONS)
    ports = parse_fault_ports(entry.get("ports"), where)
    if proto in ("icmp", "ipip") and ports is not None:
        raise InputError(f"{where}: field 'ports': {proto} has no ports (leave it out)")
    if proto == "ipip" and action == "reject":
        raise InputError(
            f"{where}: field 'action': reject is not supported for ipip (a host without a tunnel "
            "answers with an ICMP unreachable itself); use drop or reject-admin"
        )
    own, other = ("from", "to") if direction == "in" else ("to", "from")
    if entry.get(other) is not None:
        raise InputError(
            f"{where}: field {other!r} does not apply to direction {direction} (use {own!r})"
        )
    peer = entry.get(own)
    if peer is not None and (not isinstance(peer, str) or not peer.strip()):
        raise InputError(f"{where}: field {own!r}: expected a lab host name, not {peer!r}")
    if peer is not None and peer.strip() == host.strip():
        raise InputError(f"{where}: field {own!r}: a host cannot be its own peer")
    comment = entry.get("comment")
    family = None
    if entry.get("family") is not None:
        family = word("family", FAMILIES)
        if proto == "ipip" and family == "ipv6":
            raise InputError(f"{where}: field 'family': ipip is IPv4 only")
    return Fault(
        host.strip(),
        direction,
        proto,
        ports,
        action,
        peer.strip() if peer else None,
        str(comment) if comment is not None else None,
        family,
    )


def parse_fault_doc(doc: object, source: str = "<faults>") -> FaultFile:
    """A parsed YAML document (a list of faults, or a mapping with faults/roles) -> FaultFile."""
    roles: dict[str, tuple[str, ...]] = {}
    if doc is None:
        return FaultFile((), {}, source)
    if isinstance(doc, dict):
        unknown = sorted(set(map(str, doc)) - {"faults", "roles"})
        if unknown:
            raise InputError(f"{source}: unknown top-level key {unknown[0]!r} (use faults, roles)")
        raw_roles = doc.get("roles") or {}
        if not isinstance(raw_roles, dict):
            raise InputError(f"{source}: 'roles' must map host names to lists of roles")
        for h, rs in raw_roles.items():
            if isinstance(rs, str):
                rs = [rs]
            if not isinstance(rs, list) or not all(isinstance(r, str) for r in rs):
                raise InputError(f"{source}: roles of {h!r}: expected a list of role names")
            roles[str(h)] = tuple(rs)
        items = doc.get("faults") or []
    else:
        items = doc
    if not isinstance(items, list):
        raise InputError(f"{source}: 'faults' must be a list of fault mappings")
    faults = tuple(parse_fault(e, f"{source}: fault #{i + 1}") for i, e in enumerate(items))
    return FaultFile(faults, roles, source)


def load_fault_file(path: str) -> FaultFile:
    try:
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
    except OSError as e:
        raise InputError(f"cannot read fault file {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "not valid YAML"
        raise InputError(f"fault file {path}{line}: {problem}") from None
    except UnicodeDecodeError:
        raise InputError(f"fault file {path}: not UTF-8 text") from None
    return parse_fault_doc(doc, path)


def load_faults(path: str) -> list[Fault]:
    """The faults of a fault file (InputError naming the file, entry and field on bad input)."""
    return list(load_fault_file(path).faults)


def check_hosts(faults: Iterable[Fault], hosts: Iterable[str], source: str = "faults") -> None:
    """Every host and peer named by a fault must be a lab host."""
    known = set(hosts)
    for i, f in enumerate(faults, 1):
        for key, name in (("host", f.host), ("from" if f.direction == "in" else "to", f.peer)):
            if name is not None and name not in known:
                raise InputError(
                    f"{source}: fault #{i}: field {key!r}: {name!r} is not a lab host "
                    f"(hosts: {', '.join(sorted(known))})"
                )


def faults_for(faults: Iterable[Fault], host: str) -> list[Fault]:
    return [f for f in faults if f.host == host]


# ---- random fault sets ----------------------------------------------------------------------

DEFAULT_FAULT_PORTS: tuple[tuple[str, tuple[int, int]], ...] = (
    ("tcp", (2379, 2379)),
    ("tcp", (2380, 2380)),
    ("tcp", (6443, 6443)),
    ("tcp", (10250, 10250)),
    ("tcp", (179, 179)),
    ("tcp", (30000, 30099)),
    ("udp", (4789, 4789)),
    ("udp", (8472, 8472)),
    ("udp", (51820, 51820)),
    ("udp", (7946, 7946)),
)


def random_faults(
    lab_hosts: Iterable[Any],
    seed: int,
    n: int,
    ports: Iterable[tuple[str, tuple[int, int]]] = DEFAULT_FAULT_PORTS,
) -> list[Fault]:
    """A reproducible random set of ``n`` valid faults over these hosts (names or LabHosts).

    ``ports`` is the pool of (proto, (lo, hi)) that tcp/udp faults pick from; icmp and ipip
    faults are drawn too. Same seed, same hosts -> same faults.
    """
    names = [h if isinstance(h, str) else h.name for h in lab_hosts]
    if not names:
        raise ValueError("random_faults needs at least one host")
    pool = list(ports)
    rng = random.Random(seed)
    out: list[Fault] = []
    for _ in range(n):
        proto = rng.choice(("tcp", "tcp", "udp", "udp", "icmp", "ipip"))
        if proto in ("tcp", "udp"):
            choices = [r for p, r in pool if p == proto] or [(1, 65535)]
            prange: tuple[tuple[int, int], ...] | None = (rng.choice(choices),)
        else:
            prange = None
        actions = ("drop", "reject-admin") if proto == "ipip" else ACTIONS
        host = rng.choice(names)
        others = [h for h in names if h != host]
        peer = rng.choice(others) if others and rng.random() < 0.5 else None
        out.append(
            Fault(
                host=host,
                direction=rng.choice(DIRECTIONS),
                proto=proto,
                ports=prange,
                action=rng.choice(actions),
                peer=peer,
            )
        )
    return out


def fault_doc(faults: Iterable[Fault]) -> dict[str, Any]:
    """Faults back into the fault-file form (for writing a generated set to YAML)."""
    items = []
    for f in faults:
        d: dict[str, Any] = {"host": f.host, "direction": f.direction, "proto": f.proto}
        if f.ports is not None:
            d["ports"] = ports_text(f.ports)
        d["action"] = f.action
        if f.peer is not None:
            d["from" if f.direction == "in" else "to"] = f.peer
        if f.comment:
            d["comment"] = f.comment
        items.append(d)
    return {"faults": items}
