"""One mesh agent's probing, in process, on a lab pair: the NodePort sweep's rate and its CPU.

    sudo python benchmarks/agent_sweep.py [--reps 10] [--rounds 3] [--modes all,inline,failures,off]

A 2-host lab whose hosts hold responders on every port the mesh plan probes (as
``benchmarks/mesh.py --steady-only --floor`` builds it), then, alternated round by round, a
child process inside node1's namespace that runs the agent's own probing (``scanner.mesh.
probing.probe_slice``: its plan slice, the raw SYN sweep with the token sample, annotate, pass
blocks) ``--reps`` times, with no coordinator and no control channel, its output to a file.
Per mode:

    all       ``--emit all``: every result a line (passing ones in blocks), as a mesh does
    inline    as ``all``, with the sendmmsg calls made from the loop's thread, as in a process
              with one core (``all``: from a thread of their own where there are two or more)
    failures  ``--emit failures``: passing results tallied
    off       as ``all``, but the engine's emit only counts: what the output side costs

Printed per mode: the median over rounds of each round's median, of the NodePort rate (2,768
flows from the first send, a result's time less its RTT, to the last answer: the agents'
figure in benchmarks/mesh.py) and of the CPU (user + sys, every thread: with the sending
thread it can exceed the wall time) and wall time of one probe_slice (every flow of node1's
slice, set-up included). The rate needs result lines, so modes ``all`` and ``inline`` only;
the others give time and CPU. A profile of the child: run it under py-spy with ``--child``
(see ``child()``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def child(state: str, agent: str, reps: int, mode: str, out_path: str) -> None:
    """In a lab host's namespace: probe_slice ``reps`` times; one line per rep on stdout:
    rate (0 unless mode all or inline), CPU ms, wall ms."""
    import orjson

    from scanner.engine.engine import Engine, EngineConfig
    from scanner.mesh.probing import TOKEN_SAMPLE, probe_slice
    from scanner.mesh.wire import Channel
    from scanner.plan.selection import SelectionOptions
    from scanner.probes.base import ProbeOptions

    catalog, site, sel = SelectionOptions(
        inventories=(f"{state}/inventory.yml",), with_features=("metallb",)
    ).resolve()
    sel = dataclasses.replace(sel, sources=frozenset({agent}))
    secret = Path(state, "secret").read_bytes().strip()
    eng = EngineConfig(token_sample=TOKEN_SAMPLE, probe_options=ProbeOptions(secret=secret))
    if mode == "inline":
        from scanner.probes.syn import SynProber

        SynProber.SEND_THREAD = False
    if mode == "off":

        def count(self: Engine, r: object) -> None:
            self.stats.results += 1

        Engine._emit = count  # type: ignore[method-assign]
    for _ in range(reps):
        fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        out = Channel(fd)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        emit = "failures" if mode == "failures" else "all"
        probe_slice(catalog, site, sel, eng, out, "bench", "reachable", "uvloop", emit=emit)
        wall = (time.perf_counter() - t0) * 1e3
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        out.flush()
        os.close(fd)
        cpu = (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) * 1e3
        ends, starts = [], []
        for line in Path(out_path).read_bytes().splitlines():
            if line.startswith(b'{"type":"result"') and b'"k8s.nodeport"' in line:
                r = orjson.loads(line)
                assert r["verdict"] == "pass", r
                t = r["ts"]
                secs = int(t[11:13]) * 3600 + int(t[14:16]) * 60 + float(t[17:-1])
                ends.append(secs)
                starts.append(secs - (r["rtt_ms"] or 0.0) / 1e3)
        if mode in ("all", "inline"):
            assert len(ends) == 2768, len(ends)
        rate = len(ends) / max(max(ends) - min(starts), 0.001) if ends else 0.0
        print(f"{rate:.0f} {cpu:.1f} {wall:.1f}", flush=True)
        time.sleep(0.05)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--reps", type=int, default=10, help="probe_slice runs per child process")
    ap.add_argument("--rounds", type=int, default=3, help="child processes per mode, alternated")
    ap.add_argument("--modes", default="all,inline,failures,off")
    ap.add_argument("--child", nargs=5, metavar=("STATE", "AGENT", "REPS", "MODE", "OUT"))
    args = ap.parse_args()
    if args.child:
        state, agent, reps, mode, out = args.child
        child(state, agent, int(reps), mode, out)
        return 0
    if os.geteuid() != 0:
        sys.exit("benchmarks/agent_sweep.py: builds a network-namespace lab: run as root")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from mesh import _load, floor_lab

    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - {"all", "inline", "failures", "off"})
    if unknown or not modes:
        print(f"agent_sweep: --modes: {', '.join(unknown) or 'none'}: give some of "
              "all,inline,failures,off", file=sys.stderr)  # fmt: skip
        return 2
    lab, exe = floor_lab()
    Path(exe).unlink(missing_ok=True)
    got: dict[str, list[list[float]]] = {m: [] for m in modes}
    print(f"load at start {_load()}")
    try:
        state = str(lab.state_dir())
        a = lab.hosts[0]
        out = f"/tmp/agent-sweep-{os.getpid()}.ndjson"
        for _ in range(args.rounds):
            for m in modes:
                cp = subprocess.run(
                    [*lab.netns_argv(a.name), sys.executable, __file__, "--child", state,
                     a.name, str(args.reps), m, out],
                    capture_output=True, text=True, timeout=600,
                )  # fmt: skip
                if cp.returncode != 0:
                    sys.exit(f"agent_sweep: the {m} child failed: {cp.stderr.strip()[-400:]}")
                rows = [[float(x) for x in line.split()] for line in cp.stdout.splitlines()]
                got[m].append([statistics.median(r[i] for r in rows) for i in range(3)])
        Path(out).unlink(missing_ok=True)
    finally:
        lab.down()
    print(f"{args.rounds} rounds x {args.reps} probe_slice runs of node1's slice per mode; "
          "medians of the rounds' medians")  # fmt: skip
    for m in modes:
        rate, cpu, wall = (statistics.median(r[i] for r in got[m]) for i in range(3))
        rates = ", ".join(f"{r[0]:,.0f}" for r in got[m])
        what = f"NodePort {rate:,.0f} flows/s (rounds: {rates}), " if rate else ""
        print(f"  {m:<9} {what}probe_slice CPU {cpu:.1f} ms, wall {wall:.1f} ms")
    print(f"load at end {_load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
