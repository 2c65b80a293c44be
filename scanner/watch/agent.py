"""The watch agent: one long-running loop per node (``portmesh watch``).

Every round (``round_seconds``, aligned to the wall clock so that all agents agree on the round
number) it probes the flows the schedule gives it (scanner.watch.schedule), paced under the
probe budget by the engine's rate limiter with a random start offset (jitter); then it judges
the incoming side of the previous round: for every source the schedule says visited us, on
every port our responder holds, did its probe arrive? A requirement x peer x direction changes
state only on evidence, each change is one NDJSON event line, and /metrics serves the counts
(scanner.watch.metrics). The responder binds only ports nothing else holds; ports held by a
real service are answered by that service, and their incoming side is not judged (``unknown``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import random
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scanner import __version__
from scanner.core.results import Result, iso_ts
from scanner.core.verdicts import verdict
from scanner.engine.engine import Engine, EngineConfig
from scanner.engine.output import NdjsonOutput
from scanner.errors import InputError
from scanner.plan.inventory import local_addresses
from scanner.plan.planner import legs
from scanner.responder.server import Responder
from scanner.watch import incoming, schedule
from scanner.watch.metrics import WatchMetrics

try:  # optional: without it the watch runs on asyncio's own loop
    import uvloop
except ImportError:
    uvloop = None  # type: ignore[assignment]

DEFAULT_ROUND = 15.0  # seconds: the shortest round; longer when the budget needs it
ROUND_MARGIN = 1.5  # rounds are sized for 1.5x the probes they hold (retries, start-up, jitter)
DEFAULT_RATE = 20.0  # probes per second per node
DEFAULT_NEIGHBOURS = 16
DEFAULT_CHUNK = 8  # ports of a long range (NodePorts) per visit


@dataclass
class WatchConfig:
    catalog: Any
    site: Any
    selection: Any  # scanner.plan.selection.Selection (no source filter: the whole plan)
    me: str  # this node's inventory name
    secret: bytes
    metrics: tuple[str, int] | None = None  # (host, port) of the /metrics server
    round_seconds: float = DEFAULT_ROUND
    rate: float = DEFAULT_RATE
    neighbours: int = DEFAULT_NEIGHBOURS
    chunk: int = DEFAULT_CHUNK
    timeout: float = 1.0
    bind: str = "0.0.0.0"
    output: NdjsonOutput | None = None
    rounds: int | None = None  # stop after this many rounds (tests); None = until a signal
    engine: EngineConfig = field(default_factory=EngineConfig)
    on_ready: Callable[[dict[str, Any]], None] | None = None


class PairStates:
    """The last verdict per (requirement, peer, direction); one event record per change.

    An event is shaped like a result record (src, dst, host, proto, port, state, reason, req,
    verdict) plus the watch fields (node, peer, direction, from, to), so ``portmesh report``
    turns a watch stream into ECS events and a heatmap of the latest states.
    """

    def __init__(self, me: str, out: NdjsonOutput) -> None:
        self.me = me
        self.out = out
        self.state: dict[tuple[str, str, str], str] = {}

    def set(self, req: str, peer: str, direction: str, new: str, flow: dict[str, Any]) -> None:
        key = (req, peer, direction)
        old = self.state.get(key, "unknown")
        if new == "unknown" and key not in self.state:
            return
        self.state[key] = new
        if new != old:
            self.out.record(
                {
                    "type": "watch",
                    "ts": iso_ts(time.time()),
                    **flow,
                    "req": req,
                    "verdict": new,
                    "node": self.me,
                    "peer": peer,
                    "direction": direction,
                    "from": old,
                    "to": new,
                }
            )

    def failing(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = defaultdict(int)
        for (req, _peer, d), v in self.state.items():
            if v == "fail":
                out[(req, d)] += 1
        return out

    def one_way(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for (req, peer, d), v in self.state.items():
            if (
                d == "outgoing"
                and v == "fail"
                and self.state.get((req, peer, "incoming")) == "pass"
            ):
                out[req] += 1
        return out


def run_watch(cfg: WatchConfig) -> int:
    runner = getattr(uvloop, "run", None) or asyncio.run  # uvloop.run: uvloop >= 0.18
    return runner(_main(cfg))


async def _main(cfg: WatchConfig) -> int:
    loop = asyncio.get_running_loop()
    topo = schedule.Topology.from_legs(legs(cfg.catalog, cfg.site, cfg.selection))
    me = cfg.me
    if me not in topo.names:
        raise InputError(f"--as: {me!r} has no requirement in the plan of this inventory")
    i = topo.index(me)
    my_addr = topo.addrs[i]
    if topo.unwatched:
        # never silently check less: say what the plan asks that this watch does not probe
        said = ", ".join(f"{req} over {af.replace('ipv', 'IPv')}" for req, af in topo.unwatched)
        print(
            f"portmesh watch: not watched (one address per node, {my_addr}): {said}; "
            "check those with `portmesh check` or `portmesh mesh`",
            file=sys.stderr,
            flush=True,
        )
    bind = cfg.bind
    if bind == "0.0.0.0" and ":" in my_addr:
        bind = "::"  # an IPv6 cluster: the default bind would refuse every probe to us
    k, chunk = cfg.neighbours, cfg.chunk
    # A round must hold its probes at the budget, or an agent would skip rounds and its peers
    # would wait for probes that never come. Every agent computes the same bound from the same
    # plan, so every agent picks the same round length.
    period = round_length(topo, k, chunk, cfg.rate, cfg.round_seconds)
    peers = topo.peers_of(me)
    sources = topo.sources_of(me)
    out_needs = {n.req: n.proto for p in peers for n in topo.needs(me, p)}
    in_needs = {n.req: n.proto for s in sources for n in topo.needs(s, me)}
    protos = set(out_needs.values())
    # series only for the directions that exist on this node: outgoing for what it sends,
    # incoming for the TCP/UDP it receives (what a responder can witness)
    metrics = WatchMetrics(
        __version__,
        me,
        protos,
        outgoing=set(out_needs),
        incoming={q for q, proto in in_needs.items() if proto in ("tcp", "udp")},
    )
    metrics.peers = len(peers)
    metrics.budget = cfg.rate
    metrics.schedule = schedule.fingerprint(topo, period, k, chunk)
    out = cfg.output or NdjsonOutput()
    states = PairStates(me, out)

    # the responder: every port we are a destination of, except what is already held
    tcp_ports: set[int] = set()
    udp_ports: set[int] = set()
    for s in sources:
        for n in topo.needs(s, me):
            target = tcp_ports if n.proto == "tcp" else udp_ports if n.proto == "udp" else None
            if target is not None:
                target.update(p for p in n.ports if p is not None)
    # (source address, proto, port) -> when its last probe arrived; pruned every round
    hits: dict[tuple[str, str, int], float] = {}
    # source address -> when its probes arrived, per round: did that sender run a round at all?
    heard = incoming.Arrivals(period)

    def on_hit(proto: str, src: str, port: int) -> None:
        now = time.time()
        hits[(src, proto, port)] = now
        heard.add(src, now)

    responder = Responder(sorted(tcp_ports), sorted(udp_ports), cfg.secret, bind=bind)
    responder.on_hit = on_hit
    responder.start(loop)
    up_since = time.time()  # rounds that began before this are not judged (incoming)
    bound = {("tcp", p) for p in responder.bound_tcp} | {("udp", p) for p in responder.bound_udp}
    if responder.failed:
        wanted = len(tcp_ports) + len(udp_ports)
        print(
            f"portmesh watch: {len(responder.failed)} of {wanted} ports are held by other programs"
            " (a real service, another responder): their incoming side is not judged",
            file=sys.stderr,
            flush=True,
        )

    server = None
    if cfg.metrics is not None:
        server = await asyncio.start_server(
            lambda r, w: _serve_http(r, w, metrics), cfg.metrics[0], cfg.metrics[1]
        )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    per_sweep = schedule.rounds_per_sweep(topo.n, k)
    out.record(
        {
            "type": "watch_start",
            "ts": iso_ts(time.time()),
            "node": me,
            "addr": my_addr,
            "peers": len(peers),
            "sources": len(sources),
            "round_seconds": period,
            "rounds_per_sweep": per_sweep,
            "neighbours": k,
            "rate": cfg.rate,
            "schedule": metrics.schedule,
            "responder": {"bound": len(bound), "failed": len(responder.failed)},
            "not_watched": [{"req": req, "af": af} for req, af in topo.unwatched],
            "metrics": None if cfg.metrics is None else f"{cfg.metrics[0]}:{cfg.metrics[1]}",
        }
    )
    out.flush()
    if cfg.on_ready is not None:
        cfg.on_ready({"node": me, "bound": len(bound)})
    engine_cfg = dataclasses.replace(
        cfg.engine,
        rate=cfg.rate,
        timeout=cfg.timeout,
        concurrency=cfg.engine.concurrency or 64,
        # probes leave from this node's inventory address when it is ours, so the receivers
        # (who count arrivals by that address) see them as this node's on a multi-homed host
        probe_options=dataclasses.replace(
            cfg.engine.probe_options,
            secret=cfg.secret,
            source=my_addr if my_addr in local_addresses() else None,
        ),
        tcp_method="connect",
        protos=tuple(sorted(protos)),
    )
    sweep_visits = sweep_judged = 0
    in_expected: set[str] = set()
    in_arrived: set[str] = set()
    done_rounds = 0
    judge = incoming.IncomingJudge()
    # (req, peer) -> ports that failed on their last visit: a long range is probed a window at
    # a time, so a failing port keeps its requirement failing until that port passes again
    bad_out: dict[tuple[str, str], dict[int | None, dict[str, Any]]] = defaultdict(dict)
    metrics.sweep_seconds = per_sweep * period
    rnd = int(time.time() // period)
    try:
        while not stop.is_set():
            # wait for the round's start plus a jitter of up to a tenth of the round
            start = rnd * period + random.uniform(0, period / 10)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, start - time.time()))
            if stop.is_set():
                break
            # outgoing: probe this round's flows, fold them per (req, peer); a round whose
            # probes can no longer all leave before it ends (a late start or restart, a pause,
            # an overrun) is not probed at all: its receivers would count a half-arrived visit
            # as a miss, and the next late one as a drop
            flows = schedule.round_flows(topo, me, rnd, k, chunk)
            if not schedule.fits(rnd, period, time.time(), len(flows), cfg.rate):
                flows = []
            folded: dict[tuple[str, str], list[Result]] = defaultdict(list)

            def emit(r: Result, folded: dict = folded) -> None:
                v = verdict(r.flow.proto, r.state, "reachable", False)
                r.verdict = v
                metrics.probe(r.flow.proto, v, None if r.rtt_ms is None else r.rtt_ms / 1000)
                folded[(r.flow.req or "-", r.flow.host or r.flow.dst)].append(r)

            if flows:
                await Engine(engine_cfg, emit).run(iter(flows))
            for (req, peer), results in folded.items():
                bad = bad_out[(req, peer)]
                passed = False
                for r in results:
                    f = r.flow
                    if r.verdict == "fail":
                        bad[f.port] = {
                            "src": f.src,
                            "src_host": me,
                            "dst": f.dst,
                            "host": peer,
                            "proto": f.proto,
                            "port": f.port,
                            "state": r.state,
                            "reason": r.reason,
                        }
                    elif r.verdict == "pass":
                        bad.pop(f.port, None)
                        passed = True
                if bad:
                    new = "fail"
                elif passed:
                    new = "pass"
                else:
                    new = "unknown"
                f = results[0].flow
                flow = (
                    next(iter(bad.values()))
                    if bad
                    else {
                        "src": f.src,
                        "src_host": me,
                        "dst": f.dst,
                        "host": peer,
                        "proto": f.proto,
                        "port": f.port,
                        "state": results[0].state,
                        "reason": results[0].reason,
                    }
                )
                states.set(req, peer, "outgoing", new, flow)
                if not bad:
                    bad_out.pop((req, peer), None)
                sweep_visits += 1
                sweep_judged += new != "unknown"
            # incoming: the previous round's visitors, judged now that a whole round has passed
            # (not a round that began before our responder listened: its early probes were
            # refused by the kernel, and a half-arrived visit would look like a drop)
            if done_rounds >= 1 and incoming.judgeable(rnd - 1, period, up_since):
                since = incoming.earliest(rnd - 1, period)
                for src, need, ports in schedule.expected_incoming(topo, me, rnd - 1, k, chunk):
                    witnessable = [p for p in ports if (need.proto, p) in bound]
                    if not witnessable:
                        continue  # a real service or the kernel holds it: not judged here
                    in_expected.add(src)
                    saddr = topo.addrs[topo.index(src)]
                    got = [p for p in witnessable if hits.get((saddr, need.proto, p), 0.0) >= since]
                    if got:
                        in_arrived.add(src)
                    alive = heard.arrived(saddr, rnd - 1, incoming.ALIVE_EARLY)
                    said = judge.judge((need.req, src), witnessable, got, alive)
                    if said is None:
                        continue
                    new, bad_ports = said
                    flow = {
                        "src": saddr,
                        "src_host": src,
                        "dst": my_addr,
                        "host": me,
                        "proto": need.proto,
                        "port": bad_ports[0] if bad_ports else got[0],
                        "state": "filtered" if bad_ports else "open",
                        "reason": "never-arrived" if bad_ports else "witnessed",
                    }
                    states.set(need.req, src, "incoming", new, flow)
            old = rnd * period - 3 * period
            for hk in [hk for hk, ts in hits.items() if ts < old]:
                del hits[hk]
            heard.prune(rnd - 3)
            done_rounds += 1
            metrics.rounds = done_rounds
            failing = states.failing()
            for key in metrics.failing:
                metrics.failing[key] = failing.get(key, 0)
            metrics.one_way = sum(states.one_way().values())
            if done_rounds % per_sweep == 0:
                metrics.coverage = sweep_judged / sweep_visits if sweep_visits else 1.0
                metrics.last_sweep = time.time()
                metrics.incoming_expected = len(in_expected)
                metrics.incoming_silent = len(in_expected - in_arrived)
                sweep_visits = sweep_judged = 0
                in_expected, in_arrived = set(), set()
            out.flush()
            if cfg.rounds is not None and done_rounds >= cfg.rounds:
                break
            rnd = max(rnd + 1, int(time.time() // period))  # an overrun skips rounds
    finally:
        responder.close()
        if server is not None:
            server.close()
        out.record({"type": "watch_exit", "ts": iso_ts(time.time()), "rounds": done_rounds})
        out.close()
    return 0


def round_length(topo: schedule.Topology, k: int, chunk: int, rate: float, floor: float) -> float:
    need = schedule.max_probes_per_round(topo, k, chunk) / rate * ROUND_MARGIN
    return max(floor, float(math.ceil(need)))


async def _serve_http(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, metrics: WatchMetrics
) -> None:
    """A minimal HTTP/1.0 responder: GET /metrics and /healthz; one request per connection."""
    try:
        line = await asyncio.wait_for(reader.readline(), 5)
        while True:  # skip the headers
            h = await asyncio.wait_for(reader.readline(), 5)
            if h in (b"\r\n", b"\n", b""):
                break
        parts = line.decode("latin-1").split()
        path = parts[1] if len(parts) >= 2 else ""
        if parts[:1] == ["GET"] and path.split("?")[0] == "/metrics":
            body = metrics.render().encode()
            status, ctype = "200 OK", "text/plain; version=0.0.4; charset=utf-8"
        elif parts[:1] == ["GET"] and path == "/healthz":
            body, status, ctype = b"ok\n", "200 OK", "text/plain"
        else:
            body, status, ctype = b"not found\n", "404 Not Found", "text/plain"
        writer.write(
            f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
    except (asyncio.TimeoutError, ConnectionError, OSError):
        pass
    finally:
        writer.close()
