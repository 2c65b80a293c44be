"""The fix script: the firewall commands that would open exactly the failing flows (pure).

One shell function per destination host, each opening on that host's input side the ports
that failed to reach it, restricted to the source addresses that failed (when the results
name them). The script is for a person to review and run, host by host; portmesh never runs it:

    sh portmesh-fix.sh --list          the hosts it has a section for
    sh portmesh-fix.sh node3           run node3's section (on node3, as root)
    sh portmesh-fix.sh auto            run the sections whose address is on this host
    DRY_RUN=1 sh portmesh-fix.sh node3 print the commands only

nftables: rules are *inserted* at the head of one existing chain, by default ``inet filter
input`` (``--nft-table``, ``--nft-chain``). Head of the chain, because in nftables an accept
ends the packet's walk of its own base chain only: every other base chain on the same hook
(another table's, e.g. firewalld's ``inet firewalld``) still sees the packet and may drop it.
So the accept must go before the drop, in the chain that holds the drop; a separate
``portmesh`` table with its own accepting chain would not open anything. Point the options at
the chain your ruleset filters in. iptables: ``-I INPUT`` (head of the filter table's INPUT
chain). firewalld: permanent rich rules (source-restricted) or ports, then a reload.

What it cannot fix: a flow dropped on the *source's* output side or on the path between
(the report's "cannot reach ... on any peer" findings point there), and a port that answered
'closed' (nothing listens; under ``check --expect listening``): those are listed as comments.
A flow whose send the source's own output chain refused (reason ``local-prohibited``: the
kernel said EPERM, nothing left the source) gets no input rule on the destination, where it
would change nothing: it is a comment in the *source's* section, naming the destinations.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field

from scanner.errors import InputError
from scanner.report.aggregate import (
    IPV6_SUFFIX,
    STRIDE,
    Aggregate,
    Cell,
    PortSet,
    address_family,
    compress_names,
    format_ranges,
    natural_key,
    port_label,
)

NFT_FAMILIES = ("inet", "ip", "ip6")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
MULTIPORT_MAX = 15  # iptables multiport: at most 15 ports per rule, a range counts as two
ICMP_ECHO = "echo-request"  # what the ICMP probe sends


def check_nft_name(what: str, name: str) -> str:
    if not _NAME.match(name):
        raise InputError(f"{what} {name!r}: not an nftables name (letters, digits, _ . -)")
    return name


def parse_nft_table(spec: str) -> tuple[str, str]:
    """'inet filter' -> ('inet', 'filter'); a bare name means family inet."""
    parts = spec.split()
    if len(parts) == 1:
        parts = ["inet", parts[0]]
    if len(parts) != 2 or parts[0] not in NFT_FAMILIES:
        raise InputError(
            f"--nft-table {spec!r}: expected '[family] name' with family one of "
            f"{', '.join(NFT_FAMILIES)} (e.g. 'inet filter')"
        )
    return parts[0], check_nft_name("--nft-table", parts[1])


@dataclass
class Opening:
    """One thing to open on one host: a requirement's ports from a set of sources."""

    req: str
    proto: str
    ports: PortSet  # empty for icmp / ipip
    # source name -> the addresses its failing flows left from (None: no address recorded)
    sources: dict[str, set[str] | None] = field(default_factory=dict)
    reasons: set[str] = field(default_factory=set)


@dataclass
class HostFix:
    name: str
    addr: str | None
    openings: dict[tuple[str, tuple[tuple[int, int], ...]], Opening] = field(default_factory=dict)
    closed: list[str] = field(default_factory=list)  # notes: not a firewall problem
    # this host's own output chain refused these sends: (req, proto, ports shape) -> the
    # ports and the destinations' names
    egress: dict[tuple[str, str, tuple[tuple[int, int], ...]], tuple[PortSet, list[str]]] = (
        field(default_factory=dict)
    )


def collect(agg: Aggregate) -> list[HostFix]:
    """Per destination host, the failing flows to open, merged over every run in the input."""
    hosts: dict[str, HostFix] = {}
    for run in agg.runs.values():
        for req in run.reqs.values():
            if not req.nfail:
                continue
            for k, c in req.cells.items():
                if not isinstance(c, Cell) or not c.nfail:
                    continue
                s, d = divmod(k, STRIDE)
                dname = run.names[d]
                sname = run.names[s]
                remote = c.fail_ports
                if c.nlocal:
                    # refused by the source's own output chain: a note in the source's section
                    local = c.local_ports or PortSet()
                    sf = hosts.get(sname)
                    if sf is None:
                        sf = hosts[sname] = HostFix(sname, run.addrs.get(s))
                    ek = (req.key, req.proto, tuple(local.ranges()))
                    sf.egress.setdefault(ek, (local, []))[1].append(dname)
                    remote = PortSet(p for p in _ports(c.fail_ports) if p not in local)
                    if c.nlocal == c.nfail:
                        continue
                hf = hosts.get(dname)
                if hf is None:
                    hf = hosts[dname] = HostFix(dname, run.addrs.get(d))
                if c.closed_ports:
                    hf.closed.append(
                        f"{req.key}: {port_label(req.proto, c.closed_ports)} from {sname} "
                        "answered closed: nothing listens, no firewall rule will help"
                    )
                if req.proto in ("tcp", "udp") and not remote:
                    continue
                shape = tuple(remote.ranges())
                op = hf.openings.get((req.key, shape))
                if op is None:
                    op = hf.openings[(req.key, shape)] = Opening(req.key, req.proto, remote)
                # the addresses the failing packets really left from, not the first address seen
                # for the name (a multi-homed host may route to this destination from another)
                seen = set(c.fail_srcs) or ({run.addrs[s]} if s in run.addrs else set())
                if seen:
                    had = op.sources.get(sname)
                    op.sources[sname] = seen | (had or set())
                else:
                    op.sources.setdefault(sname, None)
                op.reasons.add(c.top_reason())
    return sorted(hosts.values(), key=lambda h: natural_key(h.name))


def _ports(ps: PortSet) -> Iterator[int]:
    for a, b in ps.ranges():
        yield from range(a, b + 1)


def _egress_notes(hf: HostFix) -> Iterator[str]:
    for (req, proto, _), (ports, dsts) in sorted(hf.egress.items()):
        what = port_label(proto, ports, limit=1000) if ports else proto
        tables = "ip6tables" if req.endswith(IPV6_SUFFIX) else "iptables"
        yield (
            f"{req}: {what} to {compress_names(dsts)}: refused by the output rules of this "
            "host itself (local-prohibited: the send failed, nothing left): no rule on the "
            f"destination helps; allow it there (nft list ruleset, {tables} -S OUTPUT)"
        )


def render_fix(
    agg: Aggregate, kind: str, nft_table: str = "inet filter", nft_chain: str = "input"
) -> str:
    family, table = parse_nft_table(nft_table)
    check_nft_name("--nft-chain", nft_chain)
    hosts = collect(agg)
    gen = {"nftables": _nft, "iptables": _iptables, "firewalld": _firewalld}[kind]
    runs = ", ".join(agg.runs)
    out = [
        "#!/bin/sh",
        f"# portmesh fix ({kind}): opens exactly the flows that failed in run(s) {runs}.",
        "# Generated by `portmesh report --fix`; portmesh never runs it. Review it, then run each",
        "# host's section ON that host, as root:",
        "#   sh THIS_SCRIPT --list        hosts with a section",
        "#   sh THIS_SCRIPT HOST          run HOST's section",
        "#   sh THIS_SCRIPT auto          run the sections whose address is on this host",
        "#   DRY_RUN=1 sh THIS_SCRIPT HOST   print the commands only",
    ]
    if kind == "nftables":
        out += [
            f"# nftables: rules are inserted at the head of chain '{family} {table} {nft_chain}'",
            "# (change with --nft-table/--nft-chain). An accept only ends the walk of its own base",
            "# chain: it must sit before the drop, in the chain that holds the drop.",
        ]
    elif kind == "iptables":
        out += [
            "# iptables: rules are inserted at the head of the filter table's INPUT chain",
            "# (not persistent: save them with iptables-save / your distribution's service).",
        ]
    else:
        out += [
            "# firewalld: permanent rules in the zone $ZONE (default zone when unset), then a",
            "# reload.",
        ]
    out += [
        "# Only the destination's input side is opened: a flow dropped on the source's output",
        "# side or on the path between is not fixed by this.",
        "set -eu",
        "",
        'run() { echo "+ $*"; if [ -z "${DRY_RUN:-}" ]; then "$@"; fi; }',
        "",
    ]
    if not hosts:
        out.append("# nothing failed: nothing to open")
    for i, hf in enumerate(hosts):
        out.append(f"fix_{i}() {{")
        out.append(f"  # {_c(hf.name)} ({hf.addr or 'address unknown'})")
        if kind == "nftables" and hf.openings:
            # on a miss, name the tables that do have the chain (a portmesh lab's faults live
            # in 'inet portmesh'): the value to regenerate with
            out.append(
                f'  [ -n "${{DRY_RUN:-}}" ] || nft list chain {family} {table} {nft_chain} >/dev/null || '
                "{ s=$(nft list tables 2>/dev/null | while read -r _ f t; do "
                f'nft list chain "$f" "$t" {nft_chain} >/dev/null 2>&1 && '
                "printf \" --nft-table '%s %s'\" \"$f\" \"$t\"; done; true); "
                f'echo "no chain {family} {table} {nft_chain} on this host: regenerate with '
                f'--nft-table/--nft-chain${{s:+ (chain {nft_chain} is in:$s)}}" >&2; return 1; }}'
            )
        for note in hf.closed:
            out.append(f"  # not opened: {_c(note)}")
        for note in _egress_notes(hf):
            out.append(f"  # not opened: {_c(note)}")
        for op in sorted(hf.openings.values(), key=lambda o: (natural_key(o.req), o.ports.count)):
            names = compress_names(op.sources)
            out.append(
                f"  # {_c(op.req)}: {port_label(op.proto, op.ports, limit=1000)} from {_c(names)}"
                f" ({_c('; '.join(sorted(r for r in op.reasons if r)))})"
            )
            out.extend("  " + line for line in gen(op, family, table, nft_chain))
        if not hf.openings:  # only notes: nothing to open, nothing to reload
            out.append(f'  echo "{_c(hf.name)}: nothing to open (see the notes in this section)"')
        elif kind == "firewalld":
            out.append("  run firewall-cmd --reload")
        out.append("}")
        out.append("")
    out += _dispatch(hosts)
    return "\n".join(out) + "\n"


def _dispatch(hosts: list[HostFix]) -> list[str]:
    names = " ".join(shlex.quote(h.name) for h in hosts)
    out = ['case "${1:-}" in']
    out.append(f"  --list) echo {shlex.quote(' '.join(h.name for h in hosts))} ;;")
    out.append("  auto)")
    out.append("    addrs=$(ip -o addr show 2>/dev/null || true); found=")
    for i, h in enumerate(hosts):
        if h.addr:
            pat = shlex.quote(f" {h.addr}/")
            out.append(
                f'    if printf "%s\\n" "$addrs" | grep -qF -- {pat}; then found=1; fix_{i}; fi'
            )
    out.append(
        '    if [ -z "$found" ]; then echo "no section for an address of this host" >&2; exit 1; fi ;;'
    )
    for i, h in enumerate(hosts):
        out.append(f"  {shlex.quote(h.name)}) fix_{i} ;;")
    out.append(f'  *) echo "usage: $0 --list | auto | HOST   (hosts: {_c(names)})" >&2; exit 2 ;;')
    out.append("esac")
    return out


def _c(s: str) -> str:
    """Safe inside a shell comment or a double-quoted echo: one line, no quotes or expansions."""
    return re.sub(r"[^\w .,:;/()\[\]+=@<>|-]", "?", s.replace("\n", " "))


def _split_sources(op: Opening) -> tuple[list[str], list[str], bool]:
    """(ipv4 sources, ipv6 sources, any): any is True when a failing source has no address."""
    v4, v6, anyone = [], [], False
    for addrs in op.sources.values():
        for addr in addrs or (None,):
            fam = address_family(addr)
            if fam == 4:
                v4.append(addr)  # type: ignore[arg-type]
            elif fam == 6:
                v6.append(addr)  # type: ignore[arg-type]
            else:
                anyone = True
    return sorted(set(v4), key=_addr_key), sorted(set(v6), key=_addr_key), anyone


def _addr_key(a: str) -> tuple[int, ...]:
    return (int(ipaddress.ip_address(a)),)


def _families(op: Opening) -> Iterator[tuple[int, list[str] | None]]:
    """(ip version, sources or None for any source) per rule family to emit."""
    v4, v6, anyone = _split_sources(op)
    if anyone:
        yield 4, None
        yield 6, None
        return
    if v4:
        yield 4, v4
    if v6:
        yield 6, v6


def _rule_tag(op: Opening) -> str:
    """The rule's comment: "portmesh REQ", REQ the requirement id (the rule's own addresses say
    the family: "calico.vxlan over IPv6" is commented "portmesh calico.vxlan")."""
    req = op.req.removesuffix(IPV6_SUFFIX)
    return "portmesh " + re.sub(r"[^A-Za-z0-9_./:-]", "_", req)


def _nft(op: Opening, family: str, table: str, chain: str) -> Iterator[str]:
    for ver, srcs in _families(op):
        if (family == "ip" and ver == 6) or (family == "ip6" and ver == 4):
            yield f"# skipped: IPv{ver} sources cannot go into a '{family}' table"
            continue
        parts = []
        if srcs is not None:
            parts.append(f"{'ip' if ver == 4 else 'ip6'} saddr {{ {', '.join(srcs)} }}")
        elif family == "inet":
            parts.append(f"meta nfproto {'ipv4' if ver == 4 else 'ipv6'}")
        if op.proto in ("tcp", "udp"):
            ports = format_ranges(op.ports.ranges(), sep=", ")
            parts.append(f"{op.proto} dport {{ {ports} }}")
        elif op.proto == "icmp":
            parts.append("icmp type echo-request" if ver == 4 else "icmpv6 type echo-request")
        elif op.proto == "ipip":
            parts.append("meta l4proto ipip")
        else:
            yield f"# skipped: no rule for protocol {_c(op.proto)}"
            continue
        parts.append(f'accept comment "{_rule_tag(op)}"')
        rule = " ".join(parts)
        yield f"run nft insert rule {family} {table} {chain} {shlex.quote(rule)}"


def _iptables(op: Opening, family: str, table: str, chain: str) -> Iterator[str]:
    for ver, srcs in _families(op):
        cmd = "iptables" if ver == 4 else "ip6tables"
        base = [cmd, "-I", "INPUT"]
        src = ["-s", ",".join(srcs)] if srcs else []
        tail = ["-m", "comment", "--comment", _rule_tag(op), "-j", "ACCEPT"]
        if op.proto in ("tcp", "udp"):
            for chunk in _multiport_chunks(list(op.ports.ranges())):
                if len(chunk) == 1 and chunk[0][0] == chunk[0][1]:
                    match = ["--dport", str(chunk[0][0])]
                else:
                    match = ["-m", "multiport", "--dports", format_ranges(chunk, dash=":")]
                yield "run " + shlex.join([*base, "-p", op.proto, *src, *match, *tail])
        elif op.proto == "icmp":
            match = (
                ["-p", "icmp", "--icmp-type", ICMP_ECHO]
                if ver == 4
                else ["-p", "ipv6-icmp", "--icmpv6-type", ICMP_ECHO]
            )
            yield "run " + shlex.join([*base, *match, *src, *tail])
        elif op.proto == "ipip":
            yield "run " + shlex.join([*base, "-p", "4", *src, *tail])
        else:
            yield f"# skipped: no rule for protocol {_c(op.proto)}"


def _multiport_chunks(ranges: list[tuple[int, int]]) -> Iterator[list[tuple[int, int]]]:
    chunk: list[tuple[int, int]] = []
    used = 0
    for a, b in ranges:
        cost = 1 if a == b else 2
        if used + cost > MULTIPORT_MAX:
            yield chunk
            chunk, used = [], 0
        chunk.append((a, b))
        used += cost
    if chunk:
        yield chunk


def _firewalld(op: Opening, family: str, table: str, chain: str) -> Iterator[str]:
    zone = '${ZONE:+--zone="$ZONE"}'
    for ver, srcs in _families(op):
        fam = "ipv4" if ver == 4 else "ipv6"
        if srcs is None:
            if ver == 6:
                continue  # the plain --add-port/--add-protocol forms cover both families
            if op.proto in ("tcp", "udp"):
                for a, b in op.ports.ranges():
                    p = str(a) if a == b else f"{a}-{b}"
                    yield f"run firewall-cmd --permanent {zone} --add-port={p}/{op.proto}"
            elif op.proto == "icmp":
                yield f"run firewall-cmd --permanent {zone} --remove-icmp-block={ICMP_ECHO}"
            elif op.proto == "ipip":
                yield f"run firewall-cmd --permanent {zone} --add-protocol=ipip"
            continue
        for addr in srcs:
            head = f'rule family="{fam}" source address="{addr}"'
            if op.proto in ("tcp", "udp"):
                for a, b in op.ports.ranges():
                    p = str(a) if a == b else f"{a}-{b}"
                    rule = f'{head} port port="{p}" protocol="{op.proto}" accept'
                    yield f"run firewall-cmd --permanent {zone} --add-rich-rule={shlex.quote(rule)}"
            elif op.proto == "icmp":
                rule = f'{head} icmp-type name="{ICMP_ECHO}" accept'
                yield f"run firewall-cmd --permanent {zone} --add-rich-rule={shlex.quote(rule)}"
            elif op.proto == "ipip":
                rule = f'{head} protocol value="ipip" accept'
                yield f"run firewall-cmd --permanent {zone} --add-rich-rule={shlex.quote(rule)}"
