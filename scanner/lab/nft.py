"""A lab fault as nftables rules (pure): the host's table ``inet portmesh``, chains ``input`` /
``output``, one rule per fault and family, matching only ``ct state new`` (see scanner.lab.faults).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from scanner.lab.faults import Fault


class _AddrBook(Protocol):
    def host(self, name: str) -> Any: ...


_VERDICT = {
    ("tcp", "reject"): "reject with tcp reset",
    ("udp", "reject"): "reject with icmpx type port-unreachable",
    ("icmp", "reject"): "reject with icmpx type port-unreachable",
}


def _nft_verdict(f: Fault) -> str:
    if f.action == "drop":
        return "drop"
    if f.action == "reject-admin":
        return "reject with icmpx type admin-prohibited"
    return _VERDICT[(f.proto, f.action)]


def _addr(lab: _AddrBook | Mapping[str, str], name: str) -> str:
    if isinstance(lab, Mapping):
        return lab[name]
    return lab.host(name).addr


def _addr6(lab: _AddrBook | Mapping[str, str], name: str) -> str | None:
    if isinstance(lab, Mapping):
        a = lab.get(f"{name}/ipv6")  # a mapping may carry IPv6 addresses under "name/ipv6"
        return a if isinstance(a, str) else None
    return getattr(lab.host(name), "addr6", None)


def nft_rules(f: Fault, lab: _AddrBook | Mapping[str, str], index: int = 0) -> list[str]:
    """The rules of one fault: one, or one per family where the match says the family (a peer
    address, ICMP vs ICMPv6 echo). A peer without an IPv6 address gets no IPv6 rule."""
    if f.proto == "ipip":
        return [nft_rule(f, lab, index)]
    if f.family is not None:
        fams = [f.family]
    elif f.peer is not None or f.proto == "icmp":
        fams = ["ipv4", "ipv6"]
    else:
        return [nft_rule(f, lab, index)]  # tcp/udp by port: one rule, both families
    out = []
    for fam in fams:
        if fam == "ipv6" and f.peer is not None and _addr6(lab, f.peer) is None:
            continue
        out.append(nft_rule(f, lab, index, fam))
    return out


def nft_rule(
    f: Fault, lab: _AddrBook | Mapping[str, str], index: int = 0, family: str | None = None
) -> str:
    # TCP, UDP and ICMP echo: only a connection's first packet, so replies and ICMP errors of
    # other flows pass. Not for IP-in-IP: conntrack tracks protocol 4 by addresses alone, so a
    # probe B->A would count as the reply of an earlier probe A->B and slip past the rule.
    parts = [] if f.proto == "ipip" else ["ct state new"]
    v6 = family == "ipv6"
    if family is not None and f.peer is None and f.proto in ("tcp", "udp"):
        parts.append(f"meta nfproto {family}")
    if f.peer is not None:
        way = "saddr" if f.direction == "in" else "daddr"
        if v6:
            parts.append(f"ip6 {way} {_addr6(lab, f.peer)}")
        else:
            parts.append(f"ip {way} {_addr(lab, f.peer)}")
    if f.proto in ("tcp", "udp"):
        if f.ports is None:
            parts.append(f"meta l4proto {f.proto}")
        else:
            parts.append(f"{f.proto} dport {{ {', '.join(_nft_ports(f.ports))} }}")
    elif f.proto == "icmp":
        parts.append("icmpv6 type echo-request" if v6 else "icmp type echo-request")
    else:
        parts.append("ip protocol 4")
    parts.append(_nft_verdict(f))
    parts.append(f'comment "portmesh fault {index}"')
    return " ".join(parts)


def _nft_ports(ports: tuple[tuple[int, int], ...]) -> list[str]:
    return [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ports]


def nft_ruleset(faults_for_host: Iterable[Fault], lab: _AddrBook | Mapping[str, str]) -> str:
    """The ``nft -f`` text for one host: table inet portmesh, replaced as a whole when loaded.

    ``lab`` gives peer addresses: a Lab (``lab.host(name).addr``) or a name -> address mapping.
    Rules keep the order of the fault file; within a chain the first matching rule decides.
    """
    rules: dict[str, list[str]] = {"input": [], "output": []}
    for i, f in enumerate(faults_for_host, 1):
        rules["input" if f.direction == "in" else "output"].extend(nft_rules(f, lab, i))
    out = [
        # declare-then-delete: loading replaces an older table of ours and fails on nothing
        "table inet portmesh {}",
        "delete table inet portmesh",
        "table inet portmesh {",
    ]
    for chain in ("input", "output"):
        out.append(f"\tchain {chain} {{")
        out.append(f"\t\ttype filter hook {chain} priority filter; policy accept;")
        out.extend(f"\t\t{r}" for r in rules[chain])
        out.append("\t}")
    out.append("}")
    return "\n".join(out) + "\n"
