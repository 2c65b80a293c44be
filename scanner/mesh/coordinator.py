"""The mesh coordinator: an agent on every host, responders everywhere, every host probes.

Phases (each a barrier over the live agents):

  1. start  every agent through the exec template; ``hello`` (protocol version, the secret)
  2. respond  every agent starts its responder on the ports the plan probes it on; wait for
              every ``ready``
  3. probe  every agent plans its own slice (``sources={its name}``) and streams results;
            the coordinator forwards them, folds them into the pair join and the failure
            matrix, and keeps a per-agent window of plan indexes (what is still owed)
  4. stop   every agent ends its responder (the witness reports are in by then) and exits
  5. join   pair records, the summary record, the human summary on stderr

A host whose exec fails, whose agent dies, answers with an error or times out is reported
once as ``{"type":"host","name","state":"unreachable","reason"}`` and every flow it owed as a
source is emitted as ``error`` with that reason, so planned == results over every source.

Memory: O(hosts^2 x requirements) for the pair join and the matrix, O(hosts x legs) for the
responder port lists, and per agent a window of plan indexes as wide as its in-flight probes.
Nothing per flow is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import shlex
import signal
import sys
import time
from array import array
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import orjson

from scanner.core.model import natural_key
from scanner.core.results import encode, new_scan_id, start_record, summary_record
from scanner.engine.engine import EngineConfig
from scanner.engine.neigh import REASON as NEIGH_FULL
from scanner.engine.output import NdjsonOutput
from scanner.engine.process import neighbour_advice
from scanner.errors import InputError
from scanner.mesh import transport
from scanner.mesh.agent import PROTOCOL_VERSION, site_to_wire
from scanner.mesh.pairs import PairJoin, _is_v6, ranges

HELLO_TIMEOUT = 60.0  # exec + interpreter start + hello; ssh to a slow host can take seconds
READY_TIMEOUT = 60.0  # binding the NodePort range takes ~0.1 s; /proc owner lookup more
STOP_TIMEOUT = 10.0
DEFAULT_TTL = 3600.0
RATE_WINDOW = 2.0  # seconds of probes in flight per agent under --rate (see _engine_share)  # responders' own TTL: a safety net, the parent channel ends them first


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
    from scanner.plan.planner import legs

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
    from scanner.plan.planner import legs

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
    or silence there is the firewall's: the port is verdicted as if our responder held it."""
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


class Window:
    """Which plan indexes got a result: everything below ``low``, plus the set above it."""

    __slots__ = ("low", "above")

    def __init__(self) -> None:
        self.low = 0
        self.above: set[int] = set()

    def add(self, i: int) -> bool:
        """Mark i; False if it was already marked (a duplicate)."""
        if i < self.low or i in self.above:
            return False
        self.above.add(i)
        while self.low in self.above:
            self.above.discard(self.low)
            self.low += 1
        return True

    def __contains__(self, i: int) -> bool:
        return i < self.low or i in self.above


class Matrix:
    """Verdict counts, and what the human summary needs (bounded: hosts^2 x requirements).

    The summary is the text of ``portmesh report`` (scanner.report): the same grouping into
    faults ("node11 drops tcp/10250 from every peer", one-way lines) and the same matrix. A
    failing or undecided result is folded into the report's Aggregate as it comes (rare); a
    passing one only increments a counter per direction (the hot path: the coordinator forwards
    ~420,000 lines/s), merged into the Aggregate at the end (``fold``).
    """

    def __init__(self) -> None:
        from scanner.report.aggregate import Aggregate

        self.verdicts: dict[str, int] = {}
        # (req, src_host, host, over IPv6) -> passes; the rest of a direction's identity, once
        # per key. The family is part of the key: a dual-stack direction is two directions,
        # reported apart ("calico.vxlan" and "calico.vxlan over IPv6"), as portmesh report does.
        self.passes: dict[tuple[Any, Any, Any, bool], int] = {}
        self.ends: dict[tuple[Any, Any, Any, bool], tuple[Any, Any, Any]] = {}
        self.agg = Aggregate()

    def add(self, rec: dict[str, Any]) -> None:
        get = rec.get
        v = get("verdict") or "unknown"
        vs = self.verdicts
        vs[v] = vs.get(v, 0) + 1
        if v != "pass":
            self.agg.add(rec)
            return
        key = (get("req"), get("src_host"), get("host"), _is_v6(rec))
        p = self.passes
        n = p.get(key)
        if n is None:
            p[key] = 1
            self.ends[key] = (get("proto"), get("src"), get("dst"))
        else:
            p[key] = n + 1

    def add_passes(self, rec: dict[str, Any], n: int = 1) -> None:
        """``n`` passing flows of one direction that did not come through ``add``: the
        coordinator's fast path for folded passing lines, and tally records."""
        get = rec.get
        self.verdicts["pass"] = self.verdicts.get("pass", 0) + n
        key = (get("req"), get("src_host"), get("host"), _is_v6(rec))
        p = self.passes
        if key in p:
            p[key] += n
        else:
            p[key] = n
            self.ends[key] = (get("proto"), get("src"), get("dst"))

    def fold(self, mesh: Mesh, summary: dict[str, Any]) -> Any:
        """The report's Run of this mesh: passes merged, port labels from the plan."""
        from scanner.plan.planner import legs
        from scanner.report.aggregate import IPV6_SUFFIX

        agg = self.agg
        run = agg.run(mesh.scan_id)
        run.argv, run.planned, run.summary, run.starts = mesh.cfg.argv, mesh.planned, summary, 1
        for key, n in self.passes.items():
            req, sh, host, v6 = key
            proto, src, dst = self.ends[key]
            src_name = sh or src or "(local)"
            name = (req or f"{proto}") + (IPV6_SUFFIX if v6 else "")
            agg.add_passes(run, name, str(proto), (src_name, src), (host or dst, dst), n)
        for name, reason in mesh.unreachable.items():
            run.unreachable[name] = reason
            run.host(name)
        for leg in legs(mesh.cfg.catalog, mesh.cfg.site, mesh.selection):
            r = run.reqs.get(leg.req.id + (IPV6_SUFFIX if leg.af == "ipv6" else ""))
            if r is not None and leg.srcs and leg.dsts:
                for p in leg.ports:
                    if p is not None:
                        r.ports.add(p)
        return run


# ---- one agent ------------------------------------------------------------------------------


class AgentLink:
    """The coordinator's side of one agent: its process, its phase futures, its window."""

    def __init__(self, mesh: Mesh, host: Any, parts: tuple[list[str], list[str]]) -> None:
        self.mesh = mesh
        self.host = host
        self.name: str = host.name
        self.prefix, self.agent = parts  # the exec template's words, the agent command's
        self.argv = transport.command_argv(*parts)
        self.proc: asyncio.subprocess.Process | None = None
        self.window = Window()
        # --emit failures: the plan indexes of the lines received (the passing flows never
        # come one by one, so no window can close over them); 8 bytes per failing flow
        self.got: array[int] | None = array("Q") if mesh.cfg.emit == "failures" else None
        self.tallied = 0
        self.jidx: int | None = mesh.join.index.get(self.name)  # this host in the pair join
        self.results = 0
        self.planned = mesh.planned_by.get(self.name, 0)
        self.failed: str | None = None
        self.stderr: deque[str] = deque(maxlen=8)
        self.waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.reader: asyncio.Task[None] | None = None
        self.err_reader: asyncio.Task[None] | None = None
        self.eof = asyncio.get_running_loop().create_future()
        self.done_rec: dict[str, Any] | None = None
        self.exit_rec: dict[str, Any] | None = None
        self.hello_rec: dict[str, Any] | None = None
        self.ready_rec: dict[str, Any] | None = None

    # -- I/O ---------------------------------------------------------------------------------

    def send(self, msg: dict[str, Any]) -> None:
        p = self.proc
        if p is None or p.stdin is None or p.stdin.is_closing():
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            p.stdin.write(orjson.dumps(msg) + b"\n")

    async def expect(self, kind: str, timeout: float | None) -> dict[str, Any]:
        """Wait for the next record of this kind (or the agent's end / an error record)."""
        fut = asyncio.get_running_loop().create_future()
        self.waiting[kind] = fut
        waits = [fut, self.eof]
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        self.waiting.pop(kind, None)
        if fut in done:
            return fut.result()
        if self.eof.done():
            raise AgentFailed(self.eof.result())
        fut.cancel()
        raise AgentFailed(f"no {kind} record within {timeout:g} s")

    async def start(self, payload: bytes | None) -> None:
        try:
            self.proc = await transport.start(self.argv)
        except OSError as e:
            raise AgentFailed(f"exec failed: {self.argv[0]}: {e.strerror or e}") from None
        self.reader = asyncio.create_task(self._read())
        self.err_reader = asyncio.create_task(self._read_err())
        if payload is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(payload)
            await self.drain()

    async def drain(self) -> None:
        """Wait until what was written is in the pipe: bounds the coordinator's buffers."""
        p = self.proc
        if p is not None and p.stdin is not None and not p.stdin.is_closing():
            with contextlib.suppress(ConnectionError, RuntimeError):
                await p.stdin.drain()

    async def send_raw(self, data: bytes) -> None:
        p = self.proc
        if p is None or p.stdin is None or p.stdin.is_closing():
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            p.stdin.write(data)
        await self.drain()

    async def _read_err(self) -> None:
        p = self.proc
        assert p is not None and p.stderr is not None
        while True:
            try:
                line = await p.stderr.readline()
            except (ValueError, asyncio.LimitOverrunError):
                continue
            if not line:
                return
            text = line.decode("utf-8", "replace").strip()
            if text:
                self.stderr.append(text[:300])

    async def _read(self) -> None:
        p = self.proc
        assert p is not None and p.stdout is not None
        mesh = self.mesh
        on_result = mesh.on_result
        loads = orjson.loads
        async for lines in transport.ndjson_lines(p.stdout):
            for line in lines:
                try:
                    rec = loads(line)
                except orjson.JSONDecodeError:
                    continue  # a peer's garbage never ends the reader
                if rec.__class__ is not dict:
                    continue
                if rec.get("type") == "result":
                    if self.failed is None:
                        on_result(self, rec, line)
                else:
                    self._control(rec)
            del lines
        code = await p.wait()
        await asyncio.sleep(0)  # let the stderr reader catch up with the last lines
        if self.err_reader is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self.err_reader), 1.0)
        tail = f": {self.stderr[-1]}" if self.stderr else ""
        if self.hello_rec is None:
            tail += transport.start_hint(self.prefix, self.agent, code, "\n".join(self.stderr))
        if not self.eof.done():
            self.eof.set_result(f"the agent exited with status {code}{tail}")

    def _control(self, rec: dict[str, Any]) -> None:
        """Every record of an agent but its results."""
        mesh = self.mesh
        t = rec.get("type")
        if t == "witness":
            mesh.join.witness(rec)
            return
        if t == "done":
            tallies = rec.pop("tallies", None)
            if tallies and self.failed is None:
                mesh.on_tallies(self, tallies)
            self.done_rec = rec
        elif t == "exit":
            self.exit_rec = rec
        elif t == "probing" and rec.get("planned") != self.planned:
            self._resolve_error(
                f"the agent planned {rec.get('planned')} flows, the coordinator "
                f"{self.planned} (different portmesh versions on the two ends?)"
            )
            return
        elif t == "error":
            self._resolve_error(f"agent error: {rec.get('reason')}")
            return
        fut = self.waiting.get(t) if isinstance(t, str) else None
        if fut is not None and not fut.done():
            fut.set_result(rec)

    def _resolve_error(self, reason: str) -> None:
        # fail at once: not one more line of this agent may be counted
        self.mesh.fail(self, reason)
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(AgentFailed(reason))

    def kill(self) -> None:
        p = self.proc
        if p is not None and p.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                p.kill()


class AgentFailed(Exception):
    pass


# ---- the mesh -------------------------------------------------------------------------------


class Mesh:
    def __init__(self, cfg: MeshConfig) -> None:
        self.cfg = cfg
        self.out = cfg.output or NdjsonOutput()
        self.scan_id = new_scan_id()
        self.hosts = _unique_hosts(cfg.site)
        names = frozenset(h.name for h in self.hosts)
        self.selection = dataclasses.replace(cfg.selection, sources=names, scanner=None)
        self.planned_by = per_source_counts(cfg.catalog, cfg.site, self.selection)
        self.planned = sum(self.planned_by.values())
        self.join = PairJoin(names)
        self.matrix = Matrix()
        self.states: Counter[str] = Counter()
        self.results = 0
        self.tallied = 0  # --emit failures: passing flows counted in tally records
        self.neigh_full = 0  # flows unknown because an agent's neighbour table was full
        self.links: list[AgentLink] = []
        self.unreachable: dict[str, str] = {}
        self.interrupted = False
        self.t0 = time.perf_counter()
        # agent name -> addresses its packets left from that are not its inventory address
        self.moved: dict[str, set[str]] = {}
        self.check_exec()

    def check_exec(self) -> None:
        """Refuse a template that names hosts but gives two of them the same command: both
        agents would run on one machine and probe from it under two names (Kubean's node1 of
        two clusters with ``ip netns exec LAB-{name}``). A template without placeholders
        (``env``: every agent here) is the operator's explicit choice."""
        tpl = self.cfg.exec_template or ""
        if not tpl or not any("{" + p + "}" in tpl for p in transport.PLACEHOLDERS):
            return
        seen: dict[tuple[str, ...], str] = {}
        for h in self.hosts:
            words = tuple(transport.render(tpl, h.inventory_name, h.address, h.user, h.cluster))
            other = seen.setdefault(words, h.name)
            if other != h.name:
                raise InputError(
                    f"--exec {tpl!r} gives {other} and {h.name} the same command "
                    f"({shlex.join(words)}): both agents would run on one machine; "
                    "tell them apart with {cluster} or {address}"
                )

    # -- results -----------------------------------------------------------------------------

    def on_result(self, link: AgentLink, rec: dict[str, Any], line: bytes) -> None:
        """One result line of an agent (the hot path: 26 million calls at 1,000 hosts)."""
        i = rec.pop("i", None)
        if i.__class__ is int:
            w = link.window
            if link.got is not None:
                link.got.append(i)  # type: ignore[arg-type]
            elif i == w.low and not w.above:
                w.low = i + 1  # type: ignore[operator]  # in order: the common case
            elif not w.add(i):  # type: ignore[arg-type]
                return  # a duplicate line: every flow has exactly one result
        link.results += 1
        src = rec.get("src")
        if (
            src is not None
            and src != link.host.address
            and src != link.host.address6
            and src != rec.get("dst")
        ):
            # the agent's packets left from another address than its host's: it runs on
            # another machine than the one named (or a multi-homed host routes so)
            self.moved.setdefault(link.name, set()).add(src)
        # forward the agent's own bytes minus the index field (it is the last one written)
        cut = line.rfind(b',"i":')
        raw = line[:cut] + b"}\n" if cut > 0 else None
        if (
            raw is not None
            and link.jidx is not None
            and self.cfg.only is None
            and rec.get("verdict") == "pass"
            and rec.get("src_host") == link.name
            and self.join.add_passing(link.jidx, rec)
        ):
            # a passing flow folded: count it and forward its bytes (what emit() does)
            self.results += 1
            state = rec.get("state", "?")
            states = self.states
            states[state] = states.get(state, 0) + 1
            self.matrix.add_passes(rec)
            self.out.write(raw)
            return
        self.emit(rec, raw)

    def on_tallies(self, link: AgentLink, tallies: list[Any]) -> None:
        """An agent's tally records (inside its ``done``): fold, count, write them."""
        for t in tallies:
            try:
                host, dst, req, proto, flows, states, ports, src = t
                rec: dict[str, Any] = {
                    "type": "tally",
                    "scan_id": self.scan_id,
                    "src_host": link.name,
                    "src": src,
                    "host": host,
                    "dst": dst,
                    "req": req,
                    "proto": proto,
                    "flows": int(flows),
                    "states": {str(k): int(v) for k, v in states.items()},
                }
            except (TypeError, ValueError, AttributeError):
                continue  # a malformed entry: its flows stay owed
            if ports:
                rec["ports"] = str(ports)
            link.tallied += rec["flows"]
            self.tallied += rec["flows"]
            for k, v in rec["states"].items():
                self.states[k] += v
            self.matrix.add_passes(rec, rec["flows"])
            self.join.add_tally(rec)
            self.out.record(rec)

    def emit(self, rec: dict[str, Any], raw: bytes | None = None) -> None:
        self.results += 1
        state = rec.get("state", "?")
        states = self.states
        states[state] = states.get(state, 0) + 1
        if state == "error" and rec.get("reason") == NEIGH_FULL:
            self.neigh_full += 1
        self.join.add(rec)
        self.matrix.add(rec)
        only = self.cfg.only
        if only is None or state in only or rec.get("verdict") in only:
            self.out.write(raw if raw is not None else encode(rec))

    def fail(self, link: AgentLink, reason: str) -> None:
        if link.failed is not None:
            return
        link.failed = reason
        if self.interrupted:
            # an agent cut short by the operator's Ctrl-C is not an unreachable host
            link.failed = "interrupted"
            link.kill()
            return
        self.unreachable[link.name] = reason
        link.kill()
        self.out.record(
            {
                "type": "host",
                "scan_id": self.scan_id,
                "name": link.name,
                "address": link.host.address,
                "state": "unreachable",
                "reason": reason,
            }
        )
        self.out.flush()

    def owed(self, link: AgentLink, reason: str) -> None:
        """Every flow of this source without a result: error with the host's reason."""
        from scanner.core.results import iso_ts
        from scanner.plan.planner import plan

        sel = dataclasses.replace(self.selection, sources=frozenset({link.name}))
        ts = iso_ts(time.time())
        got = set(link.got) if link.got is not None else None
        for i, f in enumerate(plan(self.cfg.catalog, self.cfg.site, sel)):
            if got is not None:
                if i in got:
                    continue
            elif i in link.window:
                continue
            else:
                link.window.add(i)
            rec = {
                "type": "result",
                "scan_id": self.scan_id,
                "ts": ts,
                "src": f.src,
                "dst": f.dst,
                "af": f.af,
                "host": f.host,
                "proto": f.proto,
                "port": f.port,
                "state": "error",
                "reason": reason,
                "rtt_ms": None,
                "attempts": 0,
                "src_host": f.src_host,
                "req": f.req,
                "verdict": "unknown",
            }
            self.emit(rec)

    # -- phases ------------------------------------------------------------------------------

    def agent_argv(self, host: Any) -> list[str]:
        return transport.command_argv(*self.agent_parts(host))

    def agent_parts(self, host: Any) -> tuple[list[str], list[str]]:
        """(the exec template's words for this host, the agent command's words)."""
        cfg = self.cfg
        tpl = cfg.exec_template or transport.default_template(host.user)
        prefix = transport.render(tpl, host.inventory_name, host.address, host.user, host.cluster)
        if cfg.bundle is not None:
            agent = transport.bootstrap_argv(cfg.bundle_python)
        else:
            agent = transport.agent_words(prefix, cfg.agent_cmd)
        return prefix, agent

    async def _phase(self, links: list[AgentLink], step: Any) -> None:
        async def one(link: AgentLink) -> None:
            if link.failed is not None:
                return
            try:
                await step(link)
            except AgentFailed as e:
                self.fail(link, str(e))

        await asyncio.gather(*(one(x) for x in links))

    def live(self) -> list[AgentLink]:
        return [x for x in self.links if x.failed is None]

    async def run(self) -> None:
        cfg = self.cfg
        from scanner.core.tags import new_secret

        given = cfg.engine.probe_options.secret
        # a given secret (--secret-file) is shared with responders that already run on the
        # hosts (a lab's): their ports answer our probes as our own responders would
        secret = given.decode() if given else new_secret().decode()
        payload = transport.bundle_payload(cfg.bundle) if cfg.bundle else None
        ports = responder_ports(cfg.catalog, cfg.site, self.selection, cfg.withhold)
        self.links = [AgentLink(self, h, self.agent_parts(h)) for h in self.hosts]

        gate = asyncio.Semaphore(cfg.forks)

        async def hello(link: AgentLink) -> None:
            async with gate:  # at most `forks` execs (and bundle copies) in progress
                await link.start(payload)
            link.send(
                {
                    "type": "hello",
                    "version": PROTOCOL_VERSION,
                    "secret": secret,
                    "name": link.name,
                    "roles": sorted(link.host.roles),
                }
            )
            link.hello_rec = await link.expect("hello", cfg.hello_timeout)

        async def respond(link: AgentLink) -> None:
            tcp, udp = ports.get(link.name, ("", ""))
            msg = {"type": "respond", "tcp": tcp, "udp": udp, "ttl": cfg.ttl,
                   "witness": cfg.witness,
                   # where the peers probe it: a port held on 127.0.0.1 is answered there
                   "addr": link.host.address}  # fmt: skip
            if cfg.local_bind:
                msg["bind"] = link.host.address
            link.send(msg)
            link.ready_rec = await link.expect("ready", cfg.ready_timeout)

        await self._phase(self.links, hello)
        if not self.interrupted:
            await self._phase(self.live(), respond)
        live = self.live()
        probe_msg = {
            "type": "probe",
            "scan_id": self.scan_id,
            "site": site_to_wire(cfg.site),
            "catalog": {"files": _catalog_files(cfg.catalog)},
            "selection": {
                "cni": self.selection.cni,
                "with": sorted(self.selection.with_features),
                "without": sorted(self.selection.without_features),
                "nodeport_sample": self.selection.nodeport_sample,
            },
            "engine": _engine_share(cfg.engine, max(1, len(live)), cfg.loop),
            "expect": cfg.expect,
            "emit": cfg.emit,
            "unbound": unbound_ports(self.links),
            "unsure": unsure_ports(self.links),
        }
        if cfg.local_bind:
            probe_msg["from_own_address"] = True
        probe = orjson.dumps(probe_msg) + b"\n"  # encoded once: the same bytes for every agent

        async def probe_one(link: AgentLink) -> None:
            await link.send_raw(probe)
            if self.interrupted:
                link.send({"type": "stop"})
            await link.expect("done", None)

        if not self.interrupted:
            await self._phase(live, probe_one)

        async def stop(link: AgentLink) -> None:
            link.send({"type": "stop"})
            with contextlib.suppress(AgentFailed):
                await link.expect("exit-of-agent", STOP_TIMEOUT)

        await self._phase(self.live(), stop)
        for link in self.links:
            link.kill()
            if link.reader is not None:
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(link.reader, 2.0)
        for link in self.links:
            if link.failed == "interrupted" and link.name not in self.unreachable:
                self.owed(link, "interrupted")
            elif link.failed is not None:
                self.owed(link, f"agent unreachable: {link.failed}")
            elif link.got is not None and link.tallied:
                if link.results + link.tallied != link.planned:
                    # its tallies are counted: owed() cannot tell which flows they covered
                    sys.stderr.write(
                        f"portmesh mesh: {link.name}: {link.results} results + {link.tallied} "
                        f"tallied != {link.planned} planned (agent bug?)\n"
                    )
            elif (
                link.got is None and link.window.low < link.planned
            ) or link.results < link.planned:
                # the agent ended without every result (interrupted before it probed, or it
                # said done too early): never silently lose a flow
                why = "interrupted" if self.interrupted else "the agent ended without a result"
                self.owed(link, why)

    def interrupt(self) -> None:
        """Ctrl-C: every agent stops launching probes and reports the rest as interrupted."""
        if self.interrupted:
            for link in self.links:
                link.kill()
            return
        self.interrupted = True
        for link in self.live():
            link.send({"type": "stop"})


def _unique_hosts(site: Any) -> list[Any]:
    seen: set[str] = set()
    out = []
    for h in site.hosts():
        if h.name not in seen:
            seen.add(h.name)
            out.append(h)
    return out


def _catalog_files(catalog: Any) -> list[dict[str, str]]:
    """The user's catalog files (the packaged one is the agent's own)."""
    out = []
    for path in list(catalog.files)[1:]:
        with open(path, encoding="utf-8") as fh:
            out.append({"name": path, "text": fh.read()})
    return out


def _engine_share(e: EngineConfig, n: int, loop: str) -> dict[str, Any]:
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


# ---- the entry point ------------------------------------------------------------------------


def run_mesh(cfg: MeshConfig) -> int:
    """Run the mesh; exit code 0 no flow fails and every host answered (unknown flows do not
    change it: they are counted and their pairs listed as UNKNOWN on stderr), 1 any fail or
    unreachable host, 130 interrupted."""
    from scanner.core.privileges import raise_nofile
    from scanner.plan.planner import plan_meta

    raise_nofile()  # three pipes per agent
    mesh = Mesh(cfg)
    out = mesh.out
    out.record(
        start_record(
            mesh.scan_id,
            cfg.argv,
            mesh.planned,
            mesh={
                "hosts": len(mesh.hosts),
                "exec": cfg.exec_template or "ssh -o BatchMode=yes [{user}@]{address}",
                "agent_cmd": "bundle"
                if cfg.bundle is not None
                else (
                    shlex.join(mesh.agent_parts(mesh.hosts[0])[1]) if mesh.hosts else cfg.agent_cmd
                ),
                "protocol": PROTOCOL_VERSION,
            },
            plan=plan_meta(cfg.catalog, cfg.site, mesh.selection),
        )
    )
    out.flush()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, mesh.interrupt)
                installed.append(sig)

        async def ticker() -> None:
            while True:
                await asyncio.sleep(0.2)
                out.flush()
                if cfg.progress:
                    _progress(mesh)

        tick = asyncio.create_task(ticker())
        try:
            await mesh.run()
        finally:
            tick.cancel()
            for sig in installed:
                loop.remove_signal_handler(sig)
            for link in mesh.links:
                link.kill()

    asyncio.run(main())
    if cfg.progress:
        sys.stderr.write("\n")
    elapsed = time.perf_counter() - mesh.t0
    pairs: Counter[str] = Counter()
    for rec in mesh.join.pairs(mesh.scan_id):
        pairs[rec["verdict"]] += 1
        out.record(rec)
    agents = {
        link.name: {
            "planned": link.planned,
            "results": link.results,
            **({"tallied": link.tallied} if link.got is not None else {}),
            "elapsed_s": (link.done_rec or {}).get("elapsed_s"),
            "rate_pps": (link.done_rec or {}).get("rate_pps"),
            "agent": (link.hello_rec or {}).get("agent"),
            "python": (link.hello_rec or {}).get("python"),
            "module": (link.hello_rec or {}).get("module"),
        }
        for link in mesh.links
        if link.failed is None
    }
    emitted = {"emit": "failures", "tallied": mesh.tallied} if cfg.emit == "failures" else {}
    summary = summary_record(
        mesh.scan_id,
        mesh.planned,
        mesh.results,
        dict(mesh.states),
        elapsed,
        **emitted,
        verdicts={k: mesh.matrix.verdicts.get(k, 0) for k in ("pass", "fail", "unknown")},
        pairs={k: pairs.get(k, 0) for k in ("pass", "fail", "one-way", "unknown")},
        hosts={"total": len(mesh.hosts), "unreachable": sorted(mesh.unreachable, key=natural_key)},
        agents=agents,
        **({"interrupted": True} if mesh.interrupted else {}),
    )
    out.record(summary)
    out.close()
    _human(cfg.summary_to or sys.stderr, mesh, pairs, summary, elapsed)
    if mesh.interrupted:
        return 130
    if mesh.matrix.verdicts.get("fail", 0) or mesh.unreachable:
        return 1
    return 0


def _progress(mesh: Mesh) -> None:
    el = time.perf_counter() - mesh.t0
    rate = mesh.results / el if el > 0 else 0.0
    live = len(mesh.live())
    sys.stderr.write(f"\r{mesh.results}/{mesh.planned} flows  {rate:8.0f} flows/s  {live} agents  ")
    sys.stderr.flush()


def _human(
    err: TextIO, mesh: Mesh, pairs: Counter[str], summary: dict[str, Any], elapsed: float
) -> None:
    """The totals, then the run as ``portmesh report`` prints it (grouped faults, matrix)."""
    from scanner.report.text import render_run

    v = mesh.matrix.verdicts
    w = err.write
    w(
        f"portmesh mesh: {len(mesh.hosts)} hosts, {mesh.results + mesh.tallied}/{mesh.planned} "
        "flows: "
        f"{v.get('pass', 0)} pass, {v.get('fail', 0)} fail, {v.get('unknown', 0)} unknown; "
        f"pairs: {pairs.get('pass', 0)} pass, {pairs.get('one-way', 0)} one-way, "
        f"{pairs.get('fail', 0)} fail, {pairs.get('unknown', 0)} unknown ({elapsed:.1f}s)\n"
    )
    if mesh.interrupted:
        w("INTERRUPTED: flows not probed are reported as error (interrupted)\n")
    if mesh.neigh_full:
        w(neighbour_advice({"unknown": mesh.neigh_full}).replace("this host's", "the agents'"))
    addr = {h.name: h.address + (f" / {h.address6}" if h.address6 else "") for h in mesh.hosts}
    for name, srcs in sorted(mesh.moved.items()):
        w(
            f"WARNING {name}: its probes left from {', '.join(sorted(srcs))}, not its inventory "
            f"address {addr.get(name)}: its agent runs on another machine than the inventory "
            "names (check --exec), or the host routes through another of its addresses; results "
            "record the address they left from\n"
        )
    for line in render_run(mesh.matrix.fold(mesh, summary), header=False):
        w(line + "\n")
    err.flush()


def flows_of(cfg: MeshConfig, name: str) -> Iterator[Any]:
    """The planned flows of one source host (for tests and tools)."""
    from scanner.plan.planner import plan

    names = frozenset(h.name for h in _unique_hosts(cfg.site))
    sel = dataclasses.replace(cfg.selection, sources=names & {name}, scanner=None)
    return plan(cfg.catalog, cfg.site, sel)
