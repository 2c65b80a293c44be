"""portmesh side by side with nmap, masscan and a naive asyncio scanner: one command, one table.

    sudo python benchmarks/run.py                 # every case, 5 paired runs each
    sudo python benchmarks/run.py --quick         # about a minute: cases 1, 2, 5, one run each
    sudo python benchmarks/run.py --cases 1,2,6 --runs 3

Cases (see benchmarks/README.md): 1 NodePort sweep of one lab host, 2 the same on 8 hosts,
3 UDP and ICMP (benchmarks/udp_icmp.py), 4 mesh of 2/4/8 hosts (benchmarks/mesh.py),
5 scale without a network, 6 the loss figures of issue 10 (0/5/20% SYN loss).

It builds its own lab (namespaces ``bench-*``), runs a warm-up and then paired runs with the
order of the tools rotating every round, checks every port against the lab's ground truth, and
always removes the lab (also on Ctrl-C or an error). Needs root for cases 1-4 and 6.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

LAB_CASES = {1, 2, 3, 4, 6}
NMAP_TIMING = ["-T4", "--min-rate", "5000"]
# masscan's reliable configuration on this lab (measured here, kernel 6.18, masscan 1.3.2):
# with the veth offloads on, 30-60% of the SYN-ACKs were never counted; with tx/rx checksum
# and segmentation offloads off (ethtool -K) it found every open port at 20,000 pps and
# missed 37 at 50,000 and 100,000 pps. With --wait 0 or 1 it still exits ~4 s after the last
# packet, and some runs never exit at all (masscan issue #144: "waiting -N-secs" forever),
# so every run has a watchdog that sends SIGINT (masscan then saves its results and exits).
# The floor (issue 16): benchmarks/floor_syn.c, one raw socket sending every SYN and counting
# the answers, no retries; its ratio column shows portmesh / floor per case.
FLOOR_LABEL = "C floor: one raw socket, every SYN (floor_syn.c)"
MASSCAN_RATE = 20000
MASSCAN_WAIT = 1
MASSCAN_WATCHDOG = 8  # seconds: a run that exits normally takes ~5.5 s here; past 8 it is hung


def log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def portmesh_argv(addrs: list[str], *extra: str) -> list[str]:
    lo, hi = C.NODEPORTS
    return [sys.executable, "-m", "scanner", "scan", *addrs, "-p", f"{lo}-{hi}", *extra]


def nmap_argv(addrs: list[str], scan: str = "-sT") -> list[str]:
    lo, hi = C.NODEPORTS
    return ["nmap", "-n", "-Pn", scan, *NMAP_TIMING, "-p", f"{lo}-{hi}", "-oG", "-", *addrs]


def masscan_argv(lab: C.BenchLab, targets: list[str]) -> list[str]:
    """One masscan per target, in parallel: masscan sends every frame to one --router-mac, and
    on a flat L2 lab each target has its own MAC, so a single process can reach only one.

    Each has a watchdog: past MASSCAN_WATCHDOG seconds it is counted as hung and gets SIGINT
    five times (masscan's own advice: it then saves what it found and exits), SIGKILL last."""
    lo, hi = C.NODEPORTS
    src = lab.addr(lab.SCANNER)
    tmp = f"/tmp/bench-masscan-{os.getpid()}"
    rate = max(1000, MASSCAN_RATE // len(targets))
    cmds = [f"rm -f {tmp}.out.*"]
    pids, dogs = [], []
    for i, t in enumerate(targets):
        cmds.append(
            f"masscan -p{lo}-{hi} {lab.addr(t)} --adapter eth0 --adapter-ip {src} "
            f"--router-mac {lab.mac(t)} --rate {rate} --wait {MASSCAN_WAIT} "
            f"-oL {tmp}.out.{i} 2>/dev/null & p{i}=$!"
        )
        cmds.append(
            f"( sleep {MASSCAN_WATCHDOG}; if kill -0 $p{i} 2>/dev/null; then echo hung >> {tmp}.hung; "
            f"for k in 1 2 3 4 5; do kill -INT $p{i} 2>/dev/null; sleep 0.2; done; sleep 2; "
            f"kill -KILL $p{i} 2>/dev/null; fi ) & w{i}=$!"
        )
        pids.append(f"$p{i}")
        dogs.append(f"$w{i}")
    cmds += [
        f"wait {' '.join(pids)}",
        f"kill {' '.join(dogs)} 2>/dev/null",
        f"cat {tmp}.out.* 2>/dev/null",
        f"rm -f {tmp}.out.*",
    ]
    return ["sh", "-c", "\n".join(cmds)]


def floor_argv(addrs: list[str]) -> list[str] | None:
    """benchmarks/floor_syn.c compiled with the system's cc (once per run), or None."""
    exe = build_floor()
    if exe is None:
        return None
    lo, hi = C.NODEPORTS
    return [exe, "-p", f"{lo}-{hi}", *addrs]


_FLOOR: list[str | None] = []


def build_floor() -> str | None:
    if not _FLOOR:
        cc = next((c for c in ("cc", "gcc", "clang") if C.have(c)), None)
        exe = f"/tmp/bench-floor-syn-{os.getpid()}"
        if cc is None:
            _FLOOR.append(None)
        else:
            cp = subprocess.run(
                [cc, "-O2", "-o", exe, str(C.HERE / "floor_syn.c")], capture_output=True, text=True
            )
            _FLOOR.append(exe if cp.returncode == 0 else None)
            if cp.returncode:
                log(f"floor_syn.c did not compile: {cp.stderr.strip()[-300:]}")
    return _FLOOR[0]


def offloads(lab: C.BenchLab, hosts: list[str], on: bool) -> bool:
    if not C.have("ethtool"):
        return False
    v = "on" if on else "off"
    for h in hosts:
        lab.lab.run(
            h,
            ["ethtool", "-K", "eth0", "tx", v, "rx", v, "gso", v, "tso", v],
            capture_output=True,
        )
    return True


# ---- cases 1, 2, 6: TCP sweeps ------------------------------------------------------------


def case_sweep(
    lab: C.BenchLab, case: str, n_targets: int, runs: int, quick: bool, tools: set[str]
) -> list[C.Row]:
    targets = lab.names[:n_targets]
    addrs = lab.target_addrs(n_targets)
    truth = lab.truth(n_targets)
    py = sys.executable
    lo, hi = C.NODEPORTS
    ts: list[C.Tool] = [
        # as root the default TCP method is the raw SYN probe (as nmap's default is -sS)
        C.Tool("portmesh scan (defaults: syn)", lambda: portmesh_argv(addrs), C.parse_portmesh),
        C.Tool(
            "portmesh scan --method connect",
            lambda: [*portmesh_argv(addrs), "--method", "connect"],
            C.parse_portmesh,
        ),
        C.Tool(
            "nmap -sT -T4 --min-rate 5000",
            lambda: nmap_argv(addrs),
            C.parse_nmap_grep,
            baseline=True,
        ),
    ]
    if "syn" in tools:
        ts.append(
            C.Tool(
                "nmap -sS -T4 --min-rate 5000", lambda: nmap_argv(addrs, "-sS"), C.parse_nmap_grep
            )
        )
    if "naive" in tools:
        ts.append(
            C.Tool(
                "naive asyncio+uvloop",
                lambda: [py, str(C.HERE / "_common.py"), "naive", *addrs, "-p", f"{lo}-{hi}"],
                C.parse_naive,
            )
        )
    rows_extra: list[C.Row] = []
    if "floor" in tools:
        if floor_argv(addrs) is not None:
            ts.append(
                C.Tool(
                    FLOOR_LABEL,
                    lambda: floor_argv(addrs) or [],
                    C.parse_naive,
                    floor=True,
                )
            )
        else:
            rows_extra.append(
                C.Row(case, FLOOR_LABEL, note="skipped: no C compiler (cc, gcc, clang) found")
            )
    masscan_tool = None
    if "masscan" in tools:
        if C.have("masscan"):
            masscan_tool = C.Tool(
                f"masscan --rate {MASSCAN_RATE}",
                lambda: masscan_argv(lab, targets),
                C.parse_masscan_list,
                # masscan lists open ports only and cannot tell closed from filtered
                compare_kw={"absent": "closed", "only_open": True},
            )
        else:
            rows_extra.append(C.Row(case, "masscan", note="not installed"))
    rows = C.paired(case, ts, lab.ns, truth, runs, log=log)
    if masscan_tool is not None:
        # masscan runs apart from the paired rounds: it needs the offloads off, which would
        # change what the other tools measure (software checksums on every packet)
        had = offloads(lab, [lab.SCANNER, *targets], on=False)
        try:
            hung_file = Path(f"/tmp/bench-masscan-{os.getpid()}.hung")
            mrow = C.paired(case, [masscan_tool], lab.ns, truth, runs, warmup=not quick, log=log)[0]
            hung = hung_file.read_text().count("hung") if hung_file.exists() else 0
            hung_file.unlink(missing_ok=True)
            mrow.note = (
                f"needed: --router-mac, --adapter-ip, {'offloads off (ethtool)' if had else 'ethtool MISSING (offloads on)'}, "
                f"--wait {MASSCAN_WAIT}"
                + (f", one process per target ({len(targets)})" if len(targets) > 1 else "")
                + f"; open/not-open only; {hung} hung process(es) ended by the watchdog"
            )
            rows.append(mrow)
        finally:
            offloads(lab, [lab.SCANNER, *targets], on=True)
    return rows + rows_extra


def case_loss(lab: C.BenchLab, runs: int, quick: bool) -> list[C.Row]:
    """Issue 10's figures: portmesh and nmap -sT at 0%, 5% and 20% random SYN loss on t1."""
    addrs = lab.target_addrs(1)
    truth = lab.truth(1)
    rows: list[C.Row] = []
    try:
        for pct in (0, 5, 20):
            lab.set_loss("t1", pct)
            case = f"6 loss {pct}%"
            ts = [
                C.Tool(
                    "portmesh scan (defaults: syn)", lambda: portmesh_argv(addrs), C.parse_portmesh
                ),
                C.Tool(
                    "portmesh scan --method connect",
                    lambda: [*portmesh_argv(addrs), "--method", "connect"],
                    C.parse_portmesh,
                ),
                C.Tool(
                    "nmap -sT -T4 --min-rate 5000",
                    lambda: nmap_argv(addrs),
                    C.parse_nmap_grep,
                    baseline=True,
                ),
            ]
            rows += C.paired(case, ts, lab.ns, truth, runs, warmup=not quick, log=log)
    finally:
        lab.set_loss("t1", 0)
    return rows


# ---- cases 3 and 4: other helpers' scripts ------------------------------------------------


def external_case(case: str, script: str, runs: int, quick: bool) -> list[C.Row]:
    """Run benchmarks/<script> (another helper's; it builds its own lab) as a subprocess.

    ``--quick`` and ``--runs`` are passed only when its --help lists them. Its final table
    lines of the form ``LABEL  MEDIAN_S  RIGHT/TOTAL  RUNS`` join our table (in-process timing
    of its own; rows whose label starts with nmap are the baseline); its whole output is also
    printed after our table.
    """
    import re

    path = C.HERE / script
    if not path.exists():
        return [C.Row(case, script, note="not available yet")]
    helptext = subprocess.run(
        [sys.executable, str(path), "--help"], capture_output=True, text=True, cwd=C.ROOT
    ).stdout
    argv = [sys.executable, str(path)]
    if quick and "--quick" in helptext:
        argv.append("--quick")
    if "--runs" in helptext:
        argv += ["--runs", "1"]  # its UDP runs take minutes each (ICMP rate limit)
    if "--repeat" in helptext:
        argv += ["--repeat", str(1 if quick else min(runs, 3))]
    log(f"{case}: {' '.join(argv[1:])}")
    cp = subprocess.run(argv, capture_output=True, text=True, cwd=C.ROOT)
    cmd = " ".join(
        [
            "python",
            *(Path(a).relative_to(C.ROOT).as_posix() if a == str(path) else a for a in argv[1:]),
        ]
    )
    EXTERNAL_OUTPUT.append(f"== case {case}: {cmd} (exit {cp.returncode})\n{cp.stdout}")
    if cp.returncode:
        EXTERNAL_OUTPUT.append(cp.stderr[-2000:])
        return [C.Row(case, script, note=f"FAILED exit {cp.returncode}: output below")]
    rows: list[C.Row] = []
    line_re = re.compile(r"^(\S.*?)\s+(\d+\.\d+)\s+(\d+)/(\d+)\s+(\d+)\s*$")
    for line in cp.stdout.splitlines():
        m = line_re.match(line)
        if not m:
            continue
        label = m.group(1)
        sub = (
            "icmp"
            if ("icmp" in label or "-sn" in label)
            else "udp"
            if ("udp" in label or "-sU" in label)
            else ""
        )
        right, total = int(m.group(3)), int(m.group(4))
        row = C.Row(
            f"{case.split()[0]} {sub}".strip() if sub else case,
            label,
            flows=total,
            baseline=label.startswith("nmap"),
            note=f"{script}'s own timing (in-process), {m.group(5)} run(s)",
        )
        row.runs.append(C.Measure(float(m.group(2)), 0.0, 0.0, 0.0, 0, b""))
        row.checks.append(C.Check(total - right, f"{right}/{total} right"))
        rows.append(row)
    # mesh.py: "HOSTS FLOWS WALL_S AGENT_PROBE_S FLOWS/S/AGENT FLOWS/S_TOTAL", then an
    # optional "note: N failing flows in a run" line under the row it concerns
    mesh_re = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)\s+(\d+)\s+(\d+)\s*$")
    for line in cp.stdout.splitlines():
        m = mesh_re.match(line)
        if m:
            row = C.Row(
                case,
                f"portmesh mesh, {m.group(1)} hosts",
                flows=int(m.group(2)),
                note=f"{m.group(5)} flows/s per agent; {script}'s own timing, median of "
                + ("1" if quick else str(min(runs, 3))),
            )
            row.runs.append(C.Measure(float(m.group(3)), 0.0, 0.0, 0.0, 0, b""))
            row.checks.append(C.Check(0, ""))
            rows.append(row)
        fm = re.match(r"^\s*note: (\d+) failing flows", line)
        if fm and rows:
            rows[-1].checks[-1] = C.Check(int(fm.group(1)), "failing flows in a run")
    return rows or [C.Row(case, script, note="no table found in its output: see below")]


EXTERNAL_OUTPUT: list[str] = []


# ---- case 5: scale without a network ------------------------------------------------------


def write_inventory(path: Path, nodes: int) -> None:
    """A kubespray inventory of ``nodes`` hosts: 3 control plane + etcd, every host a node."""
    lines = ["all:", "  hosts:"]
    for i in range(1, nodes + 1):
        a = f"198.18.{(i >> 8) & 255}.{i & 255}" if i & 255 else f"198.19.{i >> 8}.1"
        lines.append(f"    n{i}: {{ansible_host: {a}, ip: {a}}}")
    cp = ["      hosts:"] + [f"        n{i}:" for i in range(1, min(3, nodes) + 1)]
    lines += ["  children:", "    kube_control_plane:", *cp, "    etcd:", *cp, "    kube_node:"]
    lines += ["      hosts:"] + [f"        n{i}:" for i in range(1, nodes + 1)]
    lines += [
        "    k8s_cluster:",
        "      children:",
        "        kube_control_plane:",
        "        kube_node:",
    ]
    path.write_text("\n".join(lines) + "\n")


def portmesh_bin() -> list[str]:
    script = Path(sys.executable).parent / "portmesh"
    return [str(script)] if script.exists() else [sys.executable, "-m", "scanner"]


def case_scale(runs: int, quick: bool) -> list[C.Row]:
    import statistics
    import tempfile

    rows: list[C.Row] = []
    pm = portmesh_bin()
    with tempfile.TemporaryDirectory() as d:
        inv = Path(d) / "inv1000.yml"
        write_inventory(inv, 1000)
        argv = [
            *pm,
            "plan",
            "--inventory",
            str(inv),
            "--with",
            "metallb",
            "--nodeport-sample",
            "16",
            "--count",
            "--format",
            "table",
        ]
        row = C.Row("5 scale", "plan --count, 1,000 nodes, calico+metallb, sample 16")
        C.timed(argv)
        flows = 0
        for _ in range(max(1, runs)):
            m = C.timed(argv)
            row.runs.append(m)
            ok = m.rc == 0 and m.out.strip().isdigit()
            row.checks.append(C.Check(0 if ok else 1, m.err.decode(errors="replace")[-200:]))
            flows = int(m.out.strip()) if ok else 0
        row.flows = flows
        wall, rss = row.med("wall"), max(x.maxrss_mb for x in row.runs)
        row.note = f"{flows:,} flows; target < 5 s and < 150 MB: " + (
            "met" if wall < 5 and rss < 150 else "MISSED"
        )
        rows.append(row)

        # streaming the flows to /dev/null: peak RSS must not grow with the plan
        sizes = (10, 100) if quick else (20, 200)
        rss_by: dict[int, float] = {}
        for n in sizes:
            p = Path(d) / f"inv{n}.yml"
            write_inventory(p, n)
            argv = [
                *pm,
                "plan",
                "--inventory",
                str(p),
                "--with",
                "metallb",
                "--nodeport-sample",
                "16",
                "--format",
                "ndjson",
            ]
            cnt = C.timed([*argv[:-2], "--count", "--format", "table"])
            row = C.Row("5 scale", f"plan streamed to /dev/null, {n} nodes")
            m = C.timed(argv, devnull=True)
            row.runs.append(m)
            row.checks.append(C.Check(0 if m.rc == 0 else 1, m.err.decode(errors="replace")[-200:]))
            row.flows = int(cnt.out.strip() or 0)
            rss_by[n] = m.maxrss_mb
            rows.append(row)
        growth = rss_by[sizes[1]] / rss_by[sizes[0]] if rss_by[sizes[0]] else 0
        rows[-1].note = (
            f"RSS {rss_by[sizes[0]]:.0f} -> {rss_by[sizes[1]]:.0f} MB for "
            f"{rows[-2].flows:,} -> {rows[-1].flows:,} flows: "
            + ("flat" if growth < 1.2 else f"GROWS x{growth:.2f}")
        )

    # NDJSON encoding in-process: the runner's path (encode_results in batches of 512)
    from scanner.core.flows import Flow
    from scanner.core.results import Result, encode_results

    n = 200_000 if quick else 1_000_000
    proto = [
        Result(
            Flow(
                "198.18.0.1",
                30000 + i % 2768,
                "tcp",
                host="t1",
                src="198.18.0.9",
                src_host="scan",
                req="nodeport",
            ),
            "open",
            "syn-ack",
            0.123,
            1,
            1.7e9 + i * 1e-4,
        )
        for i in range(512)
    ]
    best = []
    for _ in range(3 if not quick else 1):
        t0 = time.perf_counter()
        size = 0
        for _ in range(n // 512):
            size += len(encode_results(proto, "0123456789abcdef"))
        best.append(time.perf_counter() - t0)
    el = statistics.median(best)
    lines = (n // 512) * 512
    rows.append(
        C.Row(
            "5 scale",
            f"NDJSON encode_results, {lines:,} results",
            value=f"{lines / el:,.0f} lines/s",
            note=f"{size / lines:.0f} bytes/line, {el:.2f} s",
        )
    )

    # start-up: portmesh --version, median of 20
    ms = [C.timed([*pm, "--version"]) for _ in range(21)][1:]
    med = statistics.median(m.wall for m in ms) * 1000
    rows.append(
        C.Row(
            "5 scale",
            f"{' '.join(Path(pm[0]).name if i == 0 else x for i, x in enumerate(pm))} --version (median of 20)",
            value=f"{med:.0f} ms",
            note=f"RSS {max(m.maxrss_mb for m in ms):.0f} MB; target < 150 ms: "
            + ("met" if med < 150 else "MISSED"),
        )
    )
    return rows


# ---- main ---------------------------------------------------------------------------------


def load() -> str:
    """The 1/5/15-minute load averages (/proc/loadavg): the machine is shared, so every
    figure is stated with the load it ran under."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ver = {}
    for tool, args in (("nmap", ["--version"]), ("masscan", ["--version"])):
        if C.have(tool):
            out = subprocess.run([tool, *args], capture_output=True, text=True).stdout
            ver[tool] = next((ln for ln in out.splitlines() if ln.strip()), "?").strip()
    return (
        f"machine: {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), "
        f"kernel {platform.release()}, CPU {cpu}, Python {platform.python_version()}\n"
        + "".join(f"{k}: {v}\n" for k, v in ver.items())
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="cases 1, 2, 5 with one run each")
    ap.add_argument("--cases", default=None, help="comma list of case numbers (default: all)")
    ap.add_argument("--runs", type=int, default=None, help="paired runs per case (default 5)")
    ap.add_argument("--lab-name", default="bench", help="lab name (namespaces NAME-*)")
    args = ap.parse_args(argv)
    cases = (
        {int(x) for x in args.cases.split(",") if x.strip()}
        if args.cases
        else ({1, 2, 5} if args.quick else {1, 2, 3, 4, 5, 6})
    )
    runs = args.runs or (1 if args.quick else 5)
    if cases & LAB_CASES and os.geteuid() != 0:
        sys.exit("benchmarks/run.py: cases 1-4 and 6 build a network-namespace lab: run as root")

    # SIGTERM like Ctrl-C: unwind through the finally that removes the lab
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    t_start = time.perf_counter()
    print(f"# portmesh benchmarks, {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(
        "# "
        + " ".join(["python", "benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])])
    )
    print("# " + machine().rstrip().replace("\n", "\n# "))
    print(f"# load at start: {load()}")
    sys.stdout.flush()
    rows: list[C.Row] = []
    lab = None
    try:
        if cases & {1, 2, 6}:
            n = 8 if 2 in cases else 1
            log(f"lab: building {n} target host(s) + scanner ...")
            lab = C.BenchLab(n, name=args.lab_name)
            if 1 in cases:
                rows += case_sweep(
                    lab, "1 nodeports x1", 1, runs, args.quick, {"syn", "naive", "masscan", "floor"}
                )
            if 2 in cases:
                rows += case_sweep(lab, "2 nodeports x8", 8, runs, args.quick, {"masscan", "floor"})
            if 6 in cases:
                rows += case_loss(lab, runs, args.quick)
            lab.down()
            lab = None
        if 3 in cases:
            rows += external_case("3 udp/icmp", "udp_icmp.py", runs, args.quick)
        if 4 in cases:
            rows += external_case("4 mesh", "mesh.py", runs, args.quick)
        if 5 in cases:
            rows += case_scale(runs, args.quick)
    except KeyboardInterrupt:
        log("interrupted: removing the lab")
        print("# INTERRUPTED: partial results")
    finally:
        if lab is not None:
            lab.down()
    print()
    print(C.table(rows))
    print(
        "\nwall/user/sys: medians of paired runs, whole process (wait4 rusage); RSS: largest "
        "single process; ratio: median wall / the case's baseline (*); "
        "/floor: median wall / the C floor's median wall in the same case and rounds; "
        f"total {time.perf_counter() - t_start:.0f} s; load at end: {load()}"
    )
    if _FLOOR and _FLOOR[0]:
        Path(_FLOOR[0]).unlink(missing_ok=True)
    for text in EXTERNAL_OUTPUT:
        print("\n" + text.rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
