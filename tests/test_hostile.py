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

from scanner.core import tags
from scanner.mesh.agent import PROTOCOL_VERSION

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
    return Counter(
        (r["state"], r["reason"], r["attempts"]) for r in results if r["state"] != "open"
    )


def leftovers(lab, ports: tuple[int, int] | None = None) -> list[str]:
    """Processes still in a lab host, and sockets still listening there."""
    from scanner.lab.netns import netns_pids

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
    # every lost SYN was sent again: by a retry of ours, or (an attempt that outlived the
    # kernel's 1 s SYN timer, on a busy host) by the kernel within the attempt; both count
    late = round(summary["loss_observed"] * sum(r["rtt_ms"] is not None for r in results))
    assert late > 0.1 * N_NODEPORTS, summary
    assert late >= sum(r["attempts"] > 1 for r in results if r["state"] == "open")
    assert summary["attempts"] == N_NODEPORTS + summary["retries"]
    # whatever was answered was our responder; nothing but silence can be a miss
    assert {(r["state"], r["reason"]) for r in results} <= {
        ("open", "responder"),
        ("filtered", "no-response"),
    }


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


def test_a_syn_the_kernel_sent_again_counts_as_loss(lossy) -> None:
    """An attempt longer than the kernel's 1 s SYN timer is answered on the kernel's own
    retransmission when the first SYN is lost. Under load the loop expires attempts late, so
    this happened to most lost SYNs: the sweep above saw loss_observed 0.002-0.06 instead of
    ~0.2, kept 2 retries instead of 8, and missed open ports (filtered/no-response after 3
    attempts). That lost SYN is loss: here (every other SYN dropped, a 3 s timeout) the one
    flow is answered on its first attempt, and the loss is seen."""
    lab = lossy
    lab.nft("node2", loss_rules("tcp flags syn tcp dport 30001", 0).replace(
        "policy accept;\n", "policy accept;\n  tcp flags syn tcp dport 30001 numgen inc mod 2 == 0 drop\n"
    ))  # fmt: skip
    code, recs, err = scan(
        lab, "node1", addr(lab, "node2"), "-p", "30001", "--secret", SECRET,
        "--method", "connect", "--timeout", "3", "--min-timeout", "3",
    )  # fmt: skip
    assert code == 0, err
    results, summary = stream(recs)
    assert [(r["state"], r["reason"], r["attempts"]) for r in results] == [
        ("open", "responder", 1)
    ], results
    assert results[0]["rtt_ms"] is not None
    assert summary["loss_observed"] == 1.0, summary


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

    from scanner.core.flows import Flow
    from scanner.engine.engine import Engine, EngineConfig
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


# ---- check and mesh: an inventory and a catalog of lab requirements only ------------------------

CATALOG_ENTRY = """
[[requirement]]
id = "lab.{proto}"
component = "lab"
proto = "{proto}"
ports = "{ports}"
description = "lab {proto}"
dst_role = "node"
src_roles = ["node"]
"""


def lab_files(lab, tmp: Path, tcp_ports: str) -> tuple[Path, Path]:
    """(inventory, catalog): the lab's hosts, and one TCP requirement; packaged ones disabled."""
    from scanner.catalog import load_catalog
    from scanner.lab.lab import inventory_doc

    inv = tmp / "inventory.yml"
    inv.write_text(yaml.safe_dump(inventory_doc(lab), sort_keys=False))
    text = "".join(f'[[requirement]]\nid = "{r.id}"\ndisabled = true\n\n' for r in load_catalog())
    cat = tmp / "lab.toml"
    cat.write_text(text + CATALOG_ENTRY.format(proto="tcp", ports=tcp_ports))
    return inv, cat


DROP_TCP = """table inet hostile {{
 chain input {{
  type filter hook input priority 0; policy accept;
  tcp dport {ports} drop
 }}
}}
"""


def check_argv(inv: Path, cat: Path, *extra: str) -> list[str]:
    return [PY, "-m", "scanner", "check", "-i", str(inv), "--catalog", str(cat),
            "--from", "node1", "--secret", SECRET, "--no-progress", *extra]  # fmt: skip


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_check_host_dies_halfway(make_lab, tmp_path: Path, loop: str) -> None:
    lab = make_lab(hosts=3)
    inv, cat = lab_files(lab, tmp_path, "7000-7199")
    procs = [start_responder(lab, h, "T:7000-7199")[0] for h in ("node2", "node3")]
    dying = lab.host("node3")
    p = lab.popen(
        "node1", check_argv(inv, cat, "--rate", "250", "--loop", loop),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        out = Lines(p)
        out.until(lambda rs: sum(r.get("host") == "node3" for r in rs) >= 10, timeout=30)
        subprocess.run(["ip", "-n", dying.ns, "link", "set", "eth0", "down"], check=True)
        recs = parse_lines(out.rest(timeout=60))
        code = p.wait(timeout=10)
        err = p.stderr.read().decode() if p.stderr else ""
    finally:
        if p.poll() is None:
            p.kill()
        for q in procs:
            stop_proc(q)
    assert "Traceback" not in err, err[-3000:]
    results, summary = stream(recs)
    assert code == 1, err[-2000:]  # flows failed: exit 1, not a crash and not "interrupted"
    assert "interrupted" not in summary
    by_host: dict[str, list[dict]] = {"node2": [], "node3": []}
    for r in results:
        by_host[r["host"]].append(r)
    assert sorted(r["port"] for r in by_host["node2"]) == list(range(7000, 7200))
    assert sorted(r["port"] for r in by_host["node3"]) == list(range(7000, 7200))
    # the rest of the run is unaffected: every flow to the live host passed
    assert {(r["state"], r["reason"], r["verdict"]) for r in by_host["node2"]} == {
        ("open", "responder", "pass")
    }
    dead = [r for r in by_host["node3"] if r["state"] != "open"]
    # most of node3's flows came after its link went down; each ends with a reason
    assert len(dead) >= 100, Counter((r["state"], r["reason"]) for r in by_host["node3"])
    for r in dead:
        assert r["state"] in ("filtered", "error") and r["reason"], r
        assert r["verdict"] in ("fail", "unknown"), r
        assert r["reason"] in ("no-response", "host-unreach") or r["state"] == "error", r
    assert summary["verdicts"]["pass"] == 200 + (200 - len(dead))
    assert "FAIL" in err and "node3" in err


def test_check_sigint_with_shards_exit_130_and_nothing_orphaned(make_lab, tmp_path: Path) -> None:
    from scanner.lab.netns import netns_pids

    lab = make_lab(hosts=3)
    inv, cat = lab_files(lab, tmp_path, "30000-30749")  # 1,500 flows: shard processes
    resp, _ = start_responder(lab, "node2", "T:30000-30749")
    lab.nft("node3", DROP_TCP.format(ports="30000-30749"))
    p = lab.popen(
        "node1", check_argv(inv, cat, "--timeout", "4", "--workers", "2"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        out = Lines(p)
        out.until(lambda rs: sum(r["type"] == "result" for r in rs) >= 50, timeout=30)
        time.sleep(0.2)  # the probes to the dropping host are in flight, waiting their 4 s
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        recs = parse_lines(out.rest(timeout=30))
        code = p.wait(timeout=10)
        took = time.monotonic() - t0
        err = p.stderr.read().decode() if p.stderr else ""
    finally:
        if p.poll() is None:
            p.kill()
        stop_proc(resp)
    assert code == 130, err[-2000:]
    assert "Traceback" not in err
    results, summary = stream(recs)
    assert summary["interrupted"] is True
    assert summary["workers"] == 2
    never = [r for r in results if r["reason"] == "interrupted"]
    assert never and all(r["state"] == "error" and r["attempts"] == 0 for r in never)
    assert all(r["verdict"] == "unknown" for r in never)
    # in-flight probes finished (their own timeout), they were not retried after the signal
    assert took < 4 * 2 + 5, took
    assert not netns_pids(lab.host("node1").ns), "a shard process outlived the check"


# ---- the mesh: the coordinator killed or interrupted while probes wait -----------------------

AGENT_CMD = f"{PY} -m scanner agent"


def start_mesh(lab, tmp: Path, *extra: str) -> subprocess.Popen:
    inv, cat = lab_files(lab, tmp, "7000-7009")
    # node3 answers nothing: probes to it wait out their (long) timeout
    lab.nft("node3", DROP_TCP.format(ports="7000-7009"))
    return subprocess.Popen(
        [PY, "-m", "scanner", "mesh", "-i", str(inv), "--catalog", str(cat),
         "--exec", lab.exec_template(), "--agent-cmd", AGENT_CMD, "--loop", "asyncio", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip


@pytest.mark.parametrize("when", ["at-start", "while-probing"])
def test_mesh_sigkill_leaves_no_process_and_no_listener(make_lab, tmp_path: Path, when: str):
    lab = make_lab(hosts=3)
    p = start_mesh(lab, tmp_path, "--timeout", "30")
    try:
        out = Lines(p)
        if when == "at-start":
            # as soon as the first agent runs: hello / respond phase, nothing probed yet
            from scanner.lab.netns import netns_pids

            deadline = time.monotonic() + 30
            while not any(netns_pids(h.ns) for h in lab.hosts):
                assert time.monotonic() < deadline and p.poll() is None, "no agent started"
                time.sleep(0.01)
        else:
            out.until(lambda rs: sum(r["type"] == "result" for r in rs) >= 5, timeout=30)
            # probes to node3 are in flight (30 s each); every host runs a responder
            assert all(
                lab.run(h.name, ["ss", "-Hltn"], capture_output=True, text=True).stdout
                for h in lab.hosts
            )
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    left = wait_no_leftovers(lab, within=5.0)
    assert not left, left


def _mesh_interrupted(lab, p: subprocess.Popen, presses: int) -> tuple[int, list[dict], str, float]:
    try:
        out = Lines(p)
        out.until(lambda rs: sum(r["type"] == "result" for r in rs) >= 5, timeout=30)
        time.sleep(0.3)
        t0 = time.monotonic()
        for _ in range(presses):
            p.send_signal(signal.SIGINT)
            time.sleep(0.5)
        raw = out.rest(timeout=40)
        code = p.wait(timeout=10)
        took = time.monotonic() - t0
        err = p.stderr.read().decode() if p.stderr else ""
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return code, parse_lines(raw), err, took


def _check_interrupted_mesh(code: int, recs: list[dict], err: str) -> list[dict]:
    assert code == 130, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    results, summary = stream(recs)
    assert summary.get("interrupted") is True
    # flows to the silent host never got an answer; none of them may be called a pass
    to_node3 = [r for r in results if r["host"] == "node3"]
    assert to_node3 and all(r["verdict"] != "pass" for r in to_node3)
    return results


def test_mesh_one_sigint_waits_for_in_flight_then_summarises(make_lab, tmp_path: Path) -> None:
    lab = make_lab(hosts=3)
    p = start_mesh(lab, tmp_path, "--timeout", "3")
    code, recs, err, took = _mesh_interrupted(lab, p, presses=1)
    _check_interrupted_mesh(code, recs, err)
    assert took < 25, took
    left = wait_no_leftovers(lab, within=5.0)
    assert not left, left


def test_mesh_two_sigints_stop_at_once(make_lab, tmp_path: Path) -> None:
    lab = make_lab(hosts=3)
    p = start_mesh(lab, tmp_path, "--timeout", "60")
    code, recs, err, took = _mesh_interrupted(lab, p, presses=2)
    results = _check_interrupted_mesh(code, recs, err)
    assert took < 20, took  # not the 60 s the in-flight probes would wait
    assert all(r["state"] == "error" for r in results if r["host"] == "node3")
    left = wait_no_leftovers(lab, within=5.0)
    assert not left, left


# ---- hostile input on the wire: a responder and an agent under a seeded fuzz ---------------------

FUZZ_TCP = (45000, 45009)
FUZZ_UDP = (45000, 45009)


def _udp_ask(dst: str, port: int, data: bytes, wait: float) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((dst, port))
        s.settimeout(wait)
        s.send(data)
        try:
            return s.recv(65535)
        except (TimeoutError, ConnectionRefusedError):
            return None


def _tagged_roundtrip(dst: str, port: int, secret: bytes) -> bool:
    nonce = os.urandom(tags.NONCE_LEN)
    reply = _udp_ask(dst, port, b"x" * 7 + tags.make_tag(secret, nonce), wait=2.0)
    return (
        reply is not None
        and len(reply) == tags.TAG_LEN
        and tags.check_reply(reply, secret) == nonce
    )


def _token(dst: str, port: int) -> bytes:
    with socket.create_connection((dst, port), timeout=3) as c:
        got = b""
        while len(got) < tags.TOKEN_LEN:
            chunk = c.recv(64)
            if not chunk:
                break
            got += chunk
        return got


def _garbage_datagram(rng: random.Random, secret: bytes) -> bytes:
    kind = rng.randrange(6)
    tag = tags.make_tag(secret, rng.randbytes(tags.NONCE_LEN))
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 1500))
    if kind == 1:  # a truncated valid tag
        return tag[: rng.randrange(0, tags.TAG_LEN)]
    if kind == 2:  # a tag with a wrong mac
        return tag[:-1] + bytes([tag[-1] ^ 0xFF])
    if kind == 3:  # oversized: up to 65,000 bytes of noise
        return rng.randbytes(rng.randrange(9000, 65001))
    if kind == 4:  # magic repeated, never a valid tag
        return tags.MAGIC * rng.randrange(1, 4000)
    return tags.make_tag(b"another-secret", rng.randbytes(tags.NONCE_LEN))


def test_responder_survives_seeded_garbage_and_half_open_connections(loss_lab) -> None:
    lab = loss_lab
    rng = random.Random(10_2026)
    host = lab.host("node4")
    dst, me = host.addr, lab.host_addr
    assert me, "the lab needs its host link"
    secret = SECRET.encode()
    tcp = list(range(FUZZ_TCP[0], FUZZ_TCP[1] + 1))
    udp = list(range(FUZZ_UDP[0], FUZZ_UDP[1] + 1))
    p, _ = start_responder(
        lab, "node4", f"T:{FUZZ_TCP[0]}-{FUZZ_TCP[1]},U:{FUZZ_UDP[0]}-{FUZZ_UDP[1]}"
    )
    held: list[socket.socket] = []
    try:
        # UDP: garbage, truncated, oversized, foreign tags: never an answer
        answered = []
        for i in range(300):
            data = _garbage_datagram(rng, secret)
            port = rng.choice(udp)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((dst, port))
                s.send(data)
                if i % 30 == 0:  # now and then, wait: nothing may come back
                    s.settimeout(0.05)
                    with contextlib.suppress(TimeoutError, ConnectionRefusedError):
                        answered.append((len(data), s.recv(65535)))
        assert not answered
        # a valid tag at the end of 65,000 bytes is answered with 20 bytes, never more
        nonce = rng.randbytes(tags.NONCE_LEN)
        big = rng.randbytes(65000 - tags.TAG_LEN) + tags.make_tag(secret, nonce)
        reply = _udp_ask(dst, udp[0], big, wait=2.0)
        assert reply is not None and tags.check_reply(reply, secret) == nonce and len(reply) == 20
        # TCP: garbage senders, silent connections kept open, RST right after connect
        for _ in range(100):
            port = rng.choice(tcp)
            kind = rng.randrange(3)
            c = socket.socket()
            c.settimeout(2)
            c.connect((dst, port))
            if kind == 0:
                with contextlib.suppress(OSError):
                    c.sendall(rng.randbytes(rng.randrange(1, 65536)))
                c.close()
            elif kind == 1:
                held.append(c)  # never speaks, never closes (until the end)
            else:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                c.close()
        # half-open: the far host never sees our final ACK (nor anything after it), so 200
        # connections to one port sit in its SYN queue
        flood = tcp[-1]
        lab.nft(
            "node4",
            f"table inet {TABLE} {{\n chain input {{\n"
            f"  type filter hook input priority 0; policy accept;\n"
            f"  ip saddr {me} tcp dport {flood} tcp flags & (syn | ack) == ack drop\n }}\n}}\n",
        )
        for _ in range(200):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex((dst, flood))
            held.append(c)
        time.sleep(0.3)
        syn_recv = lab.run(
            "node4", ["ss", "-Htn", "state", "syn-recv", f"sport = :{flood}"],
            capture_output=True, text=True,
        ).stdout.strip().splitlines()  # fmt: skip
        assert len(syn_recv) >= 100, len(syn_recv)
        clear_rules(lab, ["node4"])
        # alive, and still answering a valid probe on every port, the flooded one too
        assert p.poll() is None, stop_proc(p)
        for port in tcp:
            assert _token(dst, port) == tags.tcp_token(secret, port), port
        for port in udp:
            assert _tagged_roundtrip(dst, port, secret), port
    finally:
        clear_rules(lab, ["node4"])
        for c in held:
            c.close()
        out = stop_proc(p)
    exit_rec = parse_lines(out)[-1]
    assert exit_rec["type"] == "exit", exit_rec
    st = exit_rec["stats"]
    assert st["udp_replied"] == 1 + len(udp)  # exactly the valid tags, nothing else
    assert st["udp_ignored"] > 0


class Agent:
    """`portmesh agent` in a lab host, spoken to over its stdin/stdout."""

    def __init__(self, lab, host: str) -> None:
        self.p = lab.popen(
            host, [PY, "-m", "scanner", "agent"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        self.out = Lines(self.p)

    def send(self, line: bytes | dict) -> None:
        assert self.p.stdin is not None
        raw = orjson.dumps(line) if isinstance(line, dict) else line
        self.p.stdin.write(raw + b"\n")
        self.p.stdin.flush()

    def count(self, kind: str, n: int, timeout: float = 20) -> list[dict]:
        return self.out.until(lambda rs: sum(r["type"] == kind for r in rs) >= n, timeout)


def _bad_control_lines(rng: random.Random) -> list[bytes]:
    """Seeded bad lines: none of them may be accepted, each gets one error record."""
    lines: list[bytes] = []
    for _ in range(120):
        kind = rng.randrange(9)
        if kind == 0:
            lines.append(rng.randbytes(rng.randrange(1, 300)).replace(b"\n", b"\0"))
        elif kind == 1:
            lines.append(b"[" * rng.randrange(1, 100_000))  # deep nesting
        elif kind == 2:
            lines.append(b"\xff\xfe" + "caf\u00e9".encode("latin-1"))  # not UTF-8
        elif kind == 3:
            lines.append(orjson.dumps(rng.choice([[], 0, "hello", None, 1e308, {"type": []}])))
        elif kind == 4:
            lines.append(
                orjson.dumps({"type": rng.choice(["", "HELLO", "ready", "result", "exit"])})
            )
        elif kind == 5:  # out of order: a second hello, a second respond
            lines.append(
                orjson.dumps(rng.choice([
                    {"type": "hello", "version": PROTOCOL_VERSION, "secret": "other", "name": "node9"},
                    {"type": "respond", "tcp": "46005", "udp": "", "ttl": 60, "witness": False},
                ]))
            )  # fmt: skip
        elif kind == 6:  # probe with broken fields
            lines.append(
                orjson.dumps(rng.choice([
                    {"type": "probe"},
                    {"type": "probe", "scan_id": 1},
                    {"type": "probe", "scan_id": "x", "site": [], "catalog": {}},
                    {"type": "probe", "scan_id": "x", "site": {"clusters": [{"hosts": "x"}]}},
                ]))
            )  # fmt: skip
        elif kind == 7:
            lines.append(b'{"type": "hello", "version": %d}' % 2**70)  # beyond 64 bits
        else:
            lines.append(b'{"type": "stop"' + rng.randbytes(3).replace(b"\n", b" "))  # truncated
    return lines


def test_agent_with_a_live_responder_survives_bad_control_lines(loss_lab) -> None:
    lab = loss_lab
    host = lab.host("node4")
    a = Agent(lab, "node4")
    try:
        a.send({"type": "hello", "version": PROTOCOL_VERSION, "secret": SECRET, "name": "node4"})
        a.count("hello", 1)
        a.send({"type": "respond", "tcp": "46000-46004", "udp": "46000-46004", "ttl": 60,
                "witness": False})  # fmt: skip
        ready = [r for r in a.count("ready", 1) if r["type"] == "ready"][0]
        assert ready["bound"] == {"tcp": "46000-46004", "udp": "46000-46004"}, ready
        bad = _bad_control_lines(random.Random(20261010))
        for line in bad:
            a.send(line)
        recs = a.count("error", len(bad), timeout=30)
        errors = [r for r in recs if r["type"] == "error"]
        assert len(errors) == len(bad)
        assert all(isinstance(e["reason"], str) and e["reason"] for e in errors)
        assert any("out of order" in e["reason"] for e in errors)
        # the responder was not disturbed by any of it
        for port in range(46000, 46005):
            assert _token(host.addr, port) == tags.tcp_token(SECRET.encode(), port)
            assert _tagged_roundtrip(host.addr, port, SECRET.encode())
        a.send({"type": "stop"})
        raw = a.out.rest(timeout=20)
        code = a.p.wait(timeout=10)
    finally:
        if a.p.poll() is None:
            a.p.kill()
            a.p.wait()
    err = a.p.stderr.read().decode() if a.p.stderr else ""
    assert code == 0, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    recs = parse_lines(raw)
    assert recs[-1]["type"] == "exit", recs[-3:]
    assert sum(r["type"] == "hello" for r in recs) == 1  # the second hellos were refused
    assert sum(r["type"] == "ready" for r in recs) == 1  # and the second respond
    ss = lab.run("node4", ["ss", "-Hltnu", "sport", ">= :46000", "and", "sport", "<= :46005"],
                 capture_output=True, text=True).stdout  # fmt: skip
    assert not ss.strip(), ss
    assert not os.path.exists(f"/proc/{ready['pid']}"), "the agent's responder outlived it"


def test_agent_eof_in_the_middle_of_a_line_ends_it_and_its_responder(loss_lab) -> None:
    lab = loss_lab
    a = Agent(lab, "node4")
    try:
        a.send({"type": "hello", "version": PROTOCOL_VERSION, "secret": SECRET, "name": "node4"})
        a.send({"type": "respond", "tcp": "46010", "udp": "", "ttl": 60, "witness": False})
        ready = [r for r in a.count("ready", 1) if r["type"] == "ready"][0]
        assert a.p.stdin is not None
        a.p.stdin.write(b'{"type": "probe", "scan_id": "half')  # and then the channel drops
        a.p.stdin.close()
        raw = a.out.rest(timeout=20)
        code = a.p.wait(timeout=10)
    finally:
        if a.p.poll() is None:
            a.p.kill()
            a.p.wait()
    err = a.p.stderr.read().decode() if a.p.stderr else ""
    assert code == 0, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    recs = parse_lines(raw)
    assert any(r["type"] == "error" for r in recs)  # the half line was refused, not run
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{ready['pid']}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{ready['pid']}"), "the agent's responder outlived it"
