"""`python -m scanner scan` as a user runs it: subprocesses, real listeners, pipes and signals."""

from __future__ import annotations

import contextlib
import os
import pty
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

LOCAL = "127.0.0.1"
SCAN = [sys.executable, "-m", "scanner", "scan"]


class Listener:
    """A TCP listener on 127.0.0.1 port 0; a thread accepts and closes every connection."""

    def __init__(self) -> None:
        self.sock = socket.create_server((LOCAL, 0), backlog=256)
        self.sock.settimeout(0.05)
        self.port: int = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                conn, _ = self.sock.accept()
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


CLOSED_REASON = {"connect": "conn-refused", "syn": "reset"}


@pytest.fixture
def ports() -> Iterator[tuple[list[int], list[int]]]:
    """(open ports, closed ports) on 127.0.0.1."""
    listeners = [Listener() for _ in range(3)]
    closed = []
    for _ in range(4):
        s = socket.socket()
        s.bind((LOCAL, 0))
        closed.append(s.getsockname()[1])
        s.close()
    yield [x.port for x in listeners], closed
    for x in listeners:
        x.close()


def scan(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*SCAN, *args], capture_output=True, timeout=timeout)


def parse(stdout: bytes) -> list[dict]:
    assert stdout.endswith(b"\n"), stdout[-200:]
    return [orjson.loads(line) for line in stdout.splitlines()]


def check_stream(lines: list[dict]) -> tuple[dict, list[dict], dict]:
    """start first, summary last, planned == results == result lines; one scan_id."""
    start, summary = lines[0], lines[-1]
    assert start["type"] == "start" and summary["type"] == "summary"
    results = lines[1:-1]
    assert all(r["type"] == "result" for r in results)
    assert start["planned"] == summary["planned"] == summary["results"] == len(results)
    assert sum(summary["states"].values()) == summary["results"]
    assert {r["scan_id"] for r in lines} == {start["scan_id"]}
    return start, results, summary


def csv(ports: list[int]) -> str:
    return ",".join(map(str, ports))


# ---- the stream ---------------------------------------------------------------------------------


def test_scan_streams_start_results_summary(ports: tuple[list[int], list[int]]) -> None:
    opened, closed = ports
    cp = scan(LOCAL, "-p", csv(opened + closed))
    assert cp.returncode == 0, cp.stderr
    assert cp.stderr == b""  # no progress line when stderr is not a terminal
    start, results, summary = check_stream(parse(cp.stdout))
    assert start["version"] == 1
    assert start["argv"] == ["portmesh", "scan", LOCAL, "-p", csv(opened + closed)]
    assert [r["port"] for r in results] == opened + closed  # the order of the port spec
    got = {r["port"]: (r["state"], r["reason"]) for r in results}
    assert got == {
        **{p: ("open", "syn-ack") for p in opened},
        # the default method is syn as root (a raw RST reads "reset"), connect otherwise
        **{p: ("closed", CLOSED_REASON[summary["tcp_method"]]) for p in closed},
    }
    for r in results:
        assert (r["dst"], r["host"], r["src"], r["proto"], r["attempts"]) == (
            LOCAL,
            None,
            None,
            "tcp",
            1,
        )
    assert summary["states"] == {"open": 3, "closed": 4}
    assert "interrupted" not in summary


def test_hostname_is_kept_in_the_records(
    tmp_path: Path, ports: tuple[list[int], list[int]]
) -> None:
    opened, _ = ports
    targets = tmp_path / "targets.txt"
    targets.write_text("# one by name, one by address\nlocalhost\n127.0.0.1  # again\n")
    cp = scan("-iL", str(targets), "-p", str(opened[0]))
    assert cp.returncode == 0, cp.stderr
    _, results, _ = check_stream(parse(cp.stdout))
    assert [(r["host"], r["state"]) for r in results] == [("localhost", "open"), (None, "open")]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_only_open_prints_open_but_counts_everything(
    tmp_path: Path, ports: tuple[list[int], list[int]], workers: str
) -> None:
    opened, closed = ports
    out = tmp_path / "all.ndjson"
    cp = scan(
        LOCAL, "-p", csv(opened + closed), "--only", "open", "-o", str(out), "--workers", workers
    )
    assert cp.returncode == 0, cp.stderr
    lines = parse(cp.stdout)
    assert lines[0]["type"] == "start" and lines[-1]["type"] == "summary"
    shown = lines[1:-1]
    assert sorted(r["port"] for r in shown) == sorted(opened)
    assert all(r["state"] == "open" for r in shown)
    summary = lines[-1]
    assert summary["planned"] == summary["results"] == len(opened) + len(closed)
    assert summary["states"] == {"open": len(opened), "closed": len(closed)}
    # -o gets what stdout gets
    assert out.read_bytes() == cp.stdout


def test_output_file_has_the_same_lines(tmp_path: Path, ports: tuple[list[int], list[int]]) -> None:
    opened, closed = ports
    out = tmp_path / "out.ndjson"
    cp = scan(LOCAL, "-p", csv(opened + closed) + ",1-2000", "-o", str(out), "--workers", "1")
    assert cp.returncode == 0, cp.stderr
    assert out.read_bytes() == cp.stdout
    check_stream(parse(out.read_bytes()))


def test_ctrl_c_during_start_up_is_interrupted_not_a_traceback() -> None:
    """A Ctrl-C while the commands are still being imported (before the CLI handles signals):
    a real KeyboardInterrupt raised inside ``import scanner.cli`` ends the entry point with one
    line and exit 130."""
    code = (
        "import sys\n"
        "class Boom:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'scanner.cli':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Boom())\n"
        "sys.argv = ['portmesh', 'scan', '127.0.0.1', '-p', '1']\n"
        "import scanner.entry\n"
        "scanner.entry.main()\n"
    )
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert cp.returncode == 130, cp.stderr
    assert cp.stderr.decode().strip() == "portmesh: interrupted"
    assert cp.stdout == b""


def test_output_file_at_a_terminal_takes_the_lines_off_the_screen(
    tmp_path: Path, ports: tuple[list[int], list[int]]
) -> None:
    """-o FILE with stdout on a terminal: every line in FILE, none on the screen, and one
    summary line on stderr naming the counts and the file; without -o the terminal still gets
    the lines (and stderr no summary line: the summary record is on the screen)."""
    opened, closed = ports
    for workers in ("1", "2"):
        out = tmp_path / f"tty-{workers}.ndjson"
        seen, errs = {}, {}
        for with_file in (True, False):
            leader, follower = pty.openpty()
            args = [LOCAL, "-p", csv(opened + closed), "--workers", workers]
            args += ["-o", str(out)] if with_file else []
            p = subprocess.Popen([*SCAN, *args], stdout=follower, stderr=subprocess.PIPE)
            os.close(follower)
            screen = b""
            with contextlib.suppress(OSError):  # EIO once the child closed the terminal
                while chunk := os.read(leader, 65536):
                    screen += chunk
            assert p.wait(timeout=60) == 0
            os.close(leader)
            seen[with_file] = screen
            assert p.stderr is not None
            errs[with_file] = p.stderr.read()
            p.stderr.close()
        check_stream(parse(out.read_bytes()))
        assert seen[True] == b"", seen[True][:200]
        n = len(opened + closed)
        want = f"portmesh scan: {n}/{n} flows: ".encode()
        assert want in errs[True] and f"NDJSON in {out}".encode() in errs[True], errs[True]
        assert f"{len(opened)} open".encode() in errs[True], errs[True]
        assert b"portmesh scan:" not in errs[False], errs[False]
        assert seen[False].count(b'"type":"result"') == len(opened + closed)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_workers_keep_planned_equal_to_results(
    workers: str, ports: tuple[list[int], list[int]]
) -> None:
    opened, closed = ports
    cp = scan(LOCAL, "-p", f"1-3000,{csv(opened + closed)}", "--workers", workers)
    assert cp.returncode == 0, cp.stderr
    _, results, summary = check_stream(parse(cp.stdout))
    assert summary["workers"] == int(workers)
    assert summary["planned"] == len({r["port"] for r in results})  # each flow once
    states = {r["port"]: r["state"] for r in results}
    assert all(states[p] == "open" for p in opened)
    assert all(states[p] == "closed" for p in closed)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_tight_descriptor_limit_shrinks_the_pool_and_loses_nothing(workers: str) -> None:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))

    cp = subprocess.run(
        [*SCAN, LOCAL, "-p", "1-3000", "--workers", workers],
        capture_output=True,
        timeout=60,
        preexec_fn=limit,
    )
    assert cp.returncode == 0, cp.stderr
    _, results, summary = check_stream(parse(cp.stdout))
    assert summary["concurrency"] < 48 * int(workers)
    assert "error" not in summary["states"]
    assert len({r["port"] for r in results}) == 3000


def test_version_and_no_heavy_imports() -> None:
    cp = subprocess.run(
        [sys.executable, "-m", "scanner", "--version"], capture_output=True, text=True
    )
    assert cp.returncode == 0
    assert cp.stdout.strip() == "portmesh, version 0.1.0"
    # a small scan imports neither scapy nor (with --loop asyncio) uvloop
    cp = subprocess.run(
        [sys.executable, "-X", "importtime", *SCAN[1:], LOCAL, "-p", "1", "--loop", "asyncio"],
        capture_output=True,
        text=True,
    )
    assert cp.returncode == 0, cp.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in cp.stderr.splitlines()}
    assert "scanner.engine.engine" in imported  # the measurement works
    assert not {m for m in imported if m.split(".")[0] in ("scapy", "uvloop")}


# ---- a reader that goes away -------------------------------------------------------------------


def head3(args: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """`portmesh scan ... | head -3` in bash (pipefail off, as in an interactive shell)."""
    cmd = f"{sys.executable} -m scanner scan {args} | head -3"
    cp = subprocess.run(["bash", "-c", cmd], capture_output=True, timeout=60, cwd=tmp_path)
    lines = cp.stdout.splitlines()
    assert len(lines) == 3
    return cp, [orjson.loads(line) for line in lines]


def test_head_3_ends_quietly(tmp_path: Path) -> None:
    cp, lines = head3(f"{LOCAL} -p 1-20000 --workers 1", tmp_path)
    assert cp.returncode == 0
    assert b"Traceback" not in cp.stderr
    assert cp.stderr == b""
    assert lines[0]["type"] == "start" and [r["type"] for r in lines[1:]] == ["result"] * 2


@pytest.mark.parametrize("workers", ["1", "2"])
def test_head_3_with_a_file_still_gets_every_line(tmp_path: Path, workers: str) -> None:
    out = tmp_path / "all.ndjson"
    cp, _ = head3(f"{LOCAL} -p 1-20000 --workers {workers} -o {out}", tmp_path)
    assert b"Traceback" not in cp.stderr
    _, results, summary = check_stream(parse(out.read_bytes()))
    assert summary["planned"] == 20000
    assert "interrupted" not in summary  # the file was still being read: the scan went on


def test_head_3_with_shards_ends_quietly(tmp_path: Path) -> None:
    for _ in range(2):
        cp, lines = head3(f"{LOCAL} -p 1-20000 --workers 2", tmp_path)
        assert lines[0]["type"] == "start"
        assert b"Traceback" not in cp.stderr
        assert b"shard process failed" not in cp.stderr
        assert b"Ctrl-C" not in cp.stderr


# ---- signals ------------------------------------------------------------------------------------

DROP_ALL = """
table ip pmtest {
    chain input {
        type filter hook input priority 0; policy accept;
        tcp dport 1-65535 counter drop
    }
}
"""


class Dropper:
    """A lab host that drops every TCP SYN, and counts them."""

    def __init__(self, lab) -> None:
        self.lab = lab
        self.addr = lab.host("node1").addr

    def syns(self) -> int:
        """SYNs the host has dropped so far (its nftables counter)."""
        cp = self.lab.run(
            "node1", ["nft", "list", "chain", "ip", "pmtest", "input"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return int(re.findall(r"counter packets (\d+)", cp.stdout)[0])

    def wait_probing(self, since: int) -> None:
        """Until the scan's first SYNs have arrived (not a fixed time: under load the prober's
        setup after the start record can take longer than any guess)."""
        deadline = time.monotonic() + 30
        while self.syns() <= since:
            assert time.monotonic() < deadline, "no SYN reached the dropping host in 30 s"
            time.sleep(0.01)


@pytest.fixture(scope="module")
def dropping_host(module_lab) -> Dropper:
    lab = module_lab(hosts=1)
    lab.nft("node1", DROP_ALL)
    d = Dropper(lab)
    # its neighbour entry resolved beforehand: a SYN sent while it resolves does not count
    # (scanner.engine.neigh), and these tests count attempts
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"", (d.addr, 9))  # (UDP 9: nothing listens; the drop is TCP only)
    deadline = time.monotonic() + 10
    neigh = ["ip", "-4", "neigh", "show", d.addr]
    while "lladdr" not in subprocess.run(neigh, capture_output=True, text=True).stdout:
        assert time.monotonic() < deadline, f"no neighbour entry for {d.addr}"
        time.sleep(0.01)
    return d


def start(*args: str) -> tuple[subprocess.Popen, dict]:
    # unbuffered: communicate() reads the descriptor, and would miss what a buffered
    # readline() had already pulled in
    proc = subprocess.Popen(
        [*SCAN, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        bufsize=0,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    return proc, orjson.loads(first)


def finish(proc: subprocess.Popen, first: dict, timeout: float) -> tuple[int, list[dict], bytes]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    lines = [first, *parse(out)] if out else [first]
    return proc.returncode, lines, err


def check_interrupted(code: int, lines: list[dict], err: bytes) -> tuple[list[dict], dict]:
    assert code == 130, err
    assert b"Traceback" not in err
    _, results, summary = check_stream(lines)
    assert summary["interrupted"] is True
    never = [r for r in results if r["reason"] == "interrupted"]
    # attempts: 0 for a flow never sent, else the attempts it had before its retries were cut
    assert all(r["state"] == "error" for r in never)
    return results, summary


@pytest.mark.lab
@pytest.mark.parametrize("method", ["syn", "connect"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_one_signal_finishes_in_flight_probes_then_summarises(
    dropping_host: Dropper, sig: signal.Signals, method: str
) -> None:
    before = dropping_host.syns()
    proc, first = start(
        dropping_host.addr, "-p", "1-300", "--timeout", "1", "--retries", "3",
        "--concurrency", "50", "--method", method,
    )  # fmt: skip
    dropping_host.wait_probing(before)  # the first probes are out (each waits 1 s)
    proc.send_signal(sig)
    code, lines, err = finish(proc, first, timeout=30)
    results, summary = check_interrupted(code, lines, err)
    assert summary["planned"] == 300
    # the in-flight probes finished (timed out) without further retries; nothing else started.
    # They had retries left: a silence cut short is no result (not filtered/no-response)
    cut = [r for r in results if r["attempts"] == 1]
    assert 0 < len(cut) <= 50
    assert {(r["state"], r["reason"]) for r in results} == {("error", "interrupted")}
    assert summary["states"] == {"error": 300}


@pytest.mark.lab
@pytest.mark.parametrize("method", ["syn", "connect"])
def test_signal_keeps_the_result_of_flows_that_finished(
    dropping_host: Dropper, method: str
) -> None:
    # --retries 0: an in-flight attempt that times out is the flow's whole probing: it finished
    before = dropping_host.syns()
    proc, first = start(
        dropping_host.addr, "-p", "1-300", "--timeout", "1", "--retries", "0",
        "--concurrency", "50", "--method", method,
    )  # fmt: skip
    dropping_host.wait_probing(before)
    proc.send_signal(signal.SIGINT)
    code, lines, err = finish(proc, first, timeout=30)
    results, summary = check_interrupted(code, lines, err)
    finished = [r for r in results if r["reason"] != "interrupted"]
    assert 0 < len(finished) <= 50
    assert {(r["state"], r["reason"], r["attempts"]) for r in finished} == {
        ("filtered", "no-response", 1)
    }
    assert summary["states"] == {"filtered": len(finished), "error": 300 - len(finished)}


@pytest.mark.lab
def test_a_second_sigint_stops_at_once(dropping_host: Dropper) -> None:
    before = dropping_host.syns()
    proc, first = start(dropping_host.addr, "-p", "1-300", "--timeout", "60", "--concurrency", "50")
    dropping_host.wait_probing(before)
    proc.send_signal(signal.SIGINT)
    # the second Ctrl-C once the first was taken (its notice on stderr), not after a fixed
    # time: two signals that arrive before the process runs again are one signal
    assert proc.stderr is not None
    said = b""
    while b"Ctrl-C again" not in said:
        line = proc.stderr.readline()
        assert line, f"the scan ended before its first Ctrl-C notice: {said!r}"
        said += line
    proc.send_signal(signal.SIGINT)
    code, lines, err = finish(proc, first, timeout=20)  # not the 60 s the probes would wait
    results, summary = check_interrupted(code, lines, said + err)
    assert summary["states"] == {"error": 300}
    assert {r["reason"] for r in results} == {"interrupted"}


def _wait_for_lines(proc: subprocess.Popen, want: Callable[[dict], bool]) -> list[dict]:
    assert proc.stdout is not None
    seen = []
    while True:
        line = proc.stdout.readline()
        assert line, "the scan ended before the lines we waited for"
        rec = orjson.loads(line)
        seen.append(rec)
        if want(rec):
            return seen


def wait_both_shards(proc: subprocess.Popen) -> list[dict]:
    """Read result lines until both shards have shown up (shard k probes every 2nd flow, so an
    odd and an even port mean both are running, their signal handlers in place)."""
    parities: set[int] = set()

    def want(rec: dict) -> bool:
        parities.add(rec["port"] % 2)
        return len(parities) == 2

    return _wait_for_lines(proc, want)


def test_sigint_with_shards_running(tmp_path: Path) -> None:
    proc, first = start(LOCAL, "-p", "-", "--workers", "2", "--concurrency", "8")
    seen = wait_both_shards(proc)
    proc.send_signal(signal.SIGINT)
    code, rest, err = finish(proc, first, timeout=30)
    results, summary = check_interrupted(code, [first, *seen, *rest[1:]], err)
    assert summary["planned"] == 65535 and summary["workers"] == 2
    assert summary["states"]["error"] > 0


def test_one_ctrl_c_one_notice_with_shards() -> None:
    proc, first = start(LOCAL, "-p", "-", "--workers", "2", "--concurrency", "8")
    wait_both_shards(proc)
    proc.send_signal(signal.SIGINT)
    code, _, err = finish(proc, first, timeout=30)
    assert code == 130
    assert err.count(b"Ctrl-C again") == 1, err


def test_sigint_right_after_the_start_line_with_shards() -> None:
    for _ in range(3):
        proc, first = start(LOCAL, "-p", "-", "--workers", "2", "--concurrency", "8")
        proc.send_signal(signal.SIGINT)
        code, lines, err = finish(proc, first, timeout=30)
        check_interrupted(code, lines, err)


def test_sigint_right_after_the_start_line_single_process() -> None:
    proc, first = start(LOCAL, "-p", "-", "--workers", "1", "--concurrency", "8")
    proc.send_signal(signal.SIGINT)
    code, lines, err = finish(proc, first, timeout=30)
    check_interrupted(code, lines, err)
