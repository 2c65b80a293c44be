"""Runs that must never start (issue 15): too many addresses, /0 blocks, a foreign --source,
non-finite numbers. Each is one line on stderr, exit 2, and nothing on stdout (nothing sent)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from scanner.commands.common import check_max_hosts, check_source
from scanner.errors import InputError
from scanner.plan.targets import count_hosts, parse_targets

SCAN = [sys.executable, "-m", "scanner", "scan", "--no-progress"]
# As root, every run here is in a network namespace of its own with only lo up: no route out,
# so a guard that regressed would send nothing past this machine (the wide targets below).
ISOLATED = (
    ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("ip")
    else []
)


def run(*args: str, cmd: str = "scan") -> subprocess.CompletedProcess:
    argv = [*SCAN[:3], cmd, *SCAN[4:]] if cmd != "scan" else SCAN
    return subprocess.run([*ISOLATED, *argv, *args], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["0.0.0.0/0", "-p", "22"], "a /0 block"),
        (["::/0", "-p", "22"], "a /0 block"),
        (["0.0.0.0/0.0.0.0", "-p", "22"], "a /0 block"),
        (["1.2.3.4/0", "-p", "22"], "a /0 block"),
        (["0.0.0.0/0", "-p", "22", "--max-hosts", "99999999999"], "a /0 block"),
        (["10.0.0.0/8", "-p", "22"], "refusing to probe 16,777,214 addresses"),
        (["2001:2::/64", "-p", "22"], "--max-hosts 65,536"),
        (["198.18.0.0/15", "--icmp"], "pass --max-hosts 131070"),
        (["2001:2::1-2001:2::1:1", "-p", "1"], "refusing to probe 65,537 addresses"),
        (["127.0.0.1", "-p", "1", "--source", "8.8.8.8"], "not an address of this host"),
        (["127.0.0.1", "-p", "1", "--source", "2001:db8::1"], "not an address of this host"),
        (["::1", "-p", "1", "--source", "127.0.0.1"], "is IPv4 but target '::1'"),
        (["127.0.0.1", "-p", "1", "--timeout", "nan"], "--timeout must be a finite number"),
        (["127.0.0.1", "-p", "1", "--timeout", "inf"], "--timeout must be a finite number"),
        (["127.0.0.1", "-p", "1", "--max-timeout", "nan"], "--max-timeout must be a finite"),
        (["127.0.0.1", "-p", "1", "--rate", "nan"], "--rate must be a finite number"),
        # issue 15 review, every family: spellings of ::/0, IPv4-mapped space, sums over
        # targets, a --max-hosts beyond any finishing run, scoped and foreign IPv6 sources
        (["0::0/0", "-p", "22"], "a /0 block"),
        (["2001:2::/0", "-p", "22"], "a /0 block"),
        (["::ffff:0.0.0.0/96", "-p", "22"], "refusing to probe 4,294,967,295 addresses"),
        (["2001:2::/113", "2001:2:1::/113", "2001:2:2::/120", "-p", "22"],
         "refusing to probe 65,789 addresses"),
        (["2001:2::/112", "2001:2::/112", "-p", "22"], "refusing to probe 131,070 addresses"),
        (["::/1", "-p", "22", "--max-hosts", "9" * 40], "--max-hosts must be at most 4,294,967,296"),
        (["2001:2::/64", "-p", "22", "--max-hosts", str(1 << 32)], "a run probes at most"),
        (["::1", "-p", "1", "--source", "fe80::1"], "not an address of this host"),
        (["::1", "-p", "1", "--timeout", "NaN"], "--timeout must be a finite number"),
    ],
)  # fmt: skip
def test_refused_before_sending(args: list[str], words: str) -> None:
    cp = run(*args)
    assert cp.returncode == 2, cp.stderr
    assert cp.stdout == ""  # not even a start record: nothing was sent
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], cp.stderr
    assert "Traceback" not in cp.stderr


def test_max_hosts_is_the_limit_itself() -> None:
    # exactly 65,536 addresses is allowed, one more is not (counted, never enumerated)
    check_max_hosts(count_hosts(parse_targets(["198.18.0.0-198.18.255.255"])), None)
    with pytest.raises(InputError, match="65,537"):
        check_max_hosts(count_hosts(parse_targets(["198.18.0.0-198.19.0.0"])), None)
    check_max_hosts(count_hosts(parse_targets(["10.0.0.0/8"])), 1 << 24)


def test_max_hosts_raised_lets_a_run_start() -> None:
    cp = run("127.0.0.1-127.0.0.3", "-p", "1", "--max-hosts", "2", "--method", "connect")
    assert cp.returncode == 2 and "refusing to probe 3 addresses" in cp.stderr
    cp = run("127.0.0.1-127.0.0.3", "-p", "1", "--max-hosts", "3", "--method", "connect")
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.count('"type":"result"') == 3


def test_source_must_be_local() -> None:
    check_source("127.0.0.9")  # all of 127/8 is this host's
    check_source("::1")
    check_source("198.18.0.1", local={"198.18.0.1"})
    check_source("2001:2::1", local={"2001:2:0:0::1"})  # compared as addresses, not text
    for bad in ("198.18.0.2", "0.0.0.0", "::", "224.0.0.1", "ff02::1", "nonsense"):
        with pytest.raises(InputError):
            check_source(bad, local={"198.18.0.1"})


def test_a_local_source_is_accepted() -> None:
    cp = run("127.0.0.1", "-p", "1", "--source", "127.0.0.1", "--method", "connect")
    assert cp.returncode == 0, cp.stderr
    assert '"state":"closed"' in cp.stdout
    cp = run("::1", "-p", "1", "--source", "::1")  # the same for IPv6
    assert cp.returncode == 0, cp.stderr
    assert '"state":"closed"' in cp.stdout and '"af":"ipv6"' in cp.stdout


@pytest.mark.parametrize(
    ("cmd", "args", "words"),
    [
        ("check", ["--hosts", "::1", "--source", "2001:db8::1"], "not an address of this host"),
        ("check", ["--hosts", "::1", "--timeout", "nan"], "--timeout must be a finite number"),
        ("mesh", ["--hosts", "::1", "--timeout", "nan"], "--timeout must be a finite number"),
    ],
)
def test_check_and_mesh_refuse_the_same(cmd: str, args: list[str], words: str) -> None:
    cp = run(*args, cmd=cmd)
    assert cp.returncode == 2 and cp.stdout == "", cp.stderr
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], cp.stderr


def test_a_target_list_with_a_wide_block_never_starts(tmp_path) -> None:
    """-iL: the whole list is counted before the first probe, from a file or from stdin."""
    f = tmp_path / "targets.txt"
    f.write_text("::1\n::/0\n")
    cp = run("-iL", str(f), "-p", "22")
    assert cp.returncode == 2 and cp.stdout == "" and "a /0 block" in cp.stderr
    cp = subprocess.run([*ISOLATED, *SCAN, "-iL", "-", "-p", "22"], input="::1\n2001:2::/64\n",
                        capture_output=True, text=True, timeout=30)  # fmt: skip
    assert cp.returncode == 2 and cp.stdout == "", cp.stderr
    assert "refusing to probe 18,446,744,073,709,551,616 addresses" in cp.stderr
