"""Mesh wall time for 2, 4, 8 (, 12) lab hosts, flows/s per agent and in total (median of 3).

    sudo python benchmarks/mesh.py [--hosts 2,4,8] [--repeat 3] [--sample 16]
    python benchmarks/mesh.py --simulate 1000 [--sample 16 | --full] [--emit failures]
        (the real coordinator against simulated agents: benchmarks/mesh_sim.py)

Every run: a fresh lab of N hosts (first host control plane + etcd, the rest workers), the
packaged catalog with calico (kubespray's default) + MetalLB, the NodePort range sampled
(``--nodeport-sample``), ``portmesh mesh`` over ``ip netns exec`` with the agents started as
``python -m scanner agent``. Reported per N: planned flows, mesh wall time (coordinator start
to summary, agents' start-up included), the agents' own probing rate (median over agents of
the agent's flows / its probing time) and the total rate (flows / wall time).

Then the coordinator's ceiling: result lines per second that one coordinator process can
parse, fold into the pair join and forward (synthetic lines, no network), and the estimate
for 100- and 1,000-node clusters at the default settings (``portmesh plan --count`` on
synthetic inventories x the measured rates). All N agents share this machine's cores here,
so the per-agent rate of the smallest lab is the one closest to an agent on a host of its own.

The steady state (2 hosts, the full NodePort range) is measured twice, alternated run by run:
both agents sweeping at once (as ``portmesh mesh`` does; here they share the two cores with
each other and the coordinator), and ONE agent sweeping alone: the same mesh with its agents
probing one after the other (``_OneAtATime``), so that the other host only answers.

``--floor`` (with ``--steady-only``) adds the physical floor of that figure, alternated with the
mesh runs: benchmarks/floor_syn.c (compiled with the system's cc) run inside one host of a
2-host lab whose hosts hold responders on the same ports as the mesh's, sweeping its peer's
NodePort range (2,768 SYNs), one host alone and both hosts at once (each sweeping the other,
started together), with one ``sendto`` per SYN and with ``sendmmsg`` batches; its rate per
host is its 2,768 answers over the span from its first send to its last answer, as the
agents' figure (their first NodePort result's time less its RTT, to their last; the floor's
first-to-last-answer rate is printed too), median over the hosts of a run, then over the
runs, as for the agents.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson  # noqa: E402

from scanner.engine.output import NdjsonOutput  # noqa: E402
from scanner.lab.lab import write_inventory
from scanner.lab.netns import Lab  # noqa: E402
from scanner.mesh import coordinator  # noqa: E402
from scanner.mesh.coordinator import Mesh, MeshConfig, run_mesh  # noqa: E402
from scanner.plan.selection import SelectionOptions  # noqa: E402


class _OneAtATime(Mesh):
    """The real coordinator, except that its agents probe one after the other (the probe
    phase), not all at once: while one agent sweeps, the others only answer (responders up,
    agents idle). Every other phase, the agents and the coordinator's own work are as in
    ``portmesh mesh``. For the figure of ONE agent sweeping alone (benchmarks only)."""

    async def _phase(self, links: list, step: Any) -> None:
        if getattr(step, "__name__", "") != "probe_one":
            return await super()._phase(links, step)
        for link in links:
            await super()._phase([link], step)
        return None


def one_mesh(n: int, sample: int | None, tmp: Path, alone: bool = False) -> dict:
    """One mesh run on a fresh lab; ``alone``: the agents probe one at a time (_OneAtATime)."""
    if alone:
        coordinator.Mesh = _OneAtATime  # type: ignore[misc]  # run_mesh builds coordinator.Mesh
    try:
        return _one_mesh(n, sample, tmp)
    finally:
        coordinator.Mesh = Mesh  # type: ignore[misc]


def _one_mesh(n: int, sample: int | None, tmp: Path) -> dict:
    lab = Lab.up(n, f"bm{os.getpid() % 10000}n{n}")
    try:
        inv = write_inventory(lab)
        catalog, site, selection = SelectionOptions(
            inventories=(str(inv),), with_features=("metallb",), nodeport_sample=sample
        ).resolve()
        out = tmp / f"mesh-{n}.ndjson"
        t0 = time.perf_counter()
        code = run_mesh(
            MeshConfig(
                catalog=catalog,
                site=site,
                selection=selection,
                exec_template=lab.exec_template(),
                agent_cmd=f"{sys.executable} -m scanner agent",
                output=NdjsonOutput(str(out), stdout=False),
                summary_to=io.StringIO(),
            )
        )
        wall = time.perf_counter() - t0
        summary = orjson.loads(out.read_bytes().splitlines()[-1])
    finally:
        lab.down()
    assert summary["planned"] == summary["results"], summary
    agents = [a for a in summary["agents"].values() if a.get("rate_pps")]
    reasons: dict[str, int] = {}
    sweep: dict[str, list[float]] = {}  # agent -> its NodePort results' times
    sent: dict[str, list[float]] = {}  # agent -> when each of them was sent (ts - rtt)
    for line in out.read_bytes().splitlines():
        if line.startswith(b'{"type":"result"'):
            r = orjson.loads(line)
            if r["proto"] == "tcp" and r["state"] == "open":
                reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
            if r["req"] == "k8s.nodeport":
                t = r["ts"]  # 2026-11-29T00:19:49.757Z
                secs = int(t[11:13]) * 3600 + int(t[14:16]) * 60 + float(t[17:-1])
                sweep.setdefault(r["src_host"], []).append(secs)
                sent.setdefault(r["src_host"], []).append(secs - (r["rtt_ms"] or 0.0) / 1e3)
    # the NodePort sweep's own rate per agent: its flows from the first one's send (its
    # result's time less its RTT) to the last answer, as floor_syn.c's figure (result
    # timestamps have millisecond resolution). The span of the results alone (first to last
    # result) flatters a sweep that sends a batch before it reads any answer.
    nodeport = [
        len(ts) / max(max(ts) - min(sent[a]), 0.001) for a, ts in sweep.items() if len(ts) > 100
    ]
    return {
        "reasons": reasons,
        "nodeport_rate": statistics.median(nodeport) if nodeport else 0.0,
        "code": code,
        "planned": summary["planned"],
        "wall": wall,
        "fail": summary["verdicts"]["fail"],
        "agent_rate": statistics.median(a["rate_pps"] for a in agents),
        "agent_probe_s": statistics.median(a["elapsed_s"] for a in agents),
    }


FLOOR_BATCH = 64  # SYNs per sendmmsg in the floor's batched variant


def floor_lab() -> tuple[Lab, str]:
    """A 2-host lab with responders on every port the mesh's plan probes (as the mesh's
    agents hold them), and floor_syn.c compiled (benchmarks/run.py's build_floor)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run import build_floor

    from scanner.lab.lab import start_responders

    exe = build_floor()
    if exe is None:
        raise SystemExit("benchmarks/mesh.py --floor: no C compiler (cc, gcc, clang) or it failed")
    lab = Lab.up(2, f"bf{os.getpid() % 10000}")
    try:
        write_inventory(lab)
        (lab.state_dir() / "secret").write_text("floor\n")
        start_responders(lab, ttl=3600, selection=SelectionOptions(with_features=("metallb",)))
    except BaseException:
        lab.down()
        raise
    return lab, exe


FLOOR_LINE = re.compile(
    rb"floor_syn: (\d+) flows, (\d+) answered, .*first send to last answer ([\d.]+) ms, "
    rb"first to last answer ([\d.]+) ms, cpu user ([\d.]+) ms sys ([\d.]+) ms"
)


def floor_figures(out: bytes, err: bytes) -> tuple[float, float, float] | None:
    """One ``floor_syn -t`` sweep's flows/s from its first send to its last answer, from its
    first to its last answer, and its CPU (user + sys) in microseconds per flow; None unless
    every port answered open (the peer's NodePorts all listen)."""
    m = FLOOR_LINE.search(err)
    if not m or int(m[2]) != int(m[1]) or out.count(b" open\n") != int(m[1]):
        return None
    n = int(m[1])
    return (
        n / max(float(m[3]), 0.001) * 1e3,
        n / max(float(m[4]), 0.001) * 1e3,
        (float(m[5]) + float(m[6])) * 1e3 / n,
    )


def floor_sweeps(
    lab: Lab, exe: str, both: bool, batch: int = 1
) -> tuple[float, float, float] | None:
    """floor_syn in node1 against node2 and in node2 against node1, one after the other or
    both at once (started together with -S); the median over the hosts of floor_figures, or
    None if a sweep was not exact."""
    import subprocess

    a, b = lab.hosts
    start = time.time() + 0.3 if both else 0.0
    argv = [exe, "-t", "-m", str(batch), "-S", f"{start:.6f}", "-p", "30000-32767"]
    procs, done = [], []
    for src, dst in ((a, b), (b, a)):
        p = subprocess.Popen(
            [*lab.netns_argv(src.name), *argv, dst.addr],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        procs.append(p)
        if not both:  # the next sweep starts after this one's end
            done.append((p, *p.communicate()))
    done += [(p, *p.communicate()) for p in procs[len(done) :]]
    figs = []
    for p, out, err in done:
        f = floor_figures(out, err) if p.returncode == 0 else None
        if f is None:
            print(f"  floor sweep not exact (exit {p.returncode}): {err.decode()[-200:]}")
            return None
        figs.append(f)
    return tuple(statistics.median(f[i] for f in figs) for i in range(3))  # type: ignore[return-value]


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def coordinator_ceiling(lines: int = 200_000) -> float:
    """Result lines per second through Mesh.on_result (parse, window, join, matrix, write)."""
    from scanner.core.model import Cluster, Host, Site

    hosts = tuple(Host(f"n{i}", f"198.18.0.{i}", frozenset({"node"}), "c") for i in range(1, 51))
    site = Site((Cluster("c", "standalone", hosts),))
    catalog, _, selection = SelectionOptions(hosts="x").resolve()
    devnull = NdjsonOutput(os.devnull, stdout=False)
    mesh = Mesh(MeshConfig(catalog, site, selection, output=devnull))

    class Link:
        """What Mesh.on_results reads of an AgentLink: one per source, as in a real mesh."""

        def __init__(self, host: Host) -> None:
            from scanner.mesh.coordinator import Window

            self.window = Window()
            self.got = None
            self.jidx = mesh.join.index.get(host.name)  # as AgentLink: the pair join's fast path
            self.name = host.name
            self.host = host
            self.failed = None
            self.garbage = 0
            self.results = 0
            self.next = 0  # this source's next plan index

    links = {h.name: Link(h) for h in hosts}
    raw = []
    for i in range(lines):
        s, d = hosts[i % 50], hosts[(i * 7 + 1) % 50]
        link = links[s.name]
        rec = {
            "type": "result", "scan_id": "x", "ts": "2026-11-26T00:00:00.000Z",
            "src": s.address, "dst": d.address, "host": d.name, "proto": "tcp",
            "port": 30000 + i % 2768, "state": "open", "reason": "responder", "rtt_ms": 0.1,
            "attempts": 1, "src_host": s.name, "req": "k8s.nodeport", "verdict": "pass",
            "i": link.next,
        }  # fmt: skip
        link.next += 1
        raw.append((link, orjson.dumps(rec) + b"\n"))
    t0 = time.perf_counter()
    for link, line in raw:
        mesh.on_result(link, orjson.loads(line), line)  # type: ignore[arg-type]
    return lines / (time.perf_counter() - t0)


def synthetic_counts(nodes: int, sample: int | None) -> int:
    """``portmesh plan --count`` of an N-node cluster: 3 control plane + etcd, the rest workers."""
    from scanner.plan.planner import count_plan

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "inv.ini"
        lines = ["[kube_control_plane]"] + [
            f"cp{i} ansible_host=198.18.{i // 250}.{i % 250 + 1}" for i in range(3)
        ]
        lines += ["[etcd]"] + [f"cp{i}" for i in range(3)]
        lines += ["[kube_node]"] + [
            f"w{i} ansible_host=198.19.{i // 250}.{i % 250 + 1}" for i in range(nodes - 3)
        ]
        lines += ["[k8s_cluster:children]", "kube_control_plane", "kube_node"]
        p.write_text("\n".join(lines) + "\n")
        catalog, site, selection = SelectionOptions(
            inventories=(str(p),), with_features=("metallb",), nodeport_sample=sample
        ).resolve()
        names = frozenset(h.name for h in site.hosts())
        from dataclasses import replace

        return count_plan(catalog, site, replace(selection, sources=names))


def main() -> int:
    if "--simulate" in sys.argv:  # the coordinator against simulated agents: benchmarks/mesh_sim.py
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import mesh_sim

        return mesh_sim.main(sys.argv[1:])
    ap = argparse.ArgumentParser(
        epilog="--simulate N [--sample K | --full] [--emit all|failures] [--fail-rate R] "
        "[--lines] [-o FILE]: the real coordinator against N simulated agents, no lab "
        "(benchmarks/mesh_sim.py; `--simulate 1 --help` lists its options)"
    )
    ap.add_argument("--hosts", default="2,4,8")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sample", type=int, default=16)
    ap.add_argument("--steady-only", action="store_true", help="only the 2-host full-range run")
    ap.add_argument(
        "--floor",
        action="store_true",
        help="with --steady-only: the C floor (floor_syn.c) on a pair beside the agents' figure",
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("benchmarks/mesh.py builds labs: run it as root", file=sys.stderr)
        return 2
    sizes = [] if args.steady_only else [int(x) for x in args.hosts.split(",")]
    print(f"mesh: calico + metallb, --nodeport-sample {args.sample}, median of {args.repeat}")
    if sizes:
        print(f"{'hosts':>5} {'flows':>7} {'wall s':>7} {'agent probe s':>13} "
              f"{'flows/s/agent':>13} {'flows/s total':>13}")  # fmt: skip
    rates = {}
    with tempfile.TemporaryDirectory() as d:
        for n in sizes:
            runs = [one_mesh(n, args.sample, Path(d)) for _ in range(args.repeat)]
            wall = statistics.median(r["wall"] for r in runs)
            agent = statistics.median(r["agent_rate"] for r in runs)
            probe = statistics.median(r["agent_probe_s"] for r in runs)
            planned = runs[0]["planned"]
            rates[n] = agent
            print(f"{n:>5} {planned:>7} {wall:>7.2f} {probe:>13.2f} {agent:>13.0f} "
                  f"{planned / wall:>13.0f}")  # fmt: skip
            if any(r["fail"] for r in runs):
                print(f"      note: {max(r['fail'] for r in runs)} failing flows in a run")
    # steady state: with a sample the agents' probing is mostly start-up (imports, probers,
    # first-RTT timeouts); the full NodePort range between 2 hosts is ~2,800 flows per agent
    # and ONE agent sweeping alone: the same mesh with the agents probing one after the other
    # (the other host only answers), alternated with the both-at-once runs so that the
    # machine's load falls on both; on this machine both agents (and the coordinator) share
    # the cores when they sweep at once, as they would not on hosts of their own
    runs, alone = [], []
    floors: dict[str, list] = {}
    print(f"load at start {_load()}")
    with tempfile.TemporaryDirectory() as d:
        fl = floor_lab() if args.floor else None
        try:
            for _ in range(args.repeat):
                runs.append(one_mesh(2, None, Path(d)))
                alone.append(one_mesh(2, None, Path(d), alone=True))
                if fl is not None:
                    for both in (True, False):
                        for batch in (1, FLOOR_BATCH):
                            key = f"{'both' if both else 'alone'}-{batch}"
                            floors.setdefault(key, []).append(floor_sweeps(*fl, both, batch))
        finally:
            if fl is not None:
                fl[0].down()
                Path(fl[1]).unlink(missing_ok=True)
    steady = statistics.median(r["agent_rate"] for r in runs)
    fails = max(r["fail"] for r in runs + alone)
    print(f"steady state: 2 hosts, full NodePort range, {runs[0]['planned']} flows: "
          f"{steady:,.0f} flows/s per agent, wall {statistics.median(r['wall'] for r in runs):.2f} s; "
          f"failing flows {fails}; open TCP by reason {runs[0]['reasons']}; load {_load()}")  # fmt: skip
    sweep = statistics.median(r["nodeport_rate"] for r in runs)
    solo = statistics.median(r["nodeport_rate"] for r in alone)
    print(f"NodePort sweep per agent (2,768 flows from the first send to the last answer): "
          f"{sweep:,.0f} flows/s with both agents sweeping at once; "
          f"{solo:,.0f} flows/s with one agent sweeping alone (agents probing one after the "
          f"other, the other host only answering)")  # fmt: skip
    each = ", ".join(f"{r['nodeport_rate']:,.0f}" for r in runs)
    each_alone = ", ".join(f"{r['nodeport_rate']:,.0f}" for r in alone)
    print(f"  per run, both at once: {each}; alone: {each_alone}; load {_load()}")
    meds = {}
    for key, got in floors.items():
        ok = [g for g in got if g is not None]
        both, batch = key.split("-")
        how = "one sendto per SYN" if batch == "1" else f"sendmmsg, {batch} SYNs per call"
        who = "both hosts at once" if both == "both" else "one host alone"
        if not ok:
            print(f"C floor, {who}, {how}: no exact run")
            continue
        meds[key] = [statistics.median(g[i] for g in ok) for i in range(3)]
        print(f"C floor (floor_syn.c, 2,768 SYNs at the peer's NodePorts), {who}, {how}: "
              f"{meds[key][0]:,.0f} flows/s per host from first send to last answer "
              f"({meds[key][1]:,.0f} first to last answer; CPU {meds[key][2]:.1f} us per flow), "
              f"{len(ok)} of {len(got)} runs exact; per run: "
              + ", ".join(f"{g[0]:,.0f}" if g else "-" for g in got))  # fmt: skip
    if "both-1" in meds and "alone-1" in meds:
        print(f"agents / C floor (one sendto per SYN): both at once {sweep:,.0f} / "
              f"{meds['both-1'][0]:,.0f} = {sweep / meds['both-1'][0]:.2f}; alone {solo:,.0f} / "
              f"{meds['alone-1'][0]:,.0f} = {solo / meds['alone-1'][0]:.2f}")  # fmt: skip
    if floors:
        print(f"load at end {_load()}")
    if args.steady_only:
        return 0
    rates = {2: steady}
    ceiling = coordinator_ceiling()
    print(f"coordinator: {ceiling:,.0f} result lines/s (parse, window, pair join, write)")
    per_agent = steady
    print(f"estimate at the default settings (steady per-agent rate {per_agent:,.0f} flows/s, "
          "agents in parallel on their own hosts; the coordinator forwards every line):")  # fmt: skip
    print(f"{'nodes':>6} {'nodeport':>9} {'flows':>14} {'per agent':>10} "
          f"{'agents s':>9} {'coordinator s':>13}")  # fmt: skip
    for nodes in (100, 1000):
        for sample in (None, args.sample):
            total = synthetic_counts(nodes, sample)
            per = total / nodes
            print(f"{nodes:>6} {'full' if sample is None else f'sample {sample}':>9} "
                  f"{total:>14,} {per:>10,.0f} {per / per_agent:>9.1f} "
                  f"{total / ceiling:>13.0f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
