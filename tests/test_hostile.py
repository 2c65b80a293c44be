"""Exact on hostile networks (issue 10): loss, dying hosts, killed runs, tight limits, garbage.

Every test here runs real processes in real lab namespaces with real nftables rules:

  loss        nftables ``numgen random mod 100 < 20 drop`` on the far hosts' input (TCP SYNs,
              UDP datagrams, ICMP echo requests); real responders answer every port, so the
              truth is "every flow open" and any other state is a miss.
  dying host  a destination's veth set down in the middle of ``portmesh check``.
  killed runs SIGKILL of ``portmesh mesh`` while probes wait on long timeouts; SIGINT during
              ``check`` (with shard processes) and ``mesh``.
  limits      ``ulimit -n 256`` and a 1,000-port ``net.ipv4.ip_local_port_range`` inside the
              scanning namespace (both per process / per netns: the machine is not touched).
  garbage     a seeded fuzz against a responder (random, truncated, oversized datagrams;
              TCP connections that send garbage, never speak, or stay half-open) and against
              ``portmesh agent`` with a live responder.

Run times stay small: the full NodePort range only where the issue asks for it.
"""

from __future__ import annotations

import contextlib
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from scanner import tags

pytestmark = pytest.mark.lab

PY = sys.executable
SECRET = "hostile-lab-secret"
NODEPORTS = "30000-32767"
N_NODEPORTS = 2768
UDP_LO, UDP_HI = 40000, 40299  # responder UDP ports of the loss lab (300)
TABLE = "hostile"


# ---- helpers ----------------------------------------------------------------------------------


def parse_lines(out: bytes) -> list[dict[str, Any]]:
    """Every line must be one JSON object: NDJSON stays valid whatever happened."""
    recs = []
    for i, line in enumerate(out.splitlines()):
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError as e:  # pragma: no cover - the assertion message
            raise AssertionError(f"line {i + 1} is not JSON ({e}): {line[:200]!r}") from None
        assert isinstance(rec, dict), line[:200]
        recs.append(rec)
    return recs


def stream(recs: list[dict[str, Any]]) -> tuple[list[dict], dict]:
    """(results, summary) of a run's records, checking start ... summary and planned == results."""
    assert recs, "no output"
    assert recs[0]["type"] == "start", recs[0]
    summary = recs[-1]
    assert summary["type"] == "summary", summary
    results = [r for r in recs if r["type"] == "result"]
    assert summary["planned"] == summary["results"] == len(results) == recs[0]["planned"]
    return results, summary


def loss_rules(match: str, pct: int) -> str:
    """A ruleset that replaces our table: drop ``pct``% of the packets ``match`` selects."""
    return (
        f"table inet {TABLE}\ndelete table inet {TABLE}\n"
        f"table inet {TABLE} {{\n chain input {{\n"
        f"  type filter hook input priority 0; policy accept;\n"
        + (f"  {match} numgen random mod 100 < {pct} drop\n" if pct else "")
        + " }\n}\n"
    )


def clear_rules(lab, hosts: list[str]) -> None:
    for h in hosts:
        lab.run(h, ["nft", "delete", "table", "inet", TABLE], capture_output=True)


def start_responder(lab, host: str, ports: str, ttl: int = 120) -> tuple[subprocess.Popen, dict]:
    p = lab.popen(
        host,
        [PY, "-m", "scanner", "respond", "-p", ports, "--secret", SECRET, "--ttl", str(ttl)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line, (p.wait(), p.stderr.read() if p.stderr else b"")
    ready = orjson.loads(line)
    assert ready["type"] == "ready" and not ready["failed"], ready
    return p, ready


def stop_proc(p: subprocess.Popen) -> bytes:
    if p.poll() is None:
        p.terminate()
    try:
        out, _ = p.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
    return out or b""


def scan(lab, host: str, *args: str, pre: tuple[str, ...] = (), timeout: float = 120):
    """`portmesh scan` inside a lab host; (exit code, records, stderr)."""
    cp = lab.run(
        host,
        [*pre, PY, "-m", "scanner", "scan", *args, "--no-progress"],
        capture_output=True,
        timeout=timeout,
    )
    assert b"Traceback" not in cp.stderr, cp.stderr.decode()[-3000:]
    return cp.returncode, parse_lines(cp.stdout), cp.stderr.decode()


def misses(results: list[dict]) -> Counter:
    """(state, reason, attempts) of every flow that is not open: all of them are misses here."""
    return Counter((r["state"], r["reason"], r["attempts"]) for r in results if r["state"] != "open")


def leftovers(lab, ports: tuple[int, int] | None = None) -> list[str]:
    """Processes still in a lab host, and sockets still listening there."""
    from scanner.lab import netns_pids

    left = []
    for h in lab.hosts:
        pids = netns_pids(h.ns)
        if pids:
            left.append(f"{h.name}: pids {pids}")
        ss = lab.run(h.name, ["ss", "-Hltnu"], capture_output=True, text=True).stdout.strip()
        if ss:
            left.append(f"{h.name}: listening {ss.splitlines()[:3]}")
    return left


def wait_no_leftovers(lab, within: float = 5.0) -> list[str]:
    deadline = time.monotonic() + within
    left = leftovers(lab)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = leftovers(lab)
    return left


class Lines:
    """Read NDJSON lines from a running process's stdout without blocking forever."""

    def __init__(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.fd = proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.fd, selectors.EVENT_READ)
        self.buf = b""
        self.raw = b""  # every complete line read so far
        self.eof = False

    def _read(self, timeout: float) -> None:
        if self.eof or not self.sel.select(timeout):
            return
        try:
            chunk = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return
        if not chunk:
            self.eof = True
            return
        self.buf += chunk
        cut = self.buf.rfind(b"\n")
        if cut >= 0:
            self.raw += self.buf[: cut + 1]
            self.buf = self.buf[cut + 1 :]

    def until(self, want, timeout: float) -> list[dict]:
        """Read until want(records so far) is true; the records (AssertionError on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            recs = parse_lines(self.raw)
            if want(recs):
                return recs
            left = deadline - time.monotonic()
            assert left > 0 and not self.eof, f"gave up waiting; got {len(recs)} lines: {recs[-3:]}"
            self._read(min(left, 0.2))

    def rest(self, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while not self.eof:
            assert time.monotonic() < deadline, "the process did not end"
            self._read(0.2)
        assert not self.buf, f"a partial last line: {self.buf[:200]!r}"
        return self.raw


# ---- the loss lab: node1 scans; node2..node4 answer every port with a responder ---------------

TARGETS = ["node2", "node3", "node4"]


@pytest.fixture(scope="module")
def loss_lab(module_lab) -> Iterator[Any]:
    lab = module_lab(hosts=4)
    procs = [
        start_responder(lab, h, f"T:{NODEPORTS},U:{UDP_LO}-{UDP_HI}", ttl=600)[0] for h in TARGETS
    ]
    # a closed UDP port answered by a far host's ICMP error is not what these tests are about;
    # nothing here probes one, but lift the limit so that a stray one cannot skew the loss
    for h in TARGETS:
        lab.run(h, ["sysctl", "-qw", "net.ipv4.icmp_ratelimit=0"], check=True)
    try:
        yield lab
    finally:
        for p in procs:
            stop_proc(p)


@pytest.fixture
def lossy(loss_lab) -> Iterator[Any]:
    """The loss lab; whatever loss rules a test loads are removed after it."""
    yield loss_lab
    clear_rules(loss_lab, TARGETS)


def addr(lab, host: str) -> str:
    return lab.host(host).addr


# ---- loss: TCP ----------------------------------------------------------------------------------

SYN_MATCH = f"tcp flags syn tcp dport {NODEPORTS}"


def test_tcp_syn_loss_20pct_default_sweep_sees_and_reports_the_loss(lossy) -> None:
    lab = lossy
    lab.nft("node2", loss_rules(SYN_MATCH, 20))
    code, recs, err = scan(lab, "node1", addr(lab, "node2"), "-p", NODEPORTS, "--secret", SECRET)
    assert code == 0, err
    results, summary = stream(recs)
    assert summary["planned"] == N_NODEPORTS
    assert sorted(r["port"] for r in results) == list(range(30000, 32768))
    # the loss is seen and reported: the share of answered flows that needed a retry
    assert 0.1 <= summary["loss_observed"] <= 0.3, summary
    assert summary["retries"] > 0.1 * N_NODEPORTS
    assert summary["attempts"] == N_NODEPORTS + summary["retries"]
    # whatever was answered was our responder; nothing but silence can be a miss
    assert {(r["state"], r["reason"]) for r in results} <= {
        ("open", "responder"),
        ("filtered", "no-response"),
    }


@pytest.mark.xfail(
    strict=True,
    reason="BUG: engine._retries_allowed gives up a flow whose retry was silent before the "
    "late answers of the retries sent with it are counted (same loop iteration): the first "
    "wave's doubly-dropped ports end filtered/no-response after 2 attempts (1 sweep in 3)",
)
def test_tcp_syn_loss_20pct_default_sweep_is_exact_sweep_after_sweep(lossy) -> None:
    """The issue's claim: a default sweep under 20% SYN loss calls every port open, every time.

    Up to 12 sweeps (the first miss ends the test): one exact sweep proves little, since a
    miss needs two drops of the same port plus a race; 12 exact sweeps in a row do.
    """
    lab = lossy
    lab.nft("node2", loss_rules(SYN_MATCH, 20))
    for sweep in range(12):
        code, recs, err = scan(
            lab, "node1", addr(lab, "node2"), "-p", NODEPORTS, "--secret", SECRET
        )
        assert code == 0, err
        results, summary = stream(recs)
        assert not misses(results), (sweep, misses(results), summary)


# ---- loss: UDP ----------------------------------------------------------------------------------


def test_udp_loss_20pct_with_responders_is_exact(lossy) -> None:
    lab = lossy
    ports = f"{UDP_LO}-{UDP_HI}"
    for h in TARGETS:
        lab.nft(h, loss_rules(f"udp dport {ports}", 20))
    code, recs, err = scan(
        lab, "node1", *(addr(lab, h) for h in TARGETS), "-p", f"U:{ports}", "--secret", SECRET
    )
    assert code == 0, err
    results, summary = stream(recs)
    assert summary["planned"] == 3 * 300
    assert not misses(results), (misses(results), summary)
    assert {r["reason"] for r in results} == {"responder"}
    assert 0.1 <= summary["loss_observed"] <= 0.3, summary
    assert summary["retries"] > 0


# ---- loss: ICMP (in-process engines in the root namespace, over the lab's host link) -----------


def _icmp_runs(lab, runs: int, copies: int) -> list[list]:
    """``runs`` independent engines at once (each like one `scan --icmp` of the targets),
    each probing every target ``copies`` times; the results of each run."""
    import asyncio

    from scanner.engine import Engine, EngineConfig
    from scanner.flows import Flow
    from scanner.probes.base import ProbeOptions

    async def one() -> list:
        out: list = []
        eng = Engine(EngineConfig(probe_options=ProbeOptions(secret=SECRET.encode())), out.append)
        flows = [Flow(addr(lab, h), None, "icmp", h) for h in TARGETS for _ in range(copies)]
        await eng.run(iter(flows))
        return out

    async def main() -> list[list]:
        return list(await asyncio.gather(*(one() for _ in range(runs))))

    return asyncio.run(main())


def test_icmp_loss_20pct_many_flows_in_one_run_is_exact(lossy) -> None:
    lab = lossy
    for h in TARGETS:
        lab.nft(h, loss_rules("icmp type echo-request", 20))
    (results,) = _icmp_runs(lab, runs=1, copies=40)
    assert len(results) == 3 * 40
    bad = Counter((r.state, r.reason, r.attempts) for r in results if r.state != "open")
    assert not bad, bad
    late = sum(1 for r in results if r.attempts > 1)
    assert 0.05 * len(results) <= late <= 0.4 * len(results)  # the loss was there


@pytest.mark.xfail(
    strict=True,
    reason="BUG: a run with fewer than 20 answered flows (ICMP to a 3-node cluster) never "
    "raises its retries (engine._retries_allowed), so at 20% loss 4% of hosts read "
    "filtered/no-response after 2 attempts",
)
def test_icmp_loss_20pct_small_runs_are_exact(lossy) -> None:
    """60 independent `scan --icmp` runs of a 3-host cluster (180 flows) at 20% echo loss."""
    lab = lossy
    for h in TARGETS:
        lab.nft(h, loss_rules("icmp type echo-request", 20))
    runs = _icmp_runs(lab, runs=60, copies=1)
    bad = Counter((r.state, r.reason, r.attempts) for rs in runs for r in rs if r.state != "open")
    assert sum(len(rs) for rs in runs) == 180
    assert not bad, bad


# ---- tight limits -------------------------------------------------------------------------------


def test_ulimit_256_full_sweep_of_three_hosts_is_exact(loss_lab) -> None:
    lab = loss_lab
    code, recs, err = scan(
        lab, "node1", *(addr(lab, h) for h in TARGETS), "-p", NODEPORTS, "--secret", SECRET,
        pre=("bash", "-c", 'ulimit -n 256 && exec "$@"', "sh"),
    )  # fmt: skip
    assert code == 0, err
    results, summary = stream(recs)
    assert summary["planned"] == 3 * N_NODEPORTS
    assert not misses(results), misses(results)
    assert {r["reason"] for r in results} == {"responder"}
    # each process (the parent and every shard) lives under the same 256-descriptor limit
    assert summary["concurrency"] < 256 * summary["workers"], summary
    assert summary["concurrency"] // summary["workers"] < 256 - 64


def test_ulimit_256_with_concurrency_5000_is_sized_down_not_a_crash(loss_lab) -> None:
    lab = loss_lab
    code, recs, err = scan(
        lab, "node1", addr(lab, "node2"), "-p", NODEPORTS, "--secret", SECRET,
        "--concurrency", "5000", "--workers", "1",
        pre=("bash", "-c", 'ulimit -n 256 && exec "$@"', "sh"),
    )  # fmt: skip
    assert code == 0, err
    results, summary = stream(recs)
    assert not misses(results), misses(results)
    assert 0 < summary["concurrency"] < 256, summary
    assert "fd-exhausted" not in str(summary.get("backoffs", {})), summary


def test_narrow_ephemeral_port_range_full_sweep_is_exact(loss_lab) -> None:
    lab = loss_lab
    sysctl = "net.ipv4.ip_local_port_range"
    old = lab.run("node1", ["sysctl", "-n", sysctl], capture_output=True, text=True, check=True)
    lab.run("node1", ["sysctl", "-qw", f"{sysctl}=50000 50999"], check=True)
    try:
        code, recs, err = scan(
            lab, "node1", *(addr(lab, h) for h in TARGETS), "-p", NODEPORTS, "--secret", SECRET
        )
    finally:
        lab.run("node1", ["sysctl", "-qw", f"{sysctl}={' '.join(old.stdout.split())}"])
    assert code == 0, err
    results, summary = stream(recs)
    assert summary["planned"] == 3 * N_NODEPORTS
    assert not misses(results), (misses(results), summary.get("backoffs"))
    assert {r["reason"] for r in results} == {"responder"}
