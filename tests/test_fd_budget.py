"""Under a tight `ulimit -n` the engine sizes its pool to the descriptors left and says so:
in the summary (`fd_limited`) and in one notice on stderr; the run stays exact."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys


def test_tight_ulimit_is_reported_and_the_scan_stays_complete() -> None:
    cmd = shlex.join([sys.executable, "-m", "scanner", "scan", "127.0.0.1", "-p", "1-3000",
                      "--workers", "1", "--method", "connect"])  # fmt: skip
    cp = subprocess.run(
        ["bash", "-c", f"ulimit -n 128 && exec {cmd}"], capture_output=True, text=True, timeout=60
    )
    assert cp.returncode == 0, cp.stderr
    recs = [json.loads(x) for x in cp.stdout.splitlines()]
    summary = recs[-1]
    assert summary["planned"] == summary["results"] == 3000
    lim = summary["fd_limited"]
    assert lim["asked"] == 1024 and 0 < lim["allowed"] < 128
    assert summary["concurrency"] == lim["allowed"]
    notes = [x for x in cp.stderr.splitlines() if "file-descriptor limit" in x]
    assert len(notes) == 1 and str(lim["allowed"]) in notes[0]


def test_no_notice_when_the_limit_is_ample() -> None:
    cp = subprocess.run(
        [sys.executable, "-m", "scanner", "scan", "127.0.0.1", "-p", "1-10"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert cp.returncode == 0
    assert "fd_limited" not in json.loads(cp.stdout.splitlines()[-1])
    assert cp.stderr == ""
