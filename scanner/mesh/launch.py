"""What a mesh is told and tells its agents, worked out before any agent starts (pure).

``MeshConfig`` (what ``portmesh mesh`` and ``portmesh demo`` ask for), the flows each source
owes (``per_source_counts``, arithmetic), the ports each host's responder opens
(``responder_ports``), the ports a responder could not bind and who holds them
(``held_ports``, ``unbound_ports``, ``unsure_ports``), each agent's share of the engine
settings and the catalog files it is sent.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TextIO

from scanner.engine.engine import EngineConfig
from scanner.engine.output import NdjsonOutput
from scanner.mesh.pairs import ranges
from scanner.plan.planner import legs
from scanner.responder.holders import RESPONDER_COMM

SECRET_MISMATCH = "responder-secret-mismatch"  # silent_holders: a responder with another secret

HELLO_TIMEOUT = 60.0  # exec + interpreter start + hello; ssh to a slow host can take seconds
READY_TIMEOUT = 60.0  # binding the NodePort range takes ~0.1 s; /proc owner lookup more
STOP_TIMEOUT = 10.0
DEFAULT_TTL = 3600.0
RATE_WINDOW = 2.0  # seconds of probes in flight per agent under --rate (see engine_share)  # responders' own TTL: a safety net, the parent channel ends them first


@dataclass
class MeshConfig:
    """Everything ``run_mesh`` needs; ``portmesh mesh`` and ``portmesh demo`` build one.

    catalog, site, selection: from ``SelectionOptions.resolve()`` (selection.sources is
        replaced by every host of the site; the "scanner" source is not part of a mesh).
    exec_template: None -> ssh per host (``transport.default_template(host.user)``).
    engine: the TOTAL concurrency and rate; each agent gets its share. The secret in
        engine.probe_options (``--secret-file``) is the run's secret when given, else every
        run makes a fresh one.
    bundle: a directory of wheels copied to every host (see scanner.mesh.transport).
    """

    catalog: Any
    site: Any
    selection: Any
    exec_template: str | None = None
    agent_cmd: str | None = (
        None  # None: this interpreter through a local template, else portmesh agent
    )
    bundle: str | None = None
    bundle_python: str = "python3"
    engine: EngineConfig = field(default_factory=EngineConfig)
    output: NdjsonOutput | None = None
    argv: list[str] = field(default_factory=list)
    ttl: float = DEFAULT_TTL
    hello_timeout: float = HELLO_TIMEOUT
    ready_timeout: float = READY_TIMEOUT
    loop: str = "uvloop"  # the agents' probing loop
    witness: bool = True
    expect: str = "reachable"
    summary_to: TextIO | None = None
    progress: bool = False
    only: frozenset[str] | None = None  # forward only these states/verdicts (counts: all)
    forks: int = 64  # execs (ssh handshakes, bundle copies) in progress at once, as Ansible's
    # every agent on this machine (the loopback demo): each responder binds its host's
    # address and each agent probes from it, so four hosts can share one machine's ports
    local_bind: bool = False
    # simulated faults (the loopback demo, where nftables needs root): host -> TCP ports its
    # responder leaves closed, so a probe gets a reset where a responder should answer (fail)
    withhold: dict[str, frozenset[int]] = field(default_factory=dict)
    emit: str = "all"  # or "failures": agents send failing flows + tallies (scanner.core.tally)


# ---- pure helpers ---------------------------------------------------------------------------


def per_source_counts(catalog: Any, site: Any, selection: Any) -> Counter[str]:
    """Planned flows per source host, arithmetically (sums to count_plan)."""
    counts: Counter[str] = Counter()
    for leg in legs(catalog, site, selection):
        if not (leg.applies and leg.srcs and leg.dsts and leg.ports):
            continue
        by_name = Counter(n for n, _ in leg.dsts)
        by_addr = Counter(a for _, a in leg.dsts)
        by_both = Counter(leg.dsts)
        nd, np_ = len(leg.dsts), len(leg.ports)
        for s in leg.srcs:
            name, addr = s
            selfs = by_name[name] + (by_addr[addr] - by_both[s] if addr is not None else 0)
            counts[name] += (nd - selfs) * np_
    return counts


def responder_ports(
    catalog: Any, site: Any, selection: Any, withhold: dict[str, frozenset[int]] | None = None
) -> dict[str, tuple[str, str]]:
    """host -> (tcp ports, udp ports) as range text: every port the plan probes it on, less the
    TCP ports ``withhold`` names for the host (a simulated fault: see MeshConfig.withhold)."""
    hosts = {h.name for h in site.hosts()}
    want: dict[str, list[tuple[str, tuple[int | None, ...]]]] = {}
    for leg in legs(catalog, site, selection):
        if not (leg.applies and leg.srcs and leg.dsts and leg.ports):
            continue
        proto = leg.req.proto
        if proto not in ("tcp", "udp"):
            continue
        for name, _ in leg.dsts:
            if name in hosts and any(s != name for s, _ in leg.srcs):
                want.setdefault(name, []).append((proto, leg.ports))
    out: dict[str, tuple[str, str]] = {}
    for name, items in want.items():
        tcp = {p for pr, ps in items if pr == "tcp" for p in ps if p is not None}
        tcp -= (withhold or {}).get(name, frozenset())
        udp = {p for pr, ps in items if pr == "udp" for p in ps if p is not None}
        out[name] = (ranges(tcp), ranges(udp))
    return out


WILDCARDS = frozenset({"0.0.0.0", "::"})


def held_ports(link: Any) -> tuple[dict[str, set[int]], dict[str, set[int]]]:
    """(held, unsure): proto -> ports this host's responder could not bind, split by what its
    ready record says about the holder (``failed[].local``, from /proc/net on the host).

    held: every holding socket is bound to another address than the one probed (a service on
    127.0.0.1): nothing answers the probe but the host's kernel, so its reset is the host's.
    unsure: nothing tells who would answer (out of descriptors, or no holder found).
    Neither: a holder on the wildcard or on the probed address (the lab's responders, a
    responder started by hand, etcd on the node address) answers the probe itself, so a reset
    or silence there is the firewall's: the port is verdicted as if our responder held it -
    except UDP silence where the holder is not a portmesh responder (``silent_holders``)."""
    held: dict[str, set[int]] = {"tcp": set(), "udp": set()}
    unsure: dict[str, set[int]] = {"tcp": set(), "udp": set()}
    rec = link.ready_rec
    if link.failed is not None or not isinstance(rec, dict):
        return held, unsure
    mine = {link.host.address, *WILDCARDS}
    for f in rec.get("failed") or ():
        if not isinstance(f, dict):
            continue
        proto, port, local = f.get("proto"), f.get("port"), f.get("local")
        if proto not in held or not isinstance(port, int) or not 0 < port < 65536:
            continue
        if not isinstance(local, list) or not local:
            unsure[proto].add(port)
        elif not mine.intersection(str(x) for x in local):
            held[proto].add(port)
    return held, unsure


def silent_holders(link: Any) -> dict[int, str]:
    """UDP port -> who holds it, for the ports this host's responder could not bind because a
    socket on the wildcard or the probed address holds them that is not a portmesh responder:
    a kernel socket (a VXLAN/WireGuard device: ``kernel``) or another process. Unlike a TCP
    listener (which answers a SYN) such a holder ignores our datagram: silence there cannot be
    told from a drop (docs/mesh.md, "Ports the responder could not bind")."""
    out: dict[int, str] = {}
    rec = link.ready_rec
    if link.failed is not None or not isinstance(rec, dict):
        return out
    mine = {link.host.address, *WILDCARDS}
    for f in rec.get("failed") or ():
        if not isinstance(f, dict) or f.get("proto") != "udp":
            continue
        port, local, process = f.get("port"), f.get("local"), f.get("process")
        if not isinstance(port, int) or not 0 < port < 65536 or not isinstance(local, list):
            continue
        if not mine.intersection(str(x) for x in local):
            continue
        if process == RESPONDER_COMM:
            # a portmesh responder answers our datagram - unless it has another secret
            if rec.get("holder_secret") == "other":
                out[port] = SECRET_MISMATCH
            continue
        if f.get("kernel") is True:
            out[port] = "kernel"
        elif isinstance(process, str) and process:
            pid = f.get("pid")
            out[port] = f"{process}[{pid}]" if isinstance(pid, int) else process
        else:
            out[port] = "unknown-socket"
    return out


def silent_ports(links: list[Any]) -> dict[str, dict[str, str]]:
    """address -> {port: holder}: ``silent_holders`` of every host (the probe message's
    ``silent``); the agents make UDP silence there unknown, saying who holds the port."""
    out: dict[str, dict[str, str]] = {}
    for link in links:
        ports = silent_holders(link)
        if ports:
            out[link.host.address] = {str(p): h for p, h in sorted(ports.items())}
    return out


def unbound_ports(links: list[Any]) -> dict[str, dict[str, str]]:
    """address -> {"tcp": ranges, "udp": ranges}: the ports each host's responder could not
    bind because a socket bound to another address holds them (``held_ports``). The agents'
    verdicts need them: a reset from such a port is an answer from the host itself, not a
    firewall's reject (scanner.mesh.agent)."""
    return _by_address(links, 0)


def unsure_ports(links: list[Any]) -> dict[str, dict[str, str]]:
    """address -> {"tcp": ranges, "udp": ranges}: ports a responder could not bind where
    nothing tells who answers (``held_ports``): the agents make a reset there unknown."""
    return _by_address(links, 1)


def _by_address(links: list[Any], which: int) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for link in links:
        ports = held_ports(link)[which]
        if ports["tcp"] or ports["udp"]:
            out[link.host.address] = {p: ranges(v) for p, v in ports.items()}
    return out


def unique_hosts(site: Any) -> list[Any]:
    seen: set[str] = set()
    out = []
    for h in site.hosts():
        if h.name not in seen:
            seen.add(h.name)
            out.append(h)
    return out


def catalog_files(catalog: Any) -> list[dict[str, str]]:
    """The user's catalog files (the packaged one is the agent's own)."""
    out = []
    for path in list(catalog.files)[1:]:
        with open(path, encoding="utf-8") as fh:
            out.append({"name": path, "text": fh.read()})
    return out


def engine_share(e: EngineConfig, n: int, loop: str) -> dict[str, Any]:
    """Each agent's engine settings: the totals divided by the number of agents."""
    po = e.probe_options
    conc = None if e.concurrency is None else max(1, e.concurrency // n)
    if e.rate is not None:
        # Under a rate limit, in-flight probes ~ rate x probe time; more workers only queue
        # for rate slots, and a stop (Ctrl-C) waits for every queued slot: 1,024 workers at
        # 20 probes/s is a 50 s drain (measured in the lab). Two seconds' worth is plenty.
        cap = max(8, math.ceil(e.rate / n * RATE_WINDOW))
        conc = cap if conc is None else min(conc, cap)
    return {
        "concurrency": conc,
        "rate": None if e.rate is None else e.rate / n,
        "max_per_host": e.max_per_host,
        "timeout": e.timeout,
        "min_timeout": e.min_timeout,
        "max_timeout": e.max_timeout,
        "retries": e.retries,
        "max_retries": e.max_retries,
        "vxlan_vni": po.vxlan_vni,
        "udp_payloads": {str(k): v for k, v in (po.udp_payloads or {}).items()},
        "loop": loop,
    }
