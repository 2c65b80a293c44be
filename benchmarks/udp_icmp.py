#!/usr/bin/env python3
"""UDP and ICMP sweeps of a namespace lab: portmesh's probers against nmap, same targets, one run.

    sudo python benchmarks/udp_icmp.py [--hosts 8] [--closed 200] [--open 20] [--runs 1]
                                       [--icmp-runs 5] [--icmp-ratelimit MS]

What it builds: a lab (scanner.lab.lab) of N hosts. On node1: ``--open`` UDP ports answered by a
plain UDP echo (it answers anything, so nmap's probes are answered too) and ``--closed`` ports
with nothing bound. The last two hosts drop ICMP echo requests (nftables). Ground truth: the
echo ports are open, the others closed; the ICMP-dropping hosts are filtered (nmap: down), the
rest answer.

What it measures, per run (wall clock, median over runs):
- UDP: portmesh's UDP prober driven the way the engine will drive it: a first pass over every
  port at full speed, then the silent ports again paced per host at UDP_PER_HOST_PPS after a
  burst of UDP_PER_HOST_BURST (the far kernel's ICMP error rate limit, see scanner.probes.udp),
  up to --retries passes. Against ``nmap -sU -n -Pn`` on the same ports.
- ICMP: portmesh's ICMP prober over every lab host (1 s timeout, one retry of silent hosts),
  against ``nmap -sn -PE -n --disable-arp-ping`` (ARP ping would otherwise answer for nmap on a
  local segment).

``--icmp-ratelimit 0`` sets node1's net.ipv4.icmp_ratelimit to 0 (no per-destination limit) to
show the sweep without the kernel's 1/s cap; by default the lab keeps the kernel default
(1000 ms), which is what a real cluster node has and what both tools must live with.
Until ``portmesh scan`` drives UDP itself this script calls the probers directly.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from scanner.core.flows import Flow  # noqa: E402
from scanner.lab.netns import Lab  # noqa: E402
from scanner.probes import icmp, udp  # noqa: E402
from scanner.probes.base import Outcome, ProbeOptions  # noqa: E402

CLOSED_BASE = 20000
OPEN_BASE = 24000

ECHO = r"""
import selectors, socket, sys
sel = selectors.DefaultSelector()
for p in sys.argv[1:]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(p)))
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        try:
            d, a = key.fileobj.recvfrom(65535)
            key.fileobj.sendto(d, a)
        except OSError:
            pass
"""


# ---- portmesh side ---------------------------------------------------------------------------


class HostPacer:
    """Token bucket per destination: ``pps`` per second, ``burst`` banked."""

    def __init__(self, pps: float, burst: int) -> None:
        self.pps, self.burst = pps, burst
        self.next: dict[str, float] = {}

    async def wait(self, dst: str) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        t = max(self.next.get(dst, now - self.burst / self.pps), now - self.burst / self.pps)
        t += 1.0 / self.pps
        self.next[dst] = t
        if t > now:
            await asyncio.sleep(t - now)


SILENT = Outcome("open|filtered", "no-response", None, True)
FLOOR = 0.1  # nmap's --min-rtt-timeout default


class Rtt:
    slowest = 0.0  # the slowest answer seen in this sweep, seconds


async def adaptive(
    p, flows: list[Flow], initial: float, rtt: Rtt, pacer: HostPacer | None = None
) -> dict:
    """One attempt per flow; an attempt still silent once the time since the last send exceeds
    max(FLOOR, 4 x the slowest answer seen so far in the sweep) is given up early, as nmap's
    (and the engine's) adaptive timeouts do. Returns {flow: Outcome}."""
    loop = asyncio.get_running_loop()
    last_send = loop.time()
    unsent = len(flows)

    async def one(f: Flow) -> Outcome:
        nonlocal last_send, unsent
        if pacer is not None:
            await pacer.wait(f.dst)
        last_send = loop.time()
        unsent -= 1
        return await p.probe(f, initial)

    tasks = {f: asyncio.ensure_future(one(f)) for f in flows}
    while True:
        pending = [t for t in tasks.values() if not t.done()]
        if not pending:
            break
        for t in tasks.values():
            if t.done() and not t.cancelled() and t.result().rtt_ms:
                rtt.slowest = max(rtt.slowest, t.result().rtt_ms / 1000.0)
        late = loop.time() - last_send > max(FLOOR, 4 * rtt.slowest)
        if rtt.slowest and not unsent and late:
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            break
        await asyncio.wait(pending, timeout=0.01)
    return {f: (SILENT if t.cancelled() else t.result()) for f, t in tasks.items()}


async def portmesh_udp(dst: str, ports: list[int], retries: int, timeout: float) -> dict:
    p = udp.make_prober(ProbeOptions())
    await p.start(asyncio.get_running_loop())
    flows = [Flow(dst, port, "udp") for port in ports]
    # pass 1: everything at once; replies and the first few ICMP errors come back
    rtt = Rtt()
    res = await adaptive(p, flows, timeout, rtt)
    # then only the silent ones, paced to the far host's ICMP error budget
    pacer = HostPacer(udp.UDP_PER_HOST_PPS, udp.UDP_PER_HOST_BURST)
    pacer.next[dst] = asyncio.get_running_loop().time()  # pass 1 spent the banked burst
    for _ in range(retries):
        silent = [f for f, o in res.items() if o.silent]
        if not silent:
            break
        res.update(await adaptive(p, silent, timeout, rtt, pacer))
    p.close()
    return {f.port: o.state for f, o in res.items()}


async def portmesh_icmp(addrs: list[str], timeout: float, retries: int) -> dict:
    p = icmp.make_prober(ProbeOptions())
    await p.start(asyncio.get_running_loop())
    rtt = Rtt()
    res = await adaptive(p, [Flow(a, None, "icmp") for a in addrs], timeout, rtt)
    for _ in range(retries):
        silent = [f for f, o in res.items() if o.silent]
        if not silent:
            break
        res.update(await adaptive(p, silent, timeout, rtt))
    p.close()
    return {f.dst: ("up" if o.state == "open" else "down") for f, o in res.items()}


# ---- nmap side -------------------------------------------------------------------------------


def nmap_udp(dst: str, ports: list[int]) -> dict:
    spec = ",".join(str(p) for p in ports)
    cp = subprocess.run(
        ["nmap", "-sU", "-n", "-Pn", "-p", spec, "-oX", "-", dst], capture_output=True, text=True
    )
    if cp.returncode != 0:
        raise SystemExit(f"nmap -sU failed ({cp.returncode}): {cp.stderr.strip()[-500:]}")
    out = cp.stdout
    root = ET.fromstring(out)
    states: dict[int, str] = {}
    for host in root.iter("host"):
        for ep in host.iter("extraports"):
            # nmap folds many same-state ports into <extraports>; list them via extrareasons
            for er in ep.iter("extrareasons"):
                for rng in (er.get("ports") or "").split(","):
                    if not rng:
                        continue
                    a, _, b = rng.partition("-")
                    for p in range(int(a), int(b or a) + 1):
                        states[p] = ep.get("state", "?")
        for port in host.iter("port"):
            states[int(port.get("portid", "0"))] = port.find("state").get("state")  # type: ignore[union-attr]
    return states


def nmap_icmp(addrs: list[str]) -> dict:
    out = subprocess.run(
        ["nmap", "-sn", "-PE", "-n", "--disable-arp-ping", "-oX", "-", *addrs],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    root = ET.fromstring(out)
    up = set()
    for host in root.iter("host"):
        st = host.find("status")
        addr = host.find("address")
        if st is not None and addr is not None and st.get("state") == "up":
            up.add(addr.get("addr"))
    return {a: ("up" if a in up else "down") for a in addrs}


# ---- the run ---------------------------------------------------------------------------------


def score(got: dict, truth: dict) -> tuple[int, int]:
    return sum(1 for k, v in truth.items() if got.get(k) == v), len(truth)


def timed(fn, *a):
    t = time.perf_counter()
    r = fn(*a)
    return r, time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=8)
    ap.add_argument("--closed", type=int, default=200)
    ap.add_argument("--open", type=int, default=20)
    ap.add_argument("--runs", type=int, default=1, help="UDP runs (each ~closed/1 s per tool)")
    ap.add_argument("--icmp-runs", type=int, default=5)
    ap.add_argument("--retries", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1.0)
    ap.add_argument("--icmp-ratelimit", type=int, default=None, metavar="MS")
    ap.add_argument("--skip-nmap", action="store_true")
    ap.add_argument("--name", default=f"pmudp{os.getpid() % 10000}")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces, raw sockets)", file=sys.stderr)
        return 2
    use_nmap = not args.skip_nmap and shutil.which("nmap") is not None

    Lab.cleanup(args.name)
    lab = Lab.up(args.hosts, args.name)
    try:
        target = lab.hosts[0]
        open_ports = [OPEN_BASE + i for i in range(args.open)]
        closed_ports = [CLOSED_BASE + i for i in range(args.closed)]
        echo = lab.popen(
            target.name,
            [sys.executable, "-c", ECHO, *map(str, open_ports)],
            stdout=subprocess.PIPE,
        )
        assert echo.stdout is not None and echo.stdout.readline().strip() == b"ready"
        if args.icmp_ratelimit is not None:
            lab.run(
                target.name,
                ["sysctl", "-qw", f"net.ipv4.icmp_ratelimit={args.icmp_ratelimit}"],
                check=True,
            )
        dropping = lab.hosts[-2:] if args.hosts >= 4 else []
        for h in dropping:
            lab.nft(
                h.name,
                "table inet bench {\n chain i {\n  type filter hook input priority 0;\n"
                "  icmp type echo-request drop\n }\n}\n",
            )
        udp_truth = {p: "open" for p in open_ports} | {p: "closed" for p in closed_ports}
        ports = sorted(udp_truth)
        addrs = [h.addr for h in lab.hosts]
        icmp_truth = {h.addr: ("down" if h in dropping else "up") for h in lab.hosts}
        rl = lab.run(target.name, ["sysctl", "-n", "net.ipv4.icmp_ratelimit"],
                     capture_output=True, text=True).stdout.strip()  # fmt: skip

        rows: dict[str, list[tuple[float, int, int, Counter]]] = {}

        def record(key: str, got: dict, truth: dict, dt: float) -> None:
            ok, n = score(got, truth)
            rows.setdefault(key, []).append((dt, ok, n, Counter(got.values())))
            print(f"  {key:<14} {dt:8.2f} s  {ok}/{n} right  {dict(Counter(got.values()))}",
                  flush=True)  # fmt: skip

        print(f"lab {lab.name}: {args.hosts} hosts, UDP target {target.addr} "
              f"(icmp_ratelimit={rl} ms), {args.open} echo + {args.closed} closed ports",
              flush=True)  # fmt: skip
        # warm up: templates (scapy), the route and the neighbour entry
        asyncio.run(portmesh_udp(target.addr, [9], 0, 0.2))
        asyncio.run(portmesh_icmp(addrs, 0.5, 0))
        for i in range(args.runs):
            print(f"UDP run {i + 1}/{args.runs}", flush=True)
            time.sleep(7)  # let the far host's ICMP token bucket refill (6 tokens at 1/s)
            got, dt = timed(lambda: asyncio.run(portmesh_udp(target.addr, ports, args.retries,
                                                             args.timeout)))  # fmt: skip
            record("portmesh udp", got, udp_truth, dt)
            if use_nmap:
                time.sleep(7)
                got, dt = timed(nmap_udp, target.addr, ports)
                record("nmap -sU", got, udp_truth, dt)
        for _ in range(args.icmp_runs):
            got, dt = timed(lambda: asyncio.run(portmesh_icmp(addrs, args.timeout, args.retries)))
            record("portmesh icmp", got, icmp_truth, dt)
            if use_nmap:
                got, dt = timed(nmap_icmp, addrs)
                record("nmap -sn -PE", got, icmp_truth, dt)
        echo.kill()
        echo.wait()
    finally:
        lab.down()

    print()
    print(f"{'case':<14} {'median s':>9} {'right':>9}  runs")
    med = {}
    for key, rs in rows.items():
        med[key] = statistics.median(r[0] for r in rs)
        worst = min(r[1] for r in rs)
        print(f"{key:<14} {med[key]:9.2f} {worst:>4}/{rs[0][2]:<4}  {len(rs)}")
    for ours, theirs in (("portmesh udp", "nmap -sU"), ("portmesh icmp", "nmap -sn -PE")):
        if ours in med and theirs in med and med[ours] > 0:
            print(f"time ratio {theirs} / {ours}: {med[theirs] / med[ours]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
