"""benchmarks/floor_syn.c, the C floor of issue 16, in the mode ``benchmarks/mesh.py --floor``
uses: one lab host sweeping its peer (-t: the spans and CPU on stderr; -m: sendmmsg batches).

A real lab pair: node2 listens on 16 ports of 64, so a sweep must find exactly those open and
the rest closed (RST), with one sendto per SYN and with sendmmsg, and mesh.py's parser of the
-t line must take a sweep where every port is open and refuse one where any is not.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"

# node2's listeners: 30000-30015, held until stdin closes
LISTEN = """
import socket, sys
socks = []
for p in range(30000, 30016):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", p))
    s.listen(8)
    socks.append(s)
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def floor_exe(tmp_path_factory: pytest.TempPathFactory) -> str:
    cc = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if cc is None:
        pytest.skip("no C compiler (cc, gcc, clang) for benchmarks/floor_syn.c")
    exe = str(tmp_path_factory.mktemp("floor") / "floor_syn")
    subprocess.run([cc, "-O2", "-o", exe, str(BENCH / "floor_syn.c")], check=True)
    return exe


def _bench_mesh():
    spec = importlib.util.spec_from_file_location("bench_mesh_floor", BENCH / "mesh.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bad_batch_is_one_line_and_exit_2(floor_exe: str) -> None:
    cp = subprocess.run(
        [floor_exe, "-m", "0", "-p", "1-2", "127.0.0.1"], capture_output=True, text=True
    )
    assert cp.returncode == 2 and cp.stdout == ""
    assert cp.stderr.startswith("usage: floor_syn") and cp.stderr.count("\n") == 1


def test_floor_sweeps_a_peer_exactly_with_sendto_and_sendmmsg(lab, floor_exe: str) -> None:
    mesh = _bench_mesh()
    a, b = lab.hosts
    holder = lab.popen(
        b.name,
        [sys.executable, "-c", LISTEN],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        for batch in ("1", "16"):
            cp = lab.run(
                a.name,
                [floor_exe, "-t", "-m", batch, "-p", "30000-30063", b.addr],
                capture_output=True,
            )
            assert cp.returncode == 0, cp.stderr
            lines = cp.stdout.decode().splitlines()
            want = [
                f"{b.addr} {p} {'open' if p < 30016 else 'closed'}" for p in range(30000, 30064)
            ]
            assert lines == want
            assert b"floor_syn: 64 flows, 64 answered, " in cp.stderr
            assert (
                mesh.floor_figures(cp.stdout, cp.stderr) is None
            )  # 48 closed: not the mesh's case
            cp = lab.run(
                a.name,
                [floor_exe, "-t", "-m", batch, "-p", "30000-30015", b.addr],
                capture_output=True,
            )
            figs = mesh.floor_figures(cp.stdout, cp.stderr)
            assert cp.returncode == 0 and figs is not None, cp.stderr
            send_rate, answer_rate, cpu_us = figs
            assert 0 < send_rate <= answer_rate and cpu_us >= 0
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
