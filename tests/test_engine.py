"""The engine and the runner against real sockets, under both the asyncio and the uvloop loops.

Loopback: listeners on port 0 for open, freed ports for closed, our responder's token for
"responder". The lab (root only): a far host with a listener and nftables rules for filtered,
reset and admin-prohibited, and a host whose link goes down in the middle of a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import orjson
import pytest

from scanner.core.flows import Flow
from scanner.core.results import Result
from scanner.core.tags import tcp_token
from scanner.engine.engine import Engine, EngineConfig
from scanner.engine.output import NdjsonOutput
from scanner.engine.process import new_loop
from scanner.engine.runner import RunSpec, run
from scanner.probes.base import ProbeOptions

LOOPS = ["asyncio", "uvloop"]
LOCAL = "127.0.0.1"


@pytest.fixture(params=LOOPS)
def loop_kind(request: pytest.FixtureRequest) -> str:
    return request.param


# ---- helpers ----------------------------------------------------------------------------------


class Listener:
    """A real TCP listener on 127.0.0.1 port 0, served by a thread.

    Every connection is accepted (so the backlog never fills), sent ``send`` and closed, or
    kept open silently when ``hold`` is set.
    """

    def __init__(self, send: bytes = b"", hold: bool = False) -> None:
        self.sock = socket.create_server((LOCAL, 0), backlog=256)
        self.sock.settimeout(0.05)
        self.port: int = self.sock.getsockname()[1]
        self.send = send
        self.hold = hold
        self.accepted = 0
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            if self.send:
                with contextlib.suppress(OSError):
                    conn.sendall(self.send)
            if self.hold:
                self._held.append(conn)
            else:
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()
        for c in self._held:
            c.close()


@pytest.fixture
def listen() -> Iterator[Callable[..., Listener]]:
    made: list[Listener] = []

    def make(send: bytes = b"", hold: bool = False) -> Listener:
        lst = Listener(send, hold)
        made.append(lst)
        return lst

    yield make
    for lst in made:
        lst.close()


def freed_port() -> int:
    """A port that was just bound and released: nothing listens on it."""
    s = socket.socket()
    s.bind((LOCAL, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def run_engine(
    kind: str, flows: Iterable[Flow], cfg: EngineConfig | None = None, on: Callable | None = None
) -> tuple[list[Result], Engine]:
    results: list[Result] = []
    engine: Engine

    def emit(r: Result) -> None:
        results.append(r)
        if on is not None:
            on(r, engine)

    engine = Engine(cfg or EngineConfig(timeout=0.5), emit)
    loop = new_loop(kind)
    try:
        loop.run_until_complete(engine.run(iter(flows)))
    finally:
        loop.close()
    return results, engine


def by_port(results: Iterable[Result]) -> dict[int | None, tuple[str, str]]:
    return {r.flow.port: (r.state, r.reason) for r in results}


def run_to_file(
    tmp_path: Path,
    kind: str,
    flows: Iterator[Flow],
    planned: int,
    name: str = "out.ndjson",
    **kw,
) -> list[dict]:
    path = tmp_path / name
    kw.setdefault("engine", EngineConfig(timeout=0.5))
    spec = RunSpec(
        flows=flows,
        planned=planned,
        argv=["test"],
        output=NdjsonOutput(str(path), stdout=False),
        loop=kind,
        **kw,
    )
    run(spec)
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    return [orjson.loads(line) for line in raw.splitlines()]


def check_stream(lines: list[dict], planned: int) -> tuple[list[dict], dict]:
    """The invariants of every run: start first, summary last, planned == results == lines."""
    assert lines[0]["type"] == "start" and lines[0]["planned"] == planned
    summary = lines[-1]
    assert summary["type"] == "summary"
    results = [r for r in lines if r["type"] == "result"]
    assert len(results) == len(lines) - 2
    assert summary["planned"] == summary["results"] == len(results) == planned
    assert sum(summary["states"].values()) == planned
    assert {r["scan_id"] for r in lines} == {lines[0]["scan_id"]}
    return results, summary


# ---- loopback: open, closed, responder ---------------------------------------------------------


# closed: connect() reads ECONNREFUSED (nmap -sT: conn-refused); a raw SYN reads the RST
CLOSED_REASON = {"connect": "conn-refused", "syn": "reset"}


def _method_or_skip(method: str) -> None:
    from scanner.core.privileges import can_raw

    if method == "syn" and not can_raw():
        pytest.skip("the raw SYN probe needs CAP_NET_RAW")


@pytest.mark.parametrize("method", ["connect", "syn"])
def test_open_and_closed(loop_kind: str, listen: Callable[..., Listener], method: str) -> None:
    _method_or_skip(method)
    opened = [listen().port for _ in range(3)]
    closed = [freed_port() for _ in range(3)]
    cfg = EngineConfig(timeout=0.5, tcp_method=method)
    results, engine = run_engine(loop_kind, [Flow(LOCAL, p) for p in opened + closed], cfg)
    assert len(results) == 6
    assert engine.stats.tcp_method == method
    got = by_port(results)
    for p in opened:
        assert got[p] == ("open", "syn-ack")
    for p in closed:
        assert got[p] == ("closed", CLOSED_REASON[method])
    for r in results:
        assert r.attempts == 1
        assert r.rtt_ms is not None and r.rtt_ms >= 0
    assert engine.stats.results == 6
    assert engine.stats.states == {"open": 3, "closed": 3}
    assert engine.stats.retries == 0


def test_ipv6_loopback(loop_kind: str) -> None:
    try:
        srv = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    port = srv.getsockname()[1]
    try:
        results, _ = run_engine(loop_kind, [Flow("::1", port), Flow("::1", freed_port())])
    finally:
        srv.close()
    assert [(r.state, r.reason) for r in results if r.flow.port == port] == [("open", "syn-ack")]
    assert [r.state for r in results if r.flow.port != port] == ["closed"]


def test_secret_tells_our_responder_from_other_services(
    loop_kind: str, listen: Callable[..., Listener]
) -> None:
    secret = b"s3cret"
    ours = listen()
    ours.send = tcp_token(secret, ours.port)
    other = listen(send=b"SSH-2.0-OpenSSH_9.2\r\n")
    wrong_port = listen()
    wrong_port.send = tcp_token(secret, wrong_port.port + 1)  # a token for another port
    wrong_secret = listen()
    wrong_secret.send = tcp_token(b"other", wrong_secret.port)
    silent = listen()
    flows = [Flow(LOCAL, x.port) for x in (ours, other, wrong_port, wrong_secret, silent)]
    cfg = EngineConfig(timeout=0.3, probe_options=ProbeOptions(secret=secret))
    got = by_port(run_engine(loop_kind, flows, cfg)[0])
    assert got[ours.port] == ("open", "responder")
    for x in (other, wrong_port, wrong_secret, silent):
        assert got[x.port] == ("open", "syn-ack")


def test_without_a_secret_the_token_is_not_read(
    loop_kind: str, listen: Callable[..., Listener]
) -> None:
    lst = listen()
    lst.send = tcp_token(b"s", lst.port)
    got = by_port(run_engine(loop_kind, [Flow(LOCAL, lst.port)])[0])
    assert got[lst.port] == ("open", "syn-ack")


def test_an_unknown_protocol_is_an_error_result_not_a_crash(loop_kind: str) -> None:
    results, engine = run_engine(loop_kind, [Flow(LOCAL, 1, "sctp"), Flow(LOCAL, 2, "sctp")])
    assert [(r.state, r.reason, r.attempts) for r in results] == [
        ("error", "sctp-probe-unavailable", 0)
    ] * 2
    assert engine.stats.skipped == {"sctp-probe-unavailable": 2}


def test_graceful_stop_reports_every_flow(loop_kind: str) -> None:
    port = freed_port()
    flows = [Flow(LOCAL, port)] * 500

    def stop_after_20(r: Result, engine: Engine) -> None:
        if engine.stats.results == 20:
            engine.stop()

    cfg = EngineConfig(concurrency=4, timeout=0.5)
    results, engine = run_engine(loop_kind, flows, cfg, on=stop_after_20)
    assert len(results) == 500
    assert engine.stats.interrupted
    probed = [r for r in results if r.reason != "interrupted"]
    skipped = [r for r in results if r.reason == "interrupted"]
    assert 20 <= len(probed) <= 20 + 4  # what was in flight when stop() came
    assert all(r.state == "closed" for r in probed)
    assert all(r.state == "error" and r.attempts == 0 for r in skipped)


def test_max_per_host_is_never_exceeded(listen: Callable[..., Listener]) -> None:
    # With a secret, each probe stays in flight while it waits for a token that never comes
    # (~0.2 s), so in-flight counts are observable from a sampler task on the same loop.
    held = [listen(hold=True) for _ in range(4)]
    cfg = EngineConfig(
        concurrency=4, max_per_host=1, timeout=0.2, probe_options=ProbeOptions(secret=b"x")
    )
    engine = Engine(cfg, lambda r: None)
    peak = 0

    async def main() -> None:
        nonlocal peak
        done = False

        async def sample() -> None:
            nonlocal peak
            while not done:
                hs = engine.hosts.get(LOCAL)
                if hs is not None:
                    peak = max(peak, hs.inflight)
                await asyncio.sleep(0.002)

        t = asyncio.ensure_future(sample())
        await engine.run(iter([Flow(LOCAL, h.port) for h in held] * 2))
        done = True
        await t

    loop = new_loop("uvloop")
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert engine.stats.results == 8
    assert peak == 1


# ---- the runner: planned == results, shards, memory ---------------------------------------------


def test_large_loopback_sweep_planned_equals_results(loop_kind: str, tmp_path: Path) -> None:
    n = 20000
    flows = (Flow(LOCAL, p) for p in range(1, n + 1))
    lines = run_to_file(tmp_path, loop_kind, flows, n, workers=1)
    results, summary = check_stream(lines, n)
    assert sorted(r["port"] for r in results) == list(range(1, n + 1))
    assert set(summary["states"]) <= {"open", "closed"}
    assert summary["states"].get("closed", 0) > n * 0.9
    assert summary["workers"] == 1
    assert summary["attempts"] >= n
    assert "interrupted" not in summary


def test_two_shards_give_the_same_results_as_one(
    loop_kind: str, tmp_path: Path, listen: Callable[..., Listener]
) -> None:
    opened = [listen().port for _ in range(5)]
    closed = [freed_port() for _ in range(5)]
    ports = list(range(1, 1024)) + opened + closed

    def flows() -> Iterator[Flow]:
        return (Flow(LOCAL, p) for p in ports)

    # Every port answers at once (a RST or a handshake), so the timeout only matters when this
    # host is too busy to process an answer: the kernel then hands loopback's softirq work to
    # ksoftirqd, which competes with every busy process, and a RST can wait longer than the
    # adaptive timeout's 50 ms floor. Such an attempt is retried (attempts 2), a difference
    # of load, not of shards. A 2 s floor leaves the comparison to the shards.
    cfg = EngineConfig(timeout=2.0, min_timeout=2.0)
    one = run_to_file(tmp_path, loop_kind, flows(), len(ports), "one.ndjson", workers=1, engine=cfg)
    two = run_to_file(tmp_path, loop_kind, flows(), len(ports), "two.ndjson", workers=2, engine=cfg)
    r1, s1 = check_stream(one, len(ports))
    r2, s2 = check_stream(two, len(ports))
    assert s1["workers"] == 1 and s2["workers"] == 2
    assert len({r["port"] for r in r2}) == len(ports)  # every flow once, none twice
    key = ("dst", "port", "proto", "state", "reason", "attempts")
    assert sorted(tuple(r[k] for k in key) for r in r1) == sorted(
        tuple(r[k] for k in key) for r in r2
    )
    assert s1["states"] == s2["states"]
    for p in opened:
        assert [r["state"] for r in r2 if r["port"] == p] == ["open"]


def _peak_bytes(kind: str, n: int, port: int) -> int:
    def gen() -> Iterator[Flow]:
        for _ in range(n):
            yield Flow(LOCAL, port)

    count = 0

    def emit(r: Result) -> None:
        nonlocal count
        count += 1

    engine = Engine(EngineConfig(concurrency=256, timeout=0.5), emit)
    loop = new_loop(kind)
    tracemalloc.start()
    try:
        loop.run_until_complete(engine.run(gen()))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        loop.close()
    assert count == n
    return peak


def test_memory_is_bounded_by_concurrency_not_flows() -> None:
    port = freed_port()
    small = _peak_bytes("uvloop", 6_000, port)
    big = _peak_bytes("uvloop", 60_000, port)
    # 60k Result objects alone would take > 8 MB; nothing per flow may be kept
    assert big < 4 * 1024 * 1024
    assert big < small * 1.5 + 256 * 1024, (small, big)


# ---- the lab ----------------------------------------------------------------------------------

LAB_LISTENER = r"""
import selectors, socket, sys
sel = selectors.DefaultSelector()
for p in map(int, sys.argv[1:]):
    s = socket.create_server(("", p), backlog=1024)
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        try:
            c, _ = key.fileobj.accept()
        except OSError:
            continue
        c.close()
"""

OPEN_1, OPEN_2, DROP, RESET, ADMIN, CLOSED = 5001, 5002, 5003, 5004, 5005, 5006
LISTENING = (OPEN_1, OPEN_2, DROP, RESET, ADMIN)  # rules, not a missing listener, decide 3-5

RULES = f"""
table ip pmtest {{
    chain input {{
        type filter hook input priority 0; policy accept;
        tcp dport {DROP} drop
        tcp dport {RESET} reject with tcp reset
        tcp dport {ADMIN} reject with icmp type admin-prohibited
    }}
}}
"""


def start_listener(lab, host: str, ports: Iterable[int]) -> subprocess.Popen:
    proc = lab.popen(
        host,
        [sys.executable, "-c", LAB_LISTENER, *map(str, ports)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=5)
    if proc.stdout is not None:
        proc.stdout.close()


@pytest.fixture(scope="module")
def fault_lab(module_lab):
    lab = module_lab(hosts=2)
    proc = start_listener(lab, "node2", LISTENING)
    lab.nft("node2", RULES)
    # The kernel rate-limits the ICMP errors a host sends to one peer (net.ipv4.icmp_ratelimit,
    # a burst of 6, then one per second): after a few runs the admin-prohibited port would
    # answer nothing and read as filtered/no-response. Lift the limit inside the far host.
    lab.run("node2", ["sysctl", "-qw", "net.ipv4.icmp_ratelimit=0"], check=True)
    yield lab
    stop(proc)


@pytest.mark.lab
@pytest.mark.parametrize("method", ["connect", "syn"])
@pytest.mark.parametrize("retries", [0, 2])
def test_lab_drop_reset_and_admin_prohibited(
    fault_lab, loop_kind: str, retries: int, method: str
) -> None:
    _method_or_skip(method)
    far = fault_lab.host("node2").addr
    ports = (OPEN_1, OPEN_2, DROP, RESET, ADMIN, CLOSED)
    cfg = EngineConfig(timeout=0.3, retries=retries, tcp_method=method)
    results, engine = run_engine(loop_kind, [Flow(far, p) for p in ports], cfg)
    assert len(results) == len(ports)
    got = {r.flow.port: r for r in results}
    table = {p: (got[p].state, got[p].reason) for p in ports}
    assert table == {
        OPEN_1: ("open", "syn-ack"),
        OPEN_2: ("open", "syn-ack"),
        DROP: ("filtered", "no-response"),
        RESET: ("closed", CLOSED_REASON[method]),
        # both read the ICMP code: the SYN probe from its raw socket, connect() from the error
        # queue (it reports admin-prohibited and host-unreach alike as EHOSTUNREACH)
        ADMIN: ("filtered", "admin-prohibited"),
        CLOSED: ("closed", CLOSED_REASON[method]),
    }
    assert got[DROP].attempts == retries + 1
    assert got[DROP].rtt_ms is None
    for p in (OPEN_1, OPEN_2, RESET, ADMIN, CLOSED):
        assert got[p].attempts == 1
        assert got[p].rtt_ms is not None
    assert engine.stats.retries == retries
    assert engine.stats.attempts == len(ports) + retries


@pytest.mark.lab
def test_lab_runner_stream_with_filtered(fault_lab, loop_kind: str, tmp_path: Path) -> None:
    far = fault_lab.host("node2").addr
    ports = [OPEN_1, DROP, RESET, ADMIN, CLOSED] * 3
    flows = (Flow(far, p, "tcp", "node2") for p in ports)
    lines = run_to_file(
        tmp_path, loop_kind, flows, len(ports), engine=EngineConfig(timeout=0.3), workers=1
    )
    results, summary = check_stream(lines, len(ports))
    assert summary["states"] == {"open": 3, "filtered": 6, "closed": 6}
    assert {r["host"] for r in results} == {"node2"}
    # 15 flows are too few to estimate loss: each dropped flow gets the engine's prior retries
    from scanner.engine.engine import PRIOR_RETRIES

    extra = 3 * PRIOR_RETRIES
    assert summary["retries"] == extra and summary["attempts"] == len(ports) + extra


@pytest.mark.lab
def test_lab_link_down_mid_run(make_lab, loop_kind: str, tmp_path: Path) -> None:
    lab = make_lab(hosts=2)
    far = lab.host("node2")
    ports = list(range(7000, 7100))
    proc = start_listener(lab, "node2", ports)
    downed_after = 20
    seen = 0

    def take_link_down(rec: dict) -> None:
        nonlocal seen
        seen += 1
        if seen == downed_after:
            subprocess.run(["ip", "-n", far.ns, "link", "set", "eth0", "down"], check=True)

    try:
        lines = run_to_file(
            tmp_path,
            loop_kind,
            (Flow(far.addr, p) for p in ports),
            len(ports),
            engine=EngineConfig(concurrency=16, timeout=0.2, max_timeout=0.2, retries=1),
            workers=1,
            on_record=take_link_down,
        )
    finally:
        stop(proc)
    results, summary = check_stream(lines, len(ports))
    assert sorted(r["port"] for r in results) == ports
    assert set(summary["states"]) <= {"open", "filtered"}
    assert summary["states"]["open"] >= downed_after
    # at most the flows in flight when the link went down can still have been answered
    assert summary["states"]["open"] <= downed_after + 16
    filtered = [r for r in results if r["state"] == "filtered"]
    assert len(filtered) >= len(ports) - downed_after - 16
    assert {r["reason"] for r in filtered} <= {"no-response", "host-unreach"}
    assert all(r["rtt_ms"] is None or r["reason"] == "host-unreach" for r in filtered)


def test_flows_are_consumed_lazily(loop_kind: str) -> None:
    """The engine pulls from the generator as it goes: never more than concurrency ahead."""
    port = freed_port()
    pulled = 0
    emitted = 0
    ahead = 0

    def gen() -> Iterator[Flow]:
        nonlocal pulled
        for _ in itertools.repeat(None, 2000):
            pulled += 1
            yield Flow(LOCAL, port)

    def on(r: Result, engine: Engine) -> None:
        nonlocal emitted, ahead
        emitted += 1
        ahead = max(ahead, pulled - emitted)

    run_engine(loop_kind, gen(), EngineConfig(concurrency=8, timeout=0.5), on=on)
    assert emitted == pulled == 2000
    assert ahead <= 8
