"""The real coordinator against N simulated agents (``benchmarks/mesh.py --simulate N``).

    python benchmarks/mesh.py --simulate 1000 --sample 16
    python benchmarks/mesh.py --simulate 1000 --full --emit failures --fail-rate 0.01

The coordinator (``scanner.mesh.coordinator.run_mesh``, the real one) runs in this process; the
N agents run in ONE other process (forked before the coordinator starts), one asyncio task
each, each speaking the agent protocol over its own socketpair: ``transport.start`` is the
only thing replaced, so the coordinator's reading, parsing, window, pair join, matrix,
tallies and output are all the real code. The agents do not probe: they plan their own slice
with the real planner (``legs`` with ``sources={name}``) and answer every flow ``open``
(responder), except a deterministic ``--fail-rate`` share answered ``filtered``
(no-response): port p from host s to host d fails when (p + 7s + 13d) % (1/rate) == 0
(ICMP-like port-less flows: (7s + 13d) % ...). With ``--emit all`` they send what a real agent
sends (protocol 3): the failing results as lines with their index, the passing ones in blocks
built by the agent's own ``wire.PassBlocks`` (``--lines``: every result as its own line, the
coordinator's plain path, to compare the two). With ``--emit failures`` the agents send the
failing lines and one tally per (destination, requirement) inside ``done`` (in the agent's
columns, scanner.mesh.wire.TallyGroups), computed per
(leg, destination) arithmetically, so a 2.8-billion-flow mesh is simulated without touching
every flow.

Inventory: a synthetic kubespray cluster (3 control plane + etcd, the rest workers; calico +
MetalLB), as ``benchmarks/mesh.py`` uses for its estimates. Output: the NDJSON goes to
/dev/null (``-o FILE`` keeps it). Reported: the coordinator process's CPU time (user + sys),
its wall time, its peak RSS (ru_maxrss), its exit code and the simulator's CPU time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import resource
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import orjson

from scanner.core.flows import Flow
from scanner.core.ports import ports_text
from scanner.core.privileges import raise_nofile
from scanner.core.results import Result, encode_results
from scanner.engine.output import NdjsonOutput
from scanner.mesh import transport
from scanner.mesh.coordinator import MeshConfig, run_mesh
from scanner.mesh.wire import PassBlocks, TallyGroups
from scanner.plan.planner import legs
from scanner.plan.selection import SelectionOptions

SECRET_SCAN = "0" * 16
TS = 1795910400.0  # 2026-11-29T00:00:00Z: every simulated result line has the same time


def synthetic_inventory(nodes: int, path: Path) -> Path:
    lines = ["[kube_control_plane]"] + [
        f"cp{i} ansible_host=198.18.{i // 250}.{i % 250 + 1}" for i in range(3)
    ]
    lines += ["[etcd]"] + [f"cp{i}" for i in range(3)]
    lines += ["[kube_node]"] + [
        f"w{i} ansible_host=198.19.{i // 250}.{i % 250 + 1}" for i in range(nodes - 3)
    ]
    lines += ["[k8s_cluster:children]", "kube_control_plane", "kube_node"]
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- the simulated agents (one process) -----------------------------------------------------


class SimAgent:
    def __init__(
        self, name: str, index: dict[str, int], plan_inputs: Any, every: int, blocks: bool = True
    ) -> None:
        self.name = name
        self.blocks = blocks  # --emit all: passing results in blocks (wire.PassBlocks)
        self.index = index
        self.catalog, self.site, self.selection = plan_inputs
        self.every = every  # 1 / fail rate; 0: nothing fails

    def fails(self, s: int, d: int, port: int | None) -> bool:
        if not self.every:
            return False
        return ((port or 0) + 7 * s + 13 * d) % self.every == 0

    def slice_legs(self) -> list[tuple[Any, list[tuple[str, str]], tuple[Any, ...], str]]:
        sel = dataclasses.replace(self.selection, sources=frozenset({self.name}))
        out = []
        for leg in legs(self.catalog, self.site, sel):
            if not (leg.applies and leg.srcs and leg.dsts and leg.ports):
                continue
            (sname, saddr), *_ = leg.srcs
            dsts = [(n, a) for n, a in leg.dsts if n != sname and a != saddr]
            if dsts:
                out.append((leg.req, dsts, leg.ports, saddr))
        return out

    async def run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def send(rec: dict[str, Any]) -> None:
            writer.write(orjson.dumps(rec) + b"\n")

        emit = "all"
        while True:
            line = await reader.readline()
            if not line:
                break
            msg = orjson.loads(line)
            t = msg.get("type")
            if t == "hello":
                send({"type": "hello", "version": msg["version"], "agent": "portmesh sim",
                      "python": "3", "name": self.name, "pid": 0, "module": "sim"})  # fmt: skip
            elif t == "respond":
                send({"type": "ready", "bound": {"tcp": msg["tcp"], "udp": msg["udp"]},
                      "failed": []})  # fmt: skip
            elif t == "probe":
                emit = msg.get("emit", "all")
                await self.probe(msg["scan_id"], emit, send, writer)
            elif t == "stop":
                send({"type": "exit", "stats": {}})
                await writer.drain()
                break
        writer.close()

    async def probe(self, scan_id: str, emit: str, send: Any, writer: asyncio.StreamWriter) -> None:
        legs = self.slice_legs()
        planned = sum(len(p) * len(d) for _, d, p, _ in legs)
        send({"type": "probing", "scan_id": scan_id, "planned": planned})
        s = self.index[self.name]
        dumps = orjson.dumps
        ts = "2026-11-29T00:00:00.000Z"
        buf: list[bytes] = []
        tallies = TallyGroups()  # the agent's own wire columns (scanner.mesh.wire)
        base = 0
        t0 = time.perf_counter()

        blocks = PassBlocks(scan_id)
        fails: list[Result] = []

        async def flush() -> None:
            if fails:
                buf.append(encode_results(fails, scan_id))
                fails.clear()
            if blocks.results:
                buf.append(blocks.take())
            if buf:
                writer.write(b"".join(buf))
                buf.clear()
                await writer.drain()

        for req, dsts, ports, saddr in legs:
            proto, rid = req.proto, req.id
            nd = len(dsts)
            if emit == "all":
                # the agent's own code: Results, PassBlocks for the passing ones (protocol 3),
                # encode_results for the failing ones
                for pi, port in enumerate(ports):
                    for di, (dname, daddr) in enumerate(dsts):
                        flow = Flow(daddr, port, proto, dname, saddr, self.name, rid)
                        i = base + pi * nd + di
                        if self.fails(s, self.index[dname], port):
                            fails.append(Result(flow, "filtered", "no-response", 0.2, 1, TS,
                                                "fail", {"i": i}))  # fmt: skip
                        else:
                            r = Result(flow, "open", "responder", 0.2, 1, TS, "pass", {"i": i})
                            if not self.blocks:
                                fails.append(r)  # --lines: a line each, as protocol 2 sent them
                            elif blocks.add(r):
                                buf.append(blocks.take())
                    if len(fails) >= 512:
                        buf.append(encode_results(fails, scan_id))
                        fails.clear()
                    if len(buf) >= 8:
                        await flush()
            else:
                contiguous = ports[0] is not None and ports[-1] - ports[0] + 1 == len(ports)
                for di, (dname, daddr) in enumerate(dsts):
                    d = self.index[dname]
                    if contiguous and self.every:
                        r = (-(7 * s + 13 * d)) % self.every
                        first = ports[0] + (r - ports[0]) % self.every
                        bad = list(range(first, ports[-1] + 1, self.every))
                        pidx = [p - ports[0] for p in bad]
                    else:
                        pidx = [i for i, p in enumerate(ports) if self.fails(s, d, p)]
                        bad = [ports[i] for i in pidx]
                    for pi, port in zip(pidx, bad, strict=True):
                        buf.append(dumps({
                            "type": "result", "scan_id": scan_id, "ts": ts, "src": saddr,
                            "dst": daddr, "host": dname, "proto": proto, "port": port,
                            "state": "filtered", "reason": "no-response", "rtt_ms": None,
                            "attempts": 2, "src_host": self.name, "req": rid,
                            "verdict": "fail", "i": base + pi * nd + di,
                        }) + b"\n")  # fmt: skip
                    good = len(ports) - len(bad)
                    text = None
                    if ports[0] is not None and good:
                        text = _minus(ports, bad, contiguous)
                    tallies.add({"host": dname, "dst": daddr, "req": rid, "proto": proto,
                                 "states": {"open": good} if good else {}, "ports": text,
                                 "src": saddr, "af": "ipv4"})  # fmt: skip
                    if len(buf) >= 2048:
                        await flush()
            base += len(ports) * nd
            await asyncio.sleep(0)
        await flush()
        el = time.perf_counter() - t0
        done: dict[str, Any] = {"type": "done", "scan_id": scan_id, "planned": planned,
                                "results": planned, "elapsed_s": el, "rate_pps": None}  # fmt: skip
        if tallies.groups:
            done["tally_groups"] = tallies.wire()
        send(done)
        await writer.drain()


def _minus(ports: tuple[int, ...], bad: list[int], contiguous: bool) -> str:
    """The ports text of ``ports`` less ``bad`` (runs between the failing ports)."""
    if not contiguous:
        gone = set(bad)
        return ports_text(p for p in ports if p not in gone)
    out = []
    lo = ports[0]
    for b in [*bad, ports[-1] + 1]:
        if b > lo:
            out.append(f"{lo}" if b - 1 == lo else f"{lo}-{b - 1}")
        lo = b + 1
    return ",".join(out)


def simulator(
    socks: dict[str, socket.socket], plan_inputs: Any, every: int, blocks: bool = True
) -> None:
    names = sorted(socks)
    index = {n: i for i, n in enumerate(names)}

    async def main() -> None:
        tasks = []
        for n in names:
            r, w = await asyncio.open_unix_connection(sock=socks[n], limit=1 << 26)
            tasks.append(asyncio.create_task(SimAgent(n, index, plan_inputs, every, blocks).run(r, w)))
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())


# ---- the coordinator's side: a "process" that is a socket -------------------------------------


class SockProc:
    """What AgentLink needs of an asyncio subprocess, over one end of a socketpair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stdout = reader
        self.stdin = writer
        self.stderr = asyncio.StreamReader()
        self.stderr.feed_eof()
        self.returncode: int | None = None
        self.pid = 0

    async def wait(self) -> int:
        while not self.stdout.at_eof():
            await asyncio.sleep(0.05)
        if self.returncode is None:
            self.returncode = 0
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            self.returncode = -9
        with contextlib.suppress(Exception):
            self.stdin.close()


def run(
    nodes: int,
    sample: int | None,
    emit: str,
    fail_rate: float,
    output: str | None,
    summary_to: str | None = None,
    blocks: bool = True,
) -> dict:

    raise_nofile()
    with tempfile.TemporaryDirectory() as d:
        inv = synthetic_inventory(nodes, Path(d) / "inv.ini")
        catalog, site, selection = SelectionOptions(
            inventories=(str(inv),), with_features=("metallb",), nodeport_sample=sample
        ).resolve()
    names = sorted({h.name for h in site.hosts()})
    pairs = {n: socket.socketpair() for n in names}
    for a, b in pairs.values():  # a pipe's 64 KiB, not a socket's ~200 KiB, in flight
        for sk in (a, b):
            sk.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 15)
            sk.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 15)
    every = round(1 / fail_rate) if fail_rate > 0 else 0
    full_sel = dataclasses.replace(selection, sources=frozenset(names), scanner=None)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            for a, _ in pairs.values():
                a.close()
            simulator({n: b for n, (_, b) in pairs.items()}, (catalog, site, full_sel), every, blocks)
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    for _, b in pairs.values():
        b.close()

    async def fake_start(argv: list[str]) -> SockProc:
        r, w = await asyncio.open_unix_connection(
            sock=pairs[argv[1]][0], limit=transport.READ_BUFFER
        )
        return SockProc(r, w)

    real_start = transport.start
    transport.start = fake_start  # type: ignore[assignment]
    out = NdjsonOutput(output or os.devnull, stdout=False)
    err = open(summary_to or os.devnull, "w")  # noqa: SIM115
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    try:
        code = run_mesh(
            MeshConfig(
                catalog=catalog,
                site=site,
                selection=selection,
                exec_template="sim {name}",
                agent_cmd="agent",
                output=out,
                summary_to=err,
                emit=emit,
                forks=len(names),
            )
        )
    finally:
        transport.start = real_start  # type: ignore[assignment]
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    err.close()
    _, status = os.waitpid(pid, 0)
    sim = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "nodes": nodes,
        "nodeport": "full" if sample is None else f"sample {sample}",
        "emit": emit,
        "fail_rate": fail_rate,
        "exit": code,
        "wall_s": round(wall, 1),
        "coordinator_cpu_s": round((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), 1),
        "coordinator_rss_mb": round(r1.ru_maxrss / 1024, 1),
        "simulator_cpu_s": round(sim.ru_utime + sim.ru_stime, 1),
        "simulator_ok": status == 0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/mesh.py --simulate")
    ap.add_argument("--simulate", type=int, required=True, metavar="N")
    ap.add_argument("--sample", type=int, default=16)
    ap.add_argument("--full", action="store_true", help="the full NodePort range")
    ap.add_argument("--emit", choices=("all", "failures"), default="all")
    ap.add_argument("--fail-rate", type=float, default=0.01)
    ap.add_argument("-o", "--output", default=None)
    ap.add_argument("--summary-to", default=None, help="the human summary (default: discarded)")
    ap.add_argument(
        "--lines",
        action="store_true",
        help="--emit all: every passing result as its own line (no PassBlocks), to compare",
    )
    a = ap.parse_args(argv)
    res = run(
        a.simulate,
        None if a.full else a.sample,
        a.emit,
        a.fail_rate,
        a.output,
        a.summary_to,
        not a.lines,
    )
    print(orjson.dumps(res).decode())
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
