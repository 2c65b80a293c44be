"""The engine: a fixed pool of workers pulls flows from a generator and runs probes.

Memory is O(concurrency), not O(flows): nothing is created per flow but the probe's own
socket, future and timer. A stateless probe (raw SYN) runs as a batch instead
(scanner.engine.sweep): no coroutine, future or timer per flow at all. The engine owns everything a probe should not care about:
  - concurrency (a fixed number of workers) and a per-destination cap;
  - a global token-bucket rate (--rate);
  - adaptive timeouts: per destination, nmap-style srtt + 4*rttvar, clamped to
    [min_timeout, max_timeout]; the first probe to a host uses the initial --timeout;
  - retries of silent attempts, raised automatically when loss is observed
    (an answer that came only on a retry is evidence of loss);
  - back-off on resource errors (EMFILE, ENFILE, EADDRNOTAVAIL), counted in the summary;
  - privileges: a probe that needs raw sockets is reported as error/needs-cap-net-raw;
  - a graceful stop (SIGINT): no new flows are launched, in-flight attempts finish without
    further retries, and every flow not probed is still reported (error/interrupted), so
    planned == results always holds. A flow whose last attempt was silent and that still had
    retries left is interrupted too: its silence so far is not its result.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import ipaddress
import itertools
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from scanner.core.flows import Flow
from scanner.core.privileges import can_raw, fd_budget
from scanner.core.results import Result
from scanner.engine.neigh import PAUSES as NEIGH_PAUSES
from scanner.engine.neigh import REASON as NEIGH_FULL
from scanner.engine.neigh import RETRIES as NEIGH_RETRIES
from scanner.engine.neigh import NeighGuard
from scanner.engine.sweep import Sweep, usable
from scanner.errors import warn
from scanner.probes.base import Outcome, ProbeOptions

# Retries of a silent flow while there is no basis to estimate loss (fewer than 20 answers):
# at 20% loss, 3 attempts miss an answering port with p = 0.008; port-less probes (ICMP, IP-in-IP:
# one flow per host, so an estimate never forms) get 7 attempts, p = 1.3e-5.
PRIOR_RETRIES = 2
PRIOR_RETRIES_PORTLESS = 6

RESOURCE_REASONS = frozenset({"fd-exhausted", "no-buffers", "ephemeral-exhausted"})


_INTERRUPTED = "interrupted"


def _resolve(name: str, family: int = 0) -> asyncio.Future:
    """getaddrinfo(name) in a daemon thread (the loop's executor would be joined at exit);
    ``family``: AF_INET / AF_INET6 for a name the plan reaches over that family, 0 for any."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future = loop.create_future()

    def done(result: Any, error: BaseException | None) -> None:
        if fut.cancelled():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    def work() -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            result = socket.getaddrinfo(name, None, family, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            error = _other_family(name, family) or e
        except BaseException as e:  # noqa: BLE001 - handed to the loop as is
            error = e
        with contextlib.suppress(RuntimeError):  # a closed loop: the run is over
            loop.call_soon_threadsafe(done, result, error)

    threading.Thread(target=work, name=f"resolve {name}", daemon=True).start()
    return fut


def _other_family(name: str, family: int) -> OSError | None:
    """When a lookup for one family failed: the name's addresses in the other family, as the
    reason (a name with only an AAAA record does resolve; "does not resolve" would mislead)."""
    if family == 0:
        return None
    try:
        infos = socket.getaddrinfo(name, None, 0, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return None
    addrs = sorted({str(i[4][0]) for i in infos if i[0] != family})
    if not addrs:
        return None
    want, other = ("IPv4", "IPv6") if family == socket.AF_INET else ("IPv6", "IPv4")
    return OSError(
        0,
        f"no {want} address; it resolves to {other} {', '.join(addrs[:3])} only, and this"
        f" flow is planned over {want}",
    )


@dataclass
class EngineConfig:
    concurrency: int | None = None  # None: derived from the file-descriptor budget
    rate: float | None = None  # attempts per second, all destinations together; None = unlimited
    max_per_host: int | None = None  # in-flight attempts per destination; None = concurrency
    timeout: float = 1.0  # the first attempt's timeout to a host with no RTT sample yet
    # Adaptive timeouts never go below this. nmap -T4 uses 100 ms, -T5 50 ms; ours follow the
    # kernel-measured RTT (tcp_info), not the loop-inflated one, and silent flows are retried
    # with more retries once loss is seen, so 50 ms is safe on the cluster LANs we target.
    min_timeout: float = 0.05
    max_timeout: float = 3.0  # ... nor above
    retries: int = 1  # re-probes of a silent flow, before loss is observed
    max_retries: int = 10  # the ceiling when observed loss raises the retries
    probe_options: ProbeOptions = field(default_factory=ProbeOptions)
    # protocols to start before the first flow (a prober's start() opens sockets and builds its
    # templates: cheap since the templates are packed with struct, but not in a sweep's middle)
    protos: tuple[str, ...] = ()
    # TCP: "connect" (a kernel socket per probe; no privilege), "syn" (raw half-open SYNs,
    # CAP_NET_RAW), or "auto": syn when raw sockets are allowed and no scan secret asks for
    # our responder's token (which needs a full connection), else connect. As nmap's -sS/-sT.
    tcp_method: str = "auto"
    # keep on-link destinations in flight under the neighbour table's size and retry what its
    # overflow hit (scanner.engine.neigh); False only for tests that need the raw behaviour
    neighbour_guard: bool = True
    # Stateless probes (raw SYN) run as a batch (scanner.engine.sweep) instead of a coroutine per
    # flow; False keeps them on the worker pool (benchmarks compare the two).
    sweep: bool = True
    # With a scan secret and raw sockets (mesh agents): TCP flows go as raw SYNs, except the
    # first ``token_sample`` flows of each (destination, requirement), which connect and read
    # our responder's token. 0: a secret means connect for every TCP flow (as before).
    token_sample: int = 0


# Default pool size. A sweep of 2,768 ports on a LAN host is done in ~0.3 s with 1,024
# in-flight connects; more buys nothing on two cores and costs descriptors.
DEFAULT_CONCURRENCY = 1024


class HostState:
    """RTT estimate and in-flight count of one destination."""

    __slots__ = (
        "srtt", "rttvar", "inflight", "waiters", "answered", "late", "retrying", "buckets",
        "fam", "held", "expiry", "l2_at",
    )  # fmt: skip

    def __init__(self, fam: int = 0) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.inflight = 0
        self.waiters: list[asyncio.Future] = []
        self.answered = 0
        self.late = 0  # answered only on a retry (loss evidence)
        self.retrying = 0  # flows silent at least once and still being retried
        # proto -> [tokens, last refill]: per-destination pacing a probe asks for (UDP: the far
        # kernel answers at most ~1 ICMP error per second after a burst, see probes/udp.py)
        self.buckets: dict[str, list[float]] | None = None
        # neighbour table (scanner.engine.neigh): 4/6 for an on-link destination, else 0;
        # held: counted among the active destinations; expiry: when that count lapses
        self.fam = fam
        self.held = False
        self.expiry = 0.0
        # when (perf_counter) its neighbour entry was seen resolved: attempts sent before then
        # may have waited for ARP/NDP, so their silence proves nothing (NeighGuard.settle);
        # None: not looked at yet; -inf: silences stand
        self.l2_at: float | None = None

    def note_icmp(self) -> None:
        """This destination answered with an ICMP error (any protocol's). Its kernel's ICMP
        rate limit is one per destination for every protocol: TCP rejects spend the allowance
        UDP's port-unreachables need, so a later UDP silence is pacing's business."""
        if self.buckets is None:
            self.buckets = {}
        self.buckets.setdefault("icmp", [0.0, 0.0])

    def pace(self, proto: str, pps: float, burst: int, now: float) -> float:
        """Reserve the next send slot for ``proto``; return how long to wait for it (GCRA)."""
        if self.buckets is None:
            self.buckets = {}
        b = self.buckets.get(proto)
        if b is None:
            b = self.buckets[proto] = [float(burst), now]
        tokens = min(float(burst), b[0] + (now - b[1]) * pps) - 1.0
        b[0] = tokens
        b[1] = now
        return -tokens / pps if tokens < 0 else 0.0

    def update(self, rtt_s: float) -> None:
        # RFC 6298 smoothing, as nmap does for its timeouts
        if self.srtt is None:
            self.srtt = rtt_s
            self.rttvar = rtt_s / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt_s)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt_s

    def timeout(self, cfg: EngineConfig) -> float:
        if self.srtt is None:
            return cfg.timeout
        t = self.srtt + 4 * self.rttvar
        return min(max(t, cfg.min_timeout), max(cfg.max_timeout, cfg.min_timeout))


@dataclass
class Stats:
    results: int = 0
    states: dict[str, int] = field(default_factory=dict)
    attempts: int = 0
    retries: int = 0
    late_answers: int = 0  # flows answered only on a retry
    answered: int = 0
    backoffs: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> flows not probed
    interrupted: bool = False
    tcp_method: str | None = None  # connect | syn (| mixed: see tcp_methods), once TCP ran
    # address family ("ipv4" / "ipv6") -> the TCP probe its flows used: raw SYN is IPv4 only,
    # so IPv6 TCP flows always go by connect() and the summary must say so
    tcp_methods: dict[str, str] = field(default_factory=dict)

    def note_tcp_method(self, af: str, method: str) -> None:
        self.tcp_methods[af] = method
        used = set(self.tcp_methods.values())
        self.tcp_method = used.pop() if len(used) == 1 else "mixed"

    fd_limited: tuple[int, int] | None = None  # (asked, allowed) when the fd budget cut the pool
    # what the neighbour-table guard did (scanner.engine.neigh), when it had anything to do
    neighbour: dict | None = None
    tallied: int = 0  # --emit failures: passing flows counted in tally records, not written
    tallies: list | None = None  # a shard's tally records, for its parent to merge

    def loss(self) -> float:
        """Observed loss: the share of answered flows whose first attempt(s) went unanswered."""
        return self.late_answers / self.answered if self.answered else 0.0


class Engine:
    def __init__(
        self,
        cfg: EngineConfig,
        emit: Callable[[Result], None],
        *,
        should_stop: Callable[[], bool] | None = None,
        neigh: NeighGuard | None = None,
    ) -> None:
        self.cfg = cfg
        self.neigh = neigh
        self.emit = emit
        self.stats = Stats()
        self.stopping = False
        self._should_stop = should_stop
        self.hosts: dict[str, HostState] = {}
        self.probers: dict[str, object] = {}
        self._used: dict[str, object] = {}  # probers a flow has used (key as in _V6_KEYS)
        self._methods: dict[str, tuple[str, str]] = {}  # TCP key -> (family, method)
        self._starting: dict[str, asyncio.Future] = {}
        self._next_slot = 0.0
        self.concurrency = 0
        self._tokens: dict[tuple[str, str | None], int] = {}  # token samples taken
        # destination as planned -> the address probed ("" when the name does not resolve);
        # plans carry host names only for endpoints outside the inventory (a registry's name)
        self._addrs: dict[str, str] = {}
        self._resolving: dict[str, asyncio.Future] = {}
        self._stop_event = asyncio.Event()  # set by stop(): name lookups give up at once
        self.unresolved: dict[str, str] = {}  # name -> the resolver's error, for messages
        # an exception from emit (a bug on the output side): run() ends with it (_emit)
        self.fatal: Exception | None = None
        self._task: asyncio.Task | None = None
        self._cancel_sent = False

    # -- lifecycle -------------------------------------------------------------------------
    def stop(self, interrupted: bool = True) -> None:
        """Graceful stop: launch nothing new; in-flight attempts finish without retries.

        interrupted=False is the quiet stop when nobody reads the output any more (| head).
        """
        if not self.stopping:
            self.stopping = True
            self.stats.interrupted = interrupted
            self._stop_event.set()

    async def run(self, flows: Iterator[Flow]) -> Stats:
        self._task = asyncio.current_task()
        try:
            stats = await self._run(flows)
        except asyncio.CancelledError:
            if self.fatal is not None:
                self._uncancel()
                raise self.fatal from None
            raise
        if self.fatal is not None:
            if self._cancel_sent:
                # emit failed in this very task after its last await (the lines of flows never
                # launched): our cancel is still pending; take it here, not at the caller's next
                # await (a watch agent awaits run() in its own task)
                try:
                    await asyncio.sleep(0)
                except asyncio.CancelledError:
                    self._uncancel()
            raise self.fatal
        return stats

    def _uncancel(self) -> None:
        """Forget the cancel _emit sent to this run's task (Python 3.11+ counts cancels)."""
        task = self._task
        if task is not None and hasattr(task, "uncancel"):
            task.uncancel()

    async def _run(self, flows: Iterator[Flow]) -> Stats:
        budget = fd_budget()
        n = self.cfg.concurrency or DEFAULT_CONCURRENCY
        # every in-flight attempt holds one descriptor; size the pool from what is left
        self.concurrency = max(1, min(n, budget))
        self.fd_budget = budget
        if self.concurrency < n:
            # the pool was sized down to the descriptors left (ulimit -n): say so
            self.stats.fd_limited = (n, self.concurrency)
        if self.neigh is None and self.cfg.neighbour_guard:
            self.neigh = NeighGuard.create(share=self.cfg.probe_options.shard[1])
        it = iter(flows)
        for proto in self.cfg.protos:
            await self._prober(proto)
        sweeper = None
        if self.cfg.sweep:
            # a caller that did not list its protocols: the first flow says whether TCP is in
            first = next(it, None)
            if first is not None:
                it = itertools.chain((first,), it)
                try:
                    sweeper = await self._sweeper(first)
                except asyncio.CancelledError:
                    self._emit(Result(first, "error", "interrupted", None, 0))
                    raise
        try:
            if sweeper is not None:
                await Sweep(self, sweeper, self.concurrency).run(it)
            else:
                await asyncio.gather(*(self._worker(it) for _ in range(self.concurrency)))
        finally:
            for p in self.probers.values():
                p.close()  # type: ignore[attr-defined]
            g = self.neigh
            if g is not None and (g.hits or g.unknown or g.waited or g.settled):
                self.stats.neighbour = g.report()
        # flows never launched (interrupted): still one result each
        now = time.time()
        for flow in it:
            self._emit(Result(flow, "error", "interrupted", None, 0, now))
        return self.stats

    async def _sweeper(self, first: Flow):
        """The TCP prober when it can run as a batch (raw SYN), else None (the worker pool)."""
        if "tcp" not in self.cfg.protos and first.proto != "tcp":
            return None

        p = await self._prober("tcp")
        return p if usable(p) else None

    def _check_stop(self) -> bool:
        """The runner's quiet stop (nobody reads the output any more)."""
        if self._should_stop is not None and self._should_stop():
            self.stop(interrupted=False)
            return True
        return False

    # -- per flow ----------------------------------------------------------------------------
    def _emit(self, r: Result) -> None:
        st = self.stats
        st.results += 1
        st.states[r.state] = st.states.get(r.state, 0) + 1
        try:
            self.emit(r)
        except Exception as e:  # noqa: BLE001 - kept, and raised by run()
            # The output side failed on a result (a bug): that flow's line is lost, so the run
            # cannot end honestly. Raised here, inside a socket's or a timer's callback (the
            # batch sweep), it would only be logged by the event loop, and the sweep would
            # wait for that flow for good. So: cancel the run, and run() raises this error.
            if self.fatal is None:
                self.fatal = e
                task = self._task
                if task is not None and not task.done():
                    task.cancel()
                    self._cancel_sent = True

    async def _worker(self, it: Iterator[Flow]) -> None:
        should_stop = self._should_stop
        while not self.stopping:
            if should_stop is not None and should_stop():
                self.stop(interrupted=False)
                break
            flow = next(it, None)
            if flow is None:
                return
            try:
                r = await self._probe_flow(flow)
            except asyncio.CancelledError:
                # a hard stop: this flow still gets its one line
                self._emit(Result(flow, "error", "interrupted", None, 0))
                raise
            self._emit(r)

    async def _prober(self, proto: str):  # -> Probe | Outcome
        p = self.probers.get(proto)
        if p is not None:
            return p
        fut = self._starting.get(proto)
        if fut is not None:
            return await asyncio.shield(fut)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._starting[proto] = fut
        try:
            mod = importlib.import_module(f"scanner.probes.{self._module(proto)}")
        except ModuleNotFoundError:
            res: object = Outcome("error", f"{proto}-probe-unavailable")
        else:
            prober = mod.make_prober(self.cfg.probe_options)
            if prober.needs_raw and not can_raw():
                res = Outcome("error", "needs-cap-net-raw")
                fut.set_result(res)
                self.probers[proto] = _Refuser(res)  # type: ignore[assignment]
                return self.probers[proto]
            await prober.start(loop)
            if hasattr(prober, "timeout_for"):
                prober.timeout_for = self._timeout_for
            res = prober
        if isinstance(res, Outcome):
            res = _Refuser(res)
        self.probers[proto] = res
        fut.set_result(res)
        return res

    def _module(self, proto: str) -> str:
        """The probe module for a prober key (see ``_V6_KEYS``; TCP: connect or raw SYN)."""
        if proto not in ("tcp", "tcp6"):
            return proto
        method = self.cfg.tcp_method
        if method == "auto":
            syn_ok = can_raw() and (
                self.cfg.probe_options.secret is None or self.cfg.token_sample > 0
            )
            method = "syn" if syn_ok else "connect"
        if proto == "tcp6":
            # the same method for both families: raw SYN over IPv6 is syn6.py, connect tcp6.py;
            # every IPv6 TCP result says which (tcp_method), the summary per family
            self._methods[proto] = ("ipv6", method)
            return "syn6" if method == "syn" else "tcp6"
        self._methods[proto] = ("ipv4", method)
        return "syn" if method == "syn" else "tcp"

    def _timeout_for(self, dst: str) -> float:
        """A destination's current timeout; the initial --timeout until it has answered once
        (other hosts' RTTs say nothing about a far or slow one)."""
        hs = self.hosts.get(dst)
        if hs is not None and hs.srtt is not None:
            return hs.timeout(self.cfg)
        return self.cfg.timeout

    def _host(self, dst: str) -> HostState:
        hs = self.hosts.get(dst)
        if hs is None:
            if len(self.hosts) >= 200_000:
                # bound memory on huge sweeps: forget idle hosts (they start over at --timeout)
                for k in [k for k, v in self.hosts.items() if v.inflight == 0]:
                    if self.neigh is not None:
                        self.neigh.forget(self.hosts[k])
                    del self.hosts[k]
            g = self.neigh
            hs = self.hosts[dst] = HostState(g.family(dst) if g is not None else 0)
        return hs

    def _retries_allowed(self, hs: HostState, proto: str) -> int:
        """Retries for a silent flow: the configured number, more once loss is observed.

        Loss is estimated per destination once it has answered 20 flows, pessimistically:
        (answered only on a retry + silent now and still retrying) / (answered + retrying).
        Counting the flows still retrying matters: the first retries of a sweep expire in the
        same loop iteration as the late answers that would raise the estimate, and an
        estimate from finished flows alone let ~1 sweep in 3 miss ports at 20% SYN loss
        (tests/test_hostile.py). A destination with fewer than 20 answers gets a prior
        instead (a handful of flows, a firewalled host, port-less probes: one per host).
        """
        cfg = self.cfg
        if cfg.retries == 0:
            return 0  # asked for none: no loss can show, none is guessed
        if hs.answered < 20:
            prior = PRIOR_RETRIES_PORTLESS if proto in ("icmp", "ipip") else PRIOR_RETRIES
            return max(cfg.retries, min(prior, cfg.max_retries))
        late = hs.late + hs.retrying
        if late == 0:
            return cfg.retries
        answered = hs.answered + hs.retrying
        loss = min(late / answered, 0.9)
        # attempts needed so that an answering port is missed with probability < 1e-6
        need = math.ceil(math.log(1e-6) / math.log(loss)) - 1
        return max(cfg.retries, min(need, cfg.max_retries))

    def _token_due(self, flow: Flow) -> bool:
        """Is this flow one of the token sample (see EngineConfig.token_sample)?"""
        n = self.cfg.token_sample
        if not n or self.cfg.probe_options.secret is None:
            return False
        k = (flow.dst, flow.req)
        c = self._tokens.get(k, 0)
        if c >= n:
            return False
        if len(self._tokens) >= 200_000:
            self._tokens.clear()  # bound memory; a host seen again gets a new sample
        self._tokens[k] = c + 1
        return True

    async def _address(self, dst: str, fam: str | None = None) -> str:
        """The address to probe for a planned destination: itself when it is an IP literal,
        else the first address the resolver gives (once per name), or "" when it does not
        resolve (the flow is then ``error`` / ``unresolved``: unknown, never a failure)."""
        try:
            ipaddress.ip_address(dst.split("%", 1)[0])
            self._addrs[dst] = dst
            return dst
        except ValueError:
            pass
        fut = self._resolving.get(dst)
        if fut is None:
            fut = self._resolving[dst] = asyncio.ensure_future(self._getaddrinfo(dst, fam))
        addr = await asyncio.shield(fut)
        self._addrs[dst] = addr
        return addr

    async def _getaddrinfo(self, name: str, fam: str | None = None) -> str:
        """The resolver, bounded by the flow's time budget (--timeout per attempt), in a daemon
        thread: a resolver that hangs (DNS down) neither holds the run nor delays Ctrl-C."""
        budget = self.cfg.timeout * (1 + self.cfg.retries)
        res = _resolve(name, _FAMILY.get(fam or "", 0))
        stop = asyncio.ensure_future(self._stop_event.wait())
        await asyncio.wait({res, stop}, timeout=budget, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not res.done():
            res.cancel()
            if self.stopping:  # Ctrl-C: the flow is interrupted, not unresolved
                self.unresolved[name] = _INTERRUPTED
                return ""
            return self._no_address(name, f"no answer from the resolver within {budget:g}s")
        try:
            infos = res.result()
        except (OSError, UnicodeError) as e:
            return self._no_address(name, getattr(e, "strerror", None) or str(e))
        if not infos:
            return self._no_address(name, "no address")
        return str(infos[0][4][0])

    def _no_address(self, name: str, why: str) -> str:
        self.unresolved[name] = why
        warn(f"{name} does not resolve here ({why}); its flows are unknown, not failed")
        return ""

    async def _probe_flow(self, flow: Flow, prober: object = None) -> Result:
        """One flow through ``prober`` (default: the one for its protocol), retries included."""
        addr = self._addrs.get(flow.dst)
        if addr is None:
            addr = await self._address(flow.dst, flow.fam)
        if addr != flow.dst:
            if not addr and self.unresolved.get(flow.dst) is _INTERRUPTED:
                return Result(flow, "error", "interrupted", None, 0)
            if not addr:
                self.stats.skipped["unresolved"] = self.stats.skipped.get("unresolved", 0) + 1
                return Result(flow, "error", "unresolved", None, 0)
            r = await self._probe_address(dataclasses.replace(flow, dst=addr), prober)
            r.planned = flow  # a caller that keys its flows (a mesh agent's plan index) finds it
            return r
        return await self._probe_address(flow, prober)

    async def _probe_address(self, flow: Flow, prober: object) -> Result:
        """_probe_flow for a flow whose destination is an address."""
        if prober is None:
            key = flow.proto
            if ":" in flow.dst:
                key = _V6_KEYS.get(key, key)
            prober = self._used.get(key)
            if prober is None:
                # first flow of this key: the method is reported once a flow used it (probers
                # started ahead of the sweep may never see one, e.g. IPv4 TCP in an IPv6-only
                # run)
                prober = self.probers.get(key) or await self._prober(key)
                self._used[key] = prober
                if key in self._methods:
                    self.stats.note_tcp_method(*self._methods[key])
            if key == "tcp6" and hasattr(prober, "connect_prober") and self._token_due(flow):
                # raw SYN over IPv6 runs here, not in the batch lane: its token sample too
                prober = await prober.connect_prober()
        if isinstance(prober, _Refuser):
            o = prober.outcome
            self.stats.skipped[o.reason] = self.stats.skipped.get(o.reason, 0) + 1
            return Result(flow, o.state, o.reason, None, 0)
        cfg = self.cfg
        hs = self._host(flow.dst)
        cap = cfg.max_per_host
        while cap and hs.inflight >= cap:
            fut = asyncio.get_running_loop().create_future()
            hs.waiters.append(fut)
            await fut
        if hs.fam and not hs.held:
            await self.neigh.acquire(hs)  # type: ignore[union-attr]
        hs.inflight += 1
        try:
            return await self._attempts(prober, flow, hs)
        finally:
            hs.inflight -= 1
            if hs.inflight == 0 and hs.held:
                self.neigh.release(hs)  # type: ignore[union-attr]
            if hs.waiters:
                w = hs.waiters.pop(0)
                if not w.done():
                    w.set_result(None)

    async def _attempts(self, prober, flow: Flow, hs: HostState) -> Result:
        cfg = self.cfg
        st = self.stats
        attempts = 0
        backoff = 0
        rate = cfg.rate
        # Per-destination pacing a probe asks for (UDP: the far kernel sends ~1 ICMP error per
        # second), switched on for a destination only once it has answered with ICMP errors and
        # then left an attempt unanswered: ports that answer (responders) and plain loss (a
        # silence from a host that never sent an error) never wait for it.
        pps = getattr(prober, "per_host_pps", None)
        last: Outcome | None = None
        counted = False  # this flow is in hs.retrying
        guard = self.neigh if hs.fam else None
        mark = 0
        nhits = 0
        settled = False  # this flow had its one attempt that did not count (unresolved entry)
        try:
            while True:
                if pps and hs.buckets is not None and flow.proto in hs.buckets:
                    wait = hs.pace(flow.proto, pps, 1, asyncio.get_running_loop().time())
                    if wait > 0:
                        await asyncio.sleep(wait)
                        if self.stopping and last is not None:
                            # cut short before the retry it was waiting for
                            return Result(flow, "error", _INTERRUPTED, None, attempts)
                if rate:
                    loop = asyncio.get_running_loop()
                    now = loop.time()
                    t = self._next_slot if self._next_slot > now else now
                    self._next_slot = t + 1.0 / rate
                    if t > now:
                        await asyncio.sleep(t - now)
                        if self.stopping:
                            # a stop while waiting for a rate slot: launch nothing more (a
                            # retry cut short is interrupted too, not its last silence)
                            return Result(flow, "error", _INTERRUPTED, None, attempts)
                timeout = hs.timeout(cfg)
                if guard is not None:
                    mark = guard.mark(hs.fam)
                t0 = time.perf_counter()
                out: Outcome = await prober.probe(flow, timeout)
                st.attempts += 1
                if guard is not None and guard.hit(hs.fam, mark, out.state, out.reason, out.silent):
                    # the table overflowed meanwhile: this attempt may never have left the
                    # host, so its silence proves nothing. Pause (entries older than 5 s can
                    # be evicted again) and try again; in the end, unknown, never fail.
                    if nhits >= NEIGH_RETRIES or self.stopping:
                        guard.unknown += 1
                        return Result(flow, "error", NEIGH_FULL, None, attempts)
                    await asyncio.sleep(NEIGH_PAUSES[nhits])
                    nhits += 1
                    continue
                last = out
                if out.state == "error" and out.reason in RESOURCE_REASONS:
                    st.backoffs[out.reason] = st.backoffs.get(out.reason, 0) + 1
                    backoff += 1
                    if backoff > 200 or self.stopping:
                        return Result(flow, out.state, out.reason, None, attempts)
                    await asyncio.sleep(min(0.005 * backoff, 0.2))
                    continue
                attempts += 1
                if not out.silent and (
                    out.state == "filtered" or (flow.proto == "udp" and out.state == "closed")
                ):
                    hs.note_icmp()  # an ICMP error, whichever probe read it
                if pps and (
                    out.silent
                    and hs.buckets is not None
                    and "icmp" in hs.buckets
                    and flow.proto not in hs.buckets
                ):
                    # It answers with ICMP errors and now fell silent: its error rate
                    # limit, not loss. Start with an empty bucket: the burst is spent.
                    hs.buckets[flow.proto] = [0.0, asyncio.get_running_loop().time()]
                if (
                    guard is not None
                    and out.silent
                    and not settled
                    and guard.suspect(hs, t0, timeout)
                    and await guard.settle(hs, flow.dst)
                    and guard.cut(hs, t0, timeout)
                ):
                    # sent before its neighbour entry resolved (a lost ARP request is asked
                    # again only after 1 s): the packet may have left after the deadline, or
                    # never. That attempt does not count; once more, now that it is resolved.
                    settled = True
                    guard.settled += 1
                    attempts -= 1
                    if self.stopping:
                        return Result(flow, "error", _INTERRUPTED, None, attempts)
                    continue
                if out.silent:
                    if attempts <= self._retries_allowed(hs, flow.proto):
                        if self.stopping:
                            # SIGINT cut its retries short: its silence so far is no result
                            return Result(flow, "error", _INTERRUPTED, None, attempts)
                        st.retries += 1
                        if attempts == 1:
                            hs.retrying += 1
                            counted = True
                        continue
                elif out.rtt_ms is not None:
                    rtt_s = out.rtt_ms / 1000.0
                    hs.update(rtt_s)
                    hs.answered += 1
                    st.answered += 1
                    if attempts > 1 or out.resent:
                        hs.late += 1
                        st.late_answers += 1
                return Result(
                    flow, out.state, out.reason, out.rtt_ms, attempts, time.time(), None, out.extra
                )

        finally:
            if counted:
                hs.retrying -= 1


_FAMILY = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}

# IPv6 flows of these protocols go to a prober of their own (key -> module of that name):
# ICMPv6 echo is another protocol on other sockets; TCP over IPv6 is syn6 or tcp6 (_module).
_V6_KEYS = {"tcp": "tcp6", "icmp": "icmp6"}


class _Refuser:
    """Stands in for a probe this process cannot run (missing privilege or module)."""

    __slots__ = ("outcome",)

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome

    def close(self) -> None:
        pass
