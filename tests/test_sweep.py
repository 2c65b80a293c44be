"""The batch SYN sweep (scanner/engine/sweep.py): the same results and the same guarantees as
the worker pool, without a coroutine per flow.

Real sockets: loopback listeners, and a network namespace of our own (only `lo`, one nft
table dropping a port range) where silent flows stay in flight until their deadline. The
engine runs in a child process inside that namespace and prints what it saw as JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from scanner.core.flows import Flow
from scanner.core.results import Result
from scanner.core.tags import tcp_token
from scanner.engine import sweep
from scanner.engine.engine import Engine, EngineConfig
from scanner.engine.process import new_loop
from scanner.probes.base import ProbeOptions
from tests.conftest import unique_lab_name
from tests.test_engine import LOCAL, Listener, freed_port, listen  # noqa: F401 - fixture

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the raw SYN probe needs root here")

DROP_LO, DROP_HI = 40000, 40199  # silent in the namespace (nft drop)
OUT_LO, OUT_HI = 45000, 45009  # refused on the way out (nft output drop: the send gets EPERM)


def run(cfg: EngineConfig, flows: list[Flow], kind: str = "uvloop") -> tuple[list[Result], Engine]:
    results: list[Result] = []
    engine = Engine(cfg, results.append)
    loop = new_loop(kind)
    try:
        loop.run_until_complete(engine.run(iter(flows)))
    finally:
        loop.close()
    return results, engine


@pytest.mark.parametrize("send", ["thread", "inline", "sendto"])
@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_sweep_and_worker_pool_give_the_same_results(
    kind: str,
    send: str,
    listen,  # noqa: F811
    monkeypatch,
) -> None:
    """The same results from the batch lane (SYNs many per sendmmsg, from a thread of their own
    or from the loop's, answers many per recvmmsg; or, where libc has neither, one packet per
    call) as from the worker pool."""
    from scanner.probes import mmsg
    from scanner.probes.syn import SynProber

    monkeypatch.setattr(SynProber, "SEND_THREAD", send == "thread")
    if send == "sendto":
        monkeypatch.setattr(mmsg, "_FUNCS", None)
    elif not mmsg.available():
        pytest.skip("this libc has no sendmmsg/recvmmsg")
    opened = [listen().port for _ in range(4)]
    ports = sorted({*range(1, 1500), *opened, freed_port()})
    flows = [Flow(LOCAL, p) for p in ports]
    used: list[bool] = []
    orig = sweep.Sweep.run

    async def spy(self, it):  # type: ignore[no-untyped-def]
        used.append(True)
        return await orig(self, it)

    sweep.Sweep.run = spy  # type: ignore[method-assign]
    try:
        a, ea = run(EngineConfig(timeout=0.5, tcp_method="syn"), flows, kind)
    finally:
        sweep.Sweep.run = orig  # type: ignore[method-assign]
    b, eb = run(EngineConfig(timeout=0.5, tcp_method="syn", sweep=False), flows, kind)
    assert used == [True]
    key = sorted((r.flow.port, r.state, r.reason) for r in a)
    assert key == sorted((r.flow.port, r.state, r.reason) for r in b)
    assert len(a) == len(ports) and len({r.flow.port for r in a}) == len(ports)
    assert {r.flow.port for r in a if r.state == "open"} >= set(opened)
    assert all(r.rtt_ms is not None and r.attempts >= 1 for r in a)
    assert ea.stats.results == eb.stats.results == len(ports)


def test_token_sample_connects_for_the_first_flows_of_each_destination_and_requirement(
    listen,  # noqa: F811
) -> None:
    secret = b"s3cret"
    lst = [listen() for _ in range(6)]
    for x in lst:
        x.send = tcp_token(secret, x.port)
    flows = [Flow(LOCAL, x.port, req="a") for x in lst] + [Flow(LOCAL, lst[0].port, req="b")]
    cfg = EngineConfig(timeout=1.0, token_sample=2, probe_options=ProbeOptions(secret=secret))
    results, engine = run(cfg, flows)
    assert engine.stats.tcp_method == "syn"
    by = {(r.flow.req, r.flow.port): (r.state, r.reason) for r in results}
    ports = [x.port for x in lst]
    assert [by[("a", p)] for p in ports[:2]] == [("open", "responder")] * 2
    assert [by[("a", p)] for p in ports[2:]] == [("open", "syn-ack")] * 4
    assert by[("b", ports[0])] == ("open", "responder")  # another requirement: its own sample
    # only the sample made connections
    assert sum(x.accepted for x in lst) == 3


# ---- in a namespace of our own: silent ports, caps, stops -------------------------------------

CHILD = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from scanner.core.flows import Flow
    from scanner.engine.engine import Engine, EngineConfig
    from scanner.engine.process import new_loop

    args = json.loads(sys.argv[1])
    from scanner.probes import mmsg
    from scanner.probes.syn import SynProber
    send = args.get("send", "thread")
    if send == "sendto":  # one packet per system call, as where libc has no sendmmsg
        mmsg._FUNCS = None
    # sendmmsg from a thread of its own, or from the loop's (a process with one core)
    SynProber.SEND_THREAD = send == "thread"
    sizes = []  # SYNs per sendmmsg flush
    _flush = mmsg.SendBatch.flush

    def flush(self):
        sizes.append(self.queued)
        if args.get("slow_call") and self.queued:  # starved inside the sendmmsg call
            time.sleep(args["slow_call"])
        return _flush(self)

    if args.get("late"):  # whoever sends (the loop or its thread) starved of CPU this long
        _stamp = SynProber._stamp

        def stamp(self, queued):
            time.sleep(args["late"])
            return _stamp(self, queued)

        SynProber._stamp = stamp

    mmsg.SendBatch.flush = flush
    from scanner.engine import sweep
    lanes = []
    _run = sweep.Sweep.run

    async def run(self, it):
        lanes.append(self)
        return await _run(self, it)

    sweep.Sweep.run = run
    if args.get("sndbuf"):  # a small send buffer: sends meet EAGAIN while a qdisc holds SYNs
        import socket
        from scanner.probes.syn import SynProber
        _start = SynProber.start

        async def start(self, loop):
            await _start(self, loop)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, args["sndbuf"])

        SynProber.start = start
    flows = [Flow("127.0.0.1", p) for p in args["ports"]]
    out = []
    peak = {}
    engine = None

    rtts = []

    def emit(r):
        out.append([r.flow.port, r.state, r.reason, r.attempts])
        rtts.append(r.rtt_ms)
        if args.get("stop_after") and len(out) == args["stop_after"]:
            engine.stop()

    engine = Engine(EngineConfig(**args["cfg"]), emit)
    it = iter(flows)

    async def main():
        task = asyncio.ensure_future(engine.run(it))
        t0 = time.perf_counter()
        while not task.done():
            hs = engine.hosts.get("127.0.0.1")
            if hs is not None:
                peak["inflight"] = max(peak.get("inflight", 0), hs.inflight)
            if args.get("cancel_after") and len(out) >= args["cancel_after"]:
                task.cancel()  # the hard stop (a second Ctrl-C)
                break
            await asyncio.sleep(0.001)
        try:
            await task
        except asyncio.CancelledError:
            for f in it:  # as the runner does: the rest of the plan, once each
                out.append([f.port, "error", "interrupted", 0])
        return time.perf_counter() - t0

    loop = new_loop("uvloop")
    elapsed = loop.run_until_complete(main())
    tcp = engine.probers.get("tcp")
    print(json.dumps({"results": out, "peak": peak.get("inflight", 0), "elapsed": elapsed,
                      "batched": getattr(tcp, "_tx", None) is not None,
                      "threaded": bool(getattr(tcp, "threaded", False)),
                      "rtt_max": max((x for x in rtts if x is not None), default=None),
                      "batch_peak": max(sizes, default=0),
                      "backoff_end": lanes[0].backoff if lanes else None,
                      "stats": {"retries": engine.stats.retries,
                                "attempts": engine.stats.attempts,
                                "backoffs": engine.stats.backoffs}}))
    """
)


def lo_namespace(
    suffix: str, tool: str, setup: list[str], stdin: bytes | None = None
) -> Iterator[str]:
    """A namespace of our own with only `lo` up, set up by one command run in it (``tool``
    first); removed after the module's tests."""
    if shutil.which("ip") is None or shutil.which(tool) is None:
        pytest.skip(f"needs ip and {tool}")
    ns = f"{unique_lab_name()}-{suffix}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "netns", "exec", ns, tool, *setup], input=stdin, check=True)
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.fixture(scope="module")
def drop_ns():
    rules = (
        "table ip sweeptest {\n\tchain input {\n"
        "\t\ttype filter hook input priority 0; policy accept;\n"
        f"\t\ttcp dport {DROP_LO}-{DROP_HI} drop\n\t}}\n"
        "\tchain output {\n\t\ttype filter hook output priority 0; policy accept;\n"
        f"\t\ttcp dport {OUT_LO}-{OUT_HI} drop\n\t}}\n}}\n"
    )
    yield from lo_namespace("sw", "nft", ["-f", "-"], rules.encode())


def child(ns: str, wait: float = 120, **args: object) -> dict:
    cp = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", CHILD, json.dumps(args)],
        capture_output=True, timeout=wait, cwd=os.path.dirname(os.path.dirname(__file__)),
    )  # fmt: skip
    assert cp.returncode == 0, cp.stderr.decode()[-2000:]
    return json.loads(cp.stdout)


def once_each(res: dict, ports: list[int]) -> dict[int, list]:
    got = [r[0] for r in res["results"]]
    assert sorted(got) == sorted(ports), "every flow exactly once"
    return {r[0]: r for r in res["results"]}


def test_silent_ports_are_retried_and_filtered_with_a_per_host_cap(drop_ns: str) -> None:
    ports = [*range(DROP_LO, DROP_LO + 40), *range(1000, 1100)]
    cfg = {"timeout": 0.1, "retries": 1, "max_per_host": 8, "tcp_method": "syn"}
    res = child(drop_ns, ports=ports, cfg=cfg)
    by = once_each(res, ports)
    assert res["peak"] == 8  # the cap was reached and never passed
    for p in range(DROP_LO, DROP_LO + 40):
        assert by[p][1:3] == ["filtered", "no-response"]
        assert by[p][3] >= 2  # retried (the prior: 2 retries before 20 answers)
    for p in range(1000, 1100):
        assert by[p][1:4] == ["closed", "reset", 1]


SENDS = ["thread", "inline", "sendto"]  # sendmmsg from its own thread or the loop's; sendto


@pytest.mark.parametrize("send", SENDS)
def test_a_send_refused_inside_a_batch_fails_that_flow_alone(drop_ns: str, send: str) -> None:
    """A SYN the local firewall refuses (the send gets EPERM) in the middle of a sendmmsg batch:
    that flow is filtered/local-prohibited after one attempt, the SYNs after it in the same
    batch still leave, and every other flow is exact."""
    from scanner.probes import mmsg

    if send != "sendto" and not mmsg.available():
        pytest.skip("this libc has no sendmmsg/recvmmsg")
    refused = [*range(OUT_LO, OUT_HI + 1)]
    others = [*range(1000, 1030), *range(1030, 1300)]
    ports = [*others[:30], *refused[:5], 1500, *refused[5:], *others[30:]]
    res = child(drop_ns, ports=ports, cfg={"timeout": 0.3, "tcp_method": "syn"}, send=send)
    by = once_each(res, ports)
    assert res["batched"] is (send != "sendto")
    assert res["threaded"] is (send == "thread")
    if send != "sendto":  # the refused SYNs were in batches with others (64 per sendmmsg)
        assert res["batch_peak"] > len(refused)
    assert [by[p][1:4] for p in refused] == [["filtered", "local-prohibited", 1]] * len(refused)
    assert all(by[p][1:4] == ["closed", "reset", 1] for p in [*others, 1500])


def test_rate_is_kept(drop_ns: str) -> None:
    ports = list(range(2000, 2300))
    res = child(drop_ns, ports=ports, cfg={"timeout": 0.2, "rate": 1000.0, "tcp_method": "syn"})
    once_each(res, ports)
    assert res["elapsed"] >= 0.9 * (len(ports) - 1) / 1000.0


def test_graceful_stop_finishes_in_flight_without_retries(drop_ns: str) -> None:
    # 200 closed ports answer at once; the stop comes with the 200th result, when the silent
    # ports behind them are in flight: they end after one attempt without their retries, so
    # interrupted (a silence cut short is no result); the rest is interrupted before sending
    silent = list(range(DROP_LO, DROP_LO + 100))
    ports = [*range(3000, 3200), *silent, *range(3200, 6000)]
    cfg = {"timeout": 0.2, "concurrency": 64, "tcp_method": "syn"}
    res = child(drop_ns, ports=ports, cfg=cfg, stop_after=200)
    by = once_each(res, ports)
    assert all(by[p][1:] == ["closed", "reset", 1] for p in range(3000, 3200))
    ended = [p for p in silent if by[p][3] == 1]
    assert ended, "silent ports were in flight at the stop"
    assert all(by[p][1:] == ["error", "interrupted", 1] for p in ended)  # no retry, no filtered
    rest = [r for p, r in by.items() if p not in ended and not 3000 <= p < 3200]
    assert rest and all(r[1:] == ["error", "interrupted", 0] for r in rest)


def test_hard_stop_reports_every_flow_once(drop_ns: str) -> None:
    ports = [*range(DROP_LO, DROP_HI + 1), *range(3000, 5000)]
    cfg = {"timeout": 0.5, "concurrency": 256, "tcp_method": "syn"}
    res = child(drop_ns, ports=ports, cfg=cfg, cancel_after=100)
    by = once_each(res, ports)
    interrupted = [p for p, r in by.items() if r[2] == "interrupted"]
    assert interrupted, "the cancel came while flows were in flight"
    assert all(by[p][1:] == ["error", "interrupted", 0] for p in interrupted)
    # silent ports still in flight at the cancel are among them, never a false filtered
    assert all(by[p][1] != "filtered" or by[p][3] >= 1 for p in by)


def test_a_host_name_is_resolved_then_probed(listen) -> None:  # noqa: F811
    """A planned destination may be a name (an endpoint outside the inventory): the sweep
    hands it to the engine's per-flow path, which resolves it, instead of sending a SYN to a
    name whose answer could never match (it would read as filtered)."""
    import socket

    if socket.getaddrinfo("localhost", None, type=socket.SOCK_STREAM)[0][4][0] != LOCAL:
        pytest.skip("localhost does not resolve to 127.0.0.1 first here")
    lst = listen()
    closed = freed_port()
    flows = [Flow("localhost", lst.port), Flow("localhost", closed), Flow(LOCAL, lst.port)]
    results, engine = run(EngineConfig(timeout=0.5, tcp_method="syn"), flows)
    got = sorted((r.flow.port, r.state, r.reason) for r in results)
    assert got == sorted(
        [(lst.port, "open", "syn-ack"), (closed, "closed", "reset"), (lst.port, "open", "syn-ack")]
    )
    assert engine.stats.tcp_method == "syn"


@pytest.mark.parametrize("sweep_lane", [True, False], ids=["batch", "worker-pool"])
def test_an_output_error_ends_the_run_with_it_never_a_hang(sweep_lane: bool, listen) -> None:  # noqa: F811
    """An exception from the output side (emit: a bug, such as a pass block refusing a result)
    raised inside the batch lane's socket callback was only logged by the event loop; the
    lane then waited for that flow's result for good (a mesh agent that never said done).
    Now the run ends at once and raises the error."""
    import asyncio

    lst = listen()
    flows = [Flow(LOCAL, p) for p in [lst.port, *range(1, 600)]]
    seen: list[Result] = []

    def emit(r: Result) -> None:
        seen.append(r)
        if len(seen) == 50:
            raise ValueError("the output refused a result")

    engine = Engine(EngineConfig(timeout=0.5, tcp_method="syn", sweep=sweep_lane), emit)
    loop = new_loop("uvloop")
    try:
        with pytest.raises(ValueError, match="refused a result"):
            loop.run_until_complete(asyncio.wait_for(engine.run(iter(flows)), 20))
    finally:
        loop.close()
    assert engine.fatal is not None
    assert len({id(r.flow) for r in seen}) == len(seen), "no flow reported twice"


@pytest.mark.parametrize("send", ["thread", "inline"])
def test_a_lane_that_ended_sends_nothing_more(send: str, listen, monkeypatch) -> None:  # noqa: F811
    """After a run ends with an error from the output side (no stop: the plan is not done), a
    callback still to come (a per-flow task's end, a neighbour pause, a settle) calls the
    lane's fill: it must not take flows from the plan and send them through the closed probe
    (with the thread gone, the fourth batch waited for it for good)."""
    import asyncio

    from scanner.probes.syn import SynProber

    monkeypatch.setattr(SynProber, "SEND_THREAD", send == "thread")
    lst = listen()
    flows = iter([Flow(LOCAL, p) for p in [lst.port, *range(1, 3000)]])
    seen: list[Result] = []
    lanes: list[sweep.Sweep] = []
    orig = sweep.Sweep.run

    async def spy(self, it):  # type: ignore[no-untyped-def]
        lanes.append(self)
        return await orig(self, it)

    def emit(r: Result) -> None:
        seen.append(r)
        if len(seen) == 50:
            raise ValueError("the output refused a result")

    monkeypatch.setattr(sweep.Sweep, "run", spy)
    engine = Engine(EngineConfig(timeout=0.5, tcp_method="syn"), emit)
    loop = new_loop("uvloop")
    try:
        with pytest.raises(ValueError, match="refused a result"):
            loop.run_until_complete(asyncio.wait_for(engine.run(flows), 20))
        attempts = engine.stats.attempts
        for _ in range(8):  # as callbacks to come would: more than every batch there is
            lanes[0]._fill()
        loop.run_until_complete(asyncio.sleep(0.05))
        assert engine.stats.attempts == attempts, "the ended lane sent again"
    finally:
        loop.close()
    assert next(flows, None) is not None, "the plan was not done: a fill had flows to take"


@pytest.fixture(scope="module")
def slow_ns():
    """A namespace whose loopback sends through a slow token bucket: SYNs wait in the qdisc,
    charged to the probe's socket, so a small send buffer fills (EAGAIN) while the sweep runs."""
    tbf = ["tbf", "rate", "400kbit", "burst", "1600", "latency", "2s"]
    yield from lo_namespace("sl", "tc", ["qdisc", "add", "dev", "lo", "root", *tbf])


@pytest.mark.parametrize("send", SENDS)
def test_a_full_send_buffer_backs_off_and_never_gives_a_flow_up(slow_ns: str, send: str) -> None:
    """The send buffer fills on every batch (the kernel takes a few SYNs, refuses the rest with
    EAGAIN) yet the sweep makes progress: it backs off and re-sends, as with one sendto per SYN,
    and every flow gets its real answer. A batch of 64 once counted as 64 consecutive resource
    errors, so after ~4 batches a flow was given up as error/no-buffers while SYNs were leaving."""
    from scanner.probes import mmsg

    if send != "sendto" and not mmsg.available():
        pytest.skip("this libc has no sendmmsg/recvmmsg")
    ports = list(range(1000, 1400))
    cfg = {"timeout": 1.0, "concurrency": 400, "tcp_method": "syn"}
    res = child(slow_ns, ports=ports, cfg=cfg, send=send, sndbuf=2048)
    assert res["threaded"] is (send == "thread")
    by = once_each(res, ports)
    assert res["stats"]["backoffs"].get("no-buffers", 0) > 0, "the send buffer filled"
    bad = {p: r for p, r in by.items() if r[1:3] != ["closed", "reset"]}
    assert not bad, f"{len(bad)} flows without their answer: {list(bad.values())[:5]}"
    # the back-off counts resource errors in a row: the last SYNs left, none is owed (with one
    # sendto per SYN a send that went through once did not reset it: it grew all run long)
    assert res["backoff_end"] == 0
    assert res["elapsed"] < 15


@pytest.mark.parametrize("send", ["thread", "inline"])
def test_syns_sent_late_are_not_taken_for_silence(slow_ns: str, send: str) -> None:
    """The sender starved of CPU between queueing a batch and sending it (0.5 s each, against
    a 0.4 s timeout; the token bucket makes the answers take ~1 ms a packet to come): a SYN's
    deadline and RTT start when it left, not when it was queued, so every flow gets its
    answer after one attempt. The loop's tick must not expire a SYN still waiting for the
    thread, nor one whose batch left late before its answer could come."""
    from scanner.probes import mmsg

    if not mmsg.available():
        pytest.skip("this libc has no sendmmsg/recvmmsg")
    ports = list(range(1000, 1060))  # one batch: no answer to an earlier one moves the timeout
    cfg = {"timeout": 0.4, "retries": 1, "tcp_method": "syn"}
    res = child(slow_ns, ports=ports, cfg=cfg, send=send, late=0.5)
    by = once_each(res, ports)
    assert res["threaded"] is (send == "thread")
    bad = {p: r for p, r in by.items() if r[1:4] != ["closed", "reset", 1]}
    assert not bad, f"{len(bad)} flows: {list(bad.values())[:5]}"
    assert res["stats"]["retries"] == 0
    if send == "thread":  # the loop went on reading while the thread slept (inline, it did not)
        assert res["rtt_max"] < 400, res["rtt_max"]


@pytest.mark.parametrize("send", ["thread", "inline"])
def test_a_slow_sendmmsg_call_is_not_taken_for_silence(slow_ns: str, send: str) -> None:
    """The sender starved inside its sendmmsg call (0.5 s between the RTT's start and the
    packets leaving, against a 0.4 s timeout; its batch also left late): a SYN's deadline
    starts when the call returned, not when it began. Counted from when it began, the tick
    expired every SYN the moment its batch came back, before its answer (~1 ms a packet
    through the token bucket) could come; and where the thread sent, the late batch's new
    deadlines went into wheel slots already swept, so its silent flows were never reported
    and the run never ended."""
    from scanner.probes import mmsg

    if not mmsg.available():
        pytest.skip("this libc has no sendmmsg/recvmmsg")
    ports = list(range(1000, 1060))  # one batch
    cfg = {"timeout": 0.4, "retries": 1, "tcp_method": "syn"}
    res = child(slow_ns, wait=30, ports=ports, cfg=cfg, send=send, late=0.01, slow_call=0.5)
    by = once_each(res, ports)
    assert res["threaded"] is (send == "thread")
    bad = {p: r for p, r in by.items() if r[1:4] != ["closed", "reset", 1]}
    assert not bad, f"{len(bad)} flows: {list(bad.values())[:5]}"
    assert res["stats"]["retries"] == 0


@pytest.mark.parametrize("send", ["thread", "inline"])
def test_a_silent_flow_whose_batch_came_back_late_still_ends(drop_ns: str, send: str) -> None:
    """The sender starved inside its sendmmsg call for longer than the timeout, after its
    batch had already left late: the silent flows in it are filtered once their (restarted)
    deadlines pass. Their new wheel slots were behind the tick's cursor (the loop ticked on
    while the thread sent), so they were never swept: no line for them, and no end."""
    from scanner.probes import mmsg

    if not mmsg.available():
        pytest.skip("this libc has no sendmmsg/recvmmsg")
    silent = list(range(DROP_LO, DROP_LO + 20))
    ports = [*silent, *range(1000, 1020)]
    cfg = {"timeout": 0.1, "retries": 0, "tcp_method": "syn"}
    res = child(drop_ns, wait=20, ports=ports, cfg=cfg, send=send, late=0.01, slow_call=0.3)
    by = once_each(res, ports)
    assert res["threaded"] is (send == "thread")
    assert all(by[p][1:4] == ["filtered", "no-response", 1] for p in silent), by
    assert all(by[p][1:4] == ["closed", "reset", 1] for p in range(1000, 1020)), by


@pytest.mark.parametrize("sweep_lane", [True, False], ids=["batch", "worker-pool"])
def test_an_output_error_on_the_last_lines_leaves_the_callers_task_alive(
    sweep_lane: bool,
    listen,  # noqa: F811
) -> None:
    """emit fails on the lines a stopped run writes for its never-launched flows (in the run's
    own task, after its last await): run() raises that error, and the caller's task (a watch
    agent awaits run() in its own) goes on; the run's cancel of itself was left pending and
    cancelled the caller at its next await."""
    import asyncio

    lst = listen()
    flows = [Flow(LOCAL, p) for p in [lst.port, *range(1, 200)]]
    engine: Engine

    def emit(r: Result) -> None:
        if r.reason == "interrupted" and r.attempts == 0:
            raise ValueError("the output refused a result")
        engine.stop()

    cfg = EngineConfig(timeout=0.5, tcp_method="syn", sweep=sweep_lane, concurrency=1)
    engine = Engine(cfg, emit)

    async def caller() -> str:
        with pytest.raises(ValueError, match="refused a result"):
            await engine.run(iter(flows))
        await asyncio.sleep(0.01)
        return "alive"

    loop = new_loop("uvloop")
    try:
        assert loop.run_until_complete(asyncio.wait_for(caller(), 20)) == "alive"
    finally:
        loop.close()
