"""The raw SYN probe under CPU load (issue 19, item 1): answers already queued on the raw
socket must be read before an attempt is expired.

uvloop runs due timers before it polls for I/O, so after a stall (two busy loops on a 2-core
machine) the deadline sweep ran first and expired attempts whose RST sat in the socket's
queue; with a per-callback read cap the reader could also fall behind for good. Both turned
closed ports into `filtered`: 10 of 65,535 on 127.0.0.1 in a namespace with only `lo`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import orjson
import pytest

from tests.conftest import unique_lab_name

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="needs root and the ip command (a network namespace of our own, raw sockets)",
)

SWEEPS = 10
BUSY = "while True:\n    pass\n"
LISTENER = (
    "import socket, sys\n"
    "s = socket.socket()\n"
    "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('127.0.0.1', int(sys.argv[1])))\n"
    "s.listen(4096)\n"
    "print('ready', flush=True)\n"
    "sys.stdin.read()\n"
)


@pytest.fixture
def lo_ns():
    """A network namespace of our own with only `lo` (up) and one listener on 127.0.0.1."""
    ns = f"{unique_lab_name()}-lo"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    lst = None
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        with socket.socket() as probe:  # a free port number; the namespace's own is empty
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        lst = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", LISTENER, str(port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        assert lst.stdout is not None and lst.stdout.readline().strip() == b"ready"
        yield ns, port
    finally:
        if lst is not None:
            lst.kill()
            lst.wait()
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_full_sweeps_beside_two_busy_loops_have_no_false_filtered(lo_ns) -> None:
    ns, open_port = lo_ns
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(2)]
    bad: list[str] = []
    try:
        time.sleep(0.2)  # let the loops take their cores
        for i in range(SWEEPS):
            cp = subprocess.run(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "scanner", "scan",
                 "127.0.0.1", "-p-", "--method", "syn"],
                capture_output=True, timeout=300,
            )  # fmt: skip
            assert cp.returncode == 0, cp.stderr[-2000:]
            recs = [orjson.loads(x) for x in cp.stdout.splitlines()]
            results = [r for r in recs if r["type"] == "result"]
            summary = recs[-1]
            assert summary["type"] == "summary" and summary["tcp_method"] == "syn"
            assert len(results) == summary["planned"] == 65535
            states = {r["port"]: r["state"] for r in results}
            assert len(states) == 65535
            wrong = [
                f"{p}:{s}"
                for p, s in sorted(states.items())
                if s != ("open" if p == open_port else "closed")
            ]
            if wrong:
                bad.append(f"sweep {i + 1}: {len(wrong)} wrong ({', '.join(wrong[:5])})")
    finally:
        for p in busy:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGKILL)
            p.wait()
    assert not bad, "; ".join(bad)
