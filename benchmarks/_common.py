"""Shared machinery of the benchmark scripts: the lab, whole-process timing, parsers of each
tool's output, the ground-truth comparison, medians and the table.

Not a test module and not part of the package: ``benchmarks/run.py`` imports it from its own
directory. ``python benchmarks/_common.py naive ADDR... -p LO-HI`` is the naive asyncio+uvloop
scanner used as the floor in case 1 (it must run as its own process to be timed like the rest).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NODEPORTS = (30000, 32767)
DROP_PORT = 31000  # nft drop in every target -> filtered
REJECT_PORT = 32000  # nft reject with tcp reset -> closed
TRUTH_STATES = ("open", "closed", "filtered")

# ---- the lab ------------------------------------------------------------------------------


class BenchLab:
    """A scanner host ``scan`` and targets t1..tN in a scanner.lab.netns.Lab of our own name.

    Every target runs ``portmesh respond`` on the NodePort range (a real accept()ing responder:
    a bare listen() without accept() fills its backlog after ~128 connections and then looks
    filtered) and an nftables table ``inet bench`` that drops DROP_PORT and rejects REJECT_PORT
    with a TCP reset. ``set_loss`` adds random SYN loss on a target.
    """

    SCANNER = "scan"

    def __init__(self, targets: int, name: str = "bench") -> None:
        from scanner.lab.netns import Lab

        Lab.cleanup(name)  # leftovers of a crashed earlier run of ours
        self.names = [f"t{i}" for i in range(1, targets + 1)]
        self.lab = Lab.up(name=name, names=[self.SCANNER, *self.names], host_link=False)
        self.responders: list[subprocess.Popen] = []
        try:
            self._start()
        except BaseException:
            self.down()
            raise

    @property
    def ns(self) -> str:
        return self.lab.host(self.SCANNER).ns

    def addr(self, name: str) -> str:
        return self.lab.host(name).addr

    def mac(self, name: str) -> str:
        cp = self.lab.run(
            name, ["cat", "/sys/class/net/eth0/address"], capture_output=True, text=True
        )
        return cp.stdout.strip()

    def target_addrs(self, n: int | None = None) -> list[str]:
        return [self.addr(t) for t in self.names[: n or len(self.names)]]

    def _start(self) -> None:
        lo, hi = NODEPORTS
        logs = []
        for t in self.names:
            log = tempfile.TemporaryFile()  # noqa: SIM115 - closed below, after ready
            p = self.lab.popen(
                t,
                [sys.executable, "-m", "scanner", "respond", "-p", f"{lo}-{hi}", "--ttl", "7200"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
            self.responders.append(p)
            logs.append((t, p, log))
            self.set_loss(t, 0)
        deadline = time.monotonic() + 60
        for t, p, log in logs:
            while True:
                log.seek(0)
                text = log.read().decode(errors="replace")
                if '"ready"' in text:
                    if '"failed":[]' not in text.replace(" ", ""):
                        raise RuntimeError(f"responder in {t} could not bind everything: {text}")
                    break
                if p.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"responder in {t} did not start: {text.strip()[-300:]}")
                time.sleep(0.05)
            log.close()

    def set_loss(self, target: str, pct: int) -> None:
        """(Re)load the target's table: the drop and reject ports, plus pct% random SYN loss."""
        loss = (
            f"\t\ttcp dport {NODEPORTS[0]}-{NODEPORTS[1]} tcp flags & (syn|ack) == syn "
            f"numgen random mod 100 < {pct} drop\n"
            if pct
            else ""
        )
        self.lab.nft(
            target,
            "table inet bench {}\ndelete table inet bench\ntable inet bench {\n"
            "\tchain input {\n\t\ttype filter hook input priority filter; policy accept;\n"
            f"{loss}"
            f"\t\ttcp dport {DROP_PORT} drop\n"
            f"\t\ttcp dport {REJECT_PORT} reject with tcp reset\n"
            "\t}\n}\n",
        )

    def truth(self, n: int | None = None) -> dict[tuple[str, int], str]:
        lo, hi = NODEPORTS
        out: dict[tuple[str, int], str] = {}
        for a in self.target_addrs(n):
            for p in range(lo, hi + 1):
                out[(a, p)] = (
                    "filtered" if p == DROP_PORT else "closed" if p == REJECT_PORT else "open"
                )
        return out

    def down(self) -> None:
        for p in self.responders:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
        self.lab.down()
        for p in self.responders:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=2)


# ---- whole-process timing ----------------------------------------------------------------


@dataclass
class Measure:
    wall: float
    user: float
    sys: float
    maxrss_mb: float  # ru_maxrss of the child: the largest single process among it and its
    # reaped children (RUSAGE_BOTH semantics of wait4), not a sum over shard processes
    rc: int
    out: bytes
    err: bytes = b""


def timed(
    argv: Sequence[str], ns: str | None = None, timeout: float = 300.0, devnull: bool = False
) -> Measure:
    """Run argv (inside netns ns) as one child; wall around it, user/sys from os.wait4.

    ``ip netns exec`` execs the command in place (no fork outside batch mode), so the user/sys
    of the waited pid are the tool's own, including any children it reaped (scan shards).
    Peak RSS is NOT taken from that rusage: a child made by fork/vfork starts with a copy of
    this (large) process's memory map, and the kernel keeps its high-water mark across exec
    into ru_maxrss (every tool read 45 MB here once this process had grown). GNU time, a
    1-2 MB process, forks the tool instead, and its %M is the tool's own peak.
    ``devnull``: the tool's stdout goes to /dev/null (Measure.out is then empty).
    """
    rss_via_time = Path("/usr/bin/time").exists()
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile("r") as rss_file,
    ):
        wrap = ["/usr/bin/time", "-f", "%M", "-o", rss_file.name] if rss_via_time else []
        full = (["ip", "netns", "exec", ns] if ns else []) + wrap + list(argv)
        t0 = time.perf_counter()
        sink = subprocess.DEVNULL if devnull else out
        p = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=sink, stderr=err, cwd=ROOT)
        deadline = t0 + timeout
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                p.kill()
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.002)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)  # already reaped: keep Popen quiet
        rss_mb = ru.ru_maxrss / 1024
        if rss_via_time:
            # the last line is %M in KiB ("Command exited with non-zero status N" may precede)
            lines = rss_file.read().split()
            rss_mb = int(lines[-1]) / 1024 if lines and lines[-1].isdigit() else 0.0
        out.seek(0)
        err.seek(0)
        return Measure(wall, ru.ru_utime, ru.ru_stime, rss_mb, p.returncode, out.read(), err.read())


# ---- parsers: tool output -> {(addr, port): state} ----------------------------------------


def parse_portmesh(data: bytes) -> dict[tuple[str, int], str]:
    import orjson

    out: dict[tuple[str, int], str] = {}
    for line in data.splitlines():
        if not line.startswith(b'{"type":"result"'):
            continue
        r = orjson.loads(line)
        out[(r["dst"], r["port"])] = r["state"]
    return out


_GREP_PORT = re.compile(r"(\d+)/([a-z|]+)/tcp/")


def parse_nmap_grep(data: bytes) -> dict[tuple[str, int], str]:
    """nmap -oG -: listed ports with their state; the rest of -p LO-HI in the 'Ignored State'."""
    out: dict[tuple[str, int], str] = {}
    for line in data.decode(errors="replace").splitlines():
        m = re.match(r"Host: (\S+) .*Ports: (.*)", line)
        if not m:
            continue
        addr, rest = m.group(1), m.group(2)
        ports_part, _, ignored = rest.partition("Ignored State:")
        for pm in _GREP_PORT.finditer(ports_part):
            out[(addr, int(pm.group(1)))] = pm.group(2)
        im = re.match(r"\s*(\S+) \(", ignored)
        if im:
            lo, hi = NODEPORTS
            for p in range(lo, hi + 1):
                out.setdefault((addr, p), im.group(1))
    return out


def parse_masscan_list(data: bytes) -> dict[tuple[str, int], str]:
    """masscan -oL -: 'open tcp PORT ADDR TS' (and 'closed ...' with --show closed)."""
    out: dict[tuple[str, int], str] = {}
    for line in data.decode(errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[1] == "tcp" and parts[0] in ("open", "closed"):
            out[(parts[3], int(parts[2]))] = parts[0]
    return out


def parse_naive(data: bytes) -> dict[tuple[str, int], str]:
    out: dict[tuple[str, int], str] = {}
    for line in data.decode().splitlines():
        a, p, s = line.split()
        out[(a, int(p))] = s
    return out


@dataclass
class Check:
    wrong: int  # ports whose state differs from the truth (a missing port counts)
    detail: str  # a few examples

    @property
    def ok(self) -> bool:
        return self.wrong == 0


def compare(
    found: dict[tuple[str, int], str],
    truth: dict[tuple[str, int], str],
    absent: str | None = None,
    only_open: bool = False,
) -> Check:
    """Wrong = ports whose state is not the truth's. ``absent``: the state a tool implies by not
    listing a port (masscan lists open ports only). ``only_open``: the tool cannot tell closed
    from filtered, so only open/not-open is compared (masscan)."""
    wrong: list[str] = []
    for key, want in truth.items():
        got = found.get(key, absent)
        bad = (got == "open") != (want == "open") if only_open else got != want
        if bad:
            wrong.append(f"{key[0]}:{key[1]} {got or 'missing'}!={want}")
    wrong += [f"{k[0]}:{k[1]} unexpected" for k in found.keys() - truth.keys()]
    return Check(len(wrong), ", ".join(wrong[:3]) + (" ..." if len(wrong) > 3 else ""))


# ---- runs, medians, table -----------------------------------------------------------------


@dataclass
class Tool:
    label: str
    argv: Callable[[], list[str]]  # built at run time (addresses, temp files)
    parse: Callable[[bytes], dict[tuple[str, int], str]]
    compare_kw: dict[str, Any] = field(default_factory=dict)
    baseline: bool = False
    note: str = ""
    floor: bool = False  # the C floor of the case (the /floor column divides by it)


@dataclass
class Row:
    case: str
    label: str
    runs: list[Measure] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    flows: int = 0
    baseline: bool = False
    note: str = ""
    value: str | None = None
    floor: bool = False  # non-timing rows (case 5): a preformatted value

    def med(self, attr: str) -> float:
        return statistics.median(getattr(m, attr) for m in self.runs)

    def verdict(self) -> str:
        if any(m.rc not in (0,) for m in self.runs):
            rcs = sorted({m.rc for m in self.runs})
            return f"FAILED rc={rcs}"
        bad = [c for c in self.checks if not c.ok]
        if not bad:
            return "ok"
        worst = max(bad, key=lambda c: c.wrong)
        return f"WRONG {worst.wrong} in {len(bad)}/{len(self.checks)} runs ({worst.detail})"


def paired(
    case: str,
    tools: list[Tool],
    ns: str,
    truth: dict[tuple[str, int], str],
    runs: int,
    warmup: bool = True,
    log: Callable[[str], None] = print,
) -> list[Row]:
    """Warm-up (one run of each, not kept), then ``runs`` rounds; the order of the tools
    rotates every round so no tool always runs first (or right after the same neighbour)."""
    rows = [
        Row(case, t.label, flows=len(truth), baseline=t.baseline, note=t.note, floor=t.floor)
        for t in tools
    ]
    if warmup:
        for t in tools:
            timed(t.argv(), ns)
    for r in range(runs):
        order = list(range(len(tools)))
        k = r % len(tools)
        order = order[k:] + order[:k]
        if r % 2 and len(tools) > 2:  # with two tools the rotation alone alternates them
            order.reverse()
        for i in order:
            t = tools[i]
            m = timed(t.argv(), ns)
            c = compare(t.parse(m.out), truth, **t.compare_kw)
            rows[i].runs.append(m)
            rows[i].checks.append(c)
            log(
                f"  {case} run {r + 1}/{runs} {t.label}: {m.wall:.3f}s "
                f"{'ok' if c.ok else f'WRONG {c.wrong}'}"
                + (f" rc={m.rc} {m.err.decode(errors='replace').strip()[-200:]}" if m.rc else "")
            )
            m.out = b""  # do not keep megabytes of output per run
    return rows


def table(rows: Iterable[Row]) -> str:
    rows = list(rows)
    head = (
        "case",
        "tool",
        "wall s",
        "user s",
        "sys s",
        "RSS MB",
        "flows/s",
        "ratio",
        "/floor",
        "runs",
        "correct",
    )
    lines: list[tuple[str, ...]] = [head]
    base: dict[str, float] = {}
    floor: dict[str, float] = {}
    for r in rows:
        if r.baseline and r.runs:
            base[r.case] = r.med("wall")
        if r.floor and r.runs:
            floor[r.case] = r.med("wall")
    for r in rows:
        if r.value is not None:
            lines.append((r.case, r.label, r.value, "", "", "", "", "", "", "", r.note))
            continue
        if not r.runs:
            lines.append((r.case, r.label, "-", "", "", "", "", "", "", "", r.note or "not run"))
            continue
        wall = r.med("wall")
        b = base.get(r.case)
        ratio = f"{wall / b:.2f}" if b else "-"
        f = floor.get(r.case)
        vs_floor = "1.00f" if r.floor else (f"{wall / f:.2f}" if f else "-")
        rss = max(m.maxrss_mb for m in r.runs)
        whole = rss > 0  # 0: timed in-process by another script, no rusage
        lines.append(
            (
                r.case,
                r.label,
                f"{wall:.3f}",
                f"{r.med('user'):.2f}" if whole else "-",
                f"{r.med('sys'):.2f}" if whole else "-",
                f"{rss:.0f}" if whole else "-",
                f"{r.flows / wall:,.0f}" if r.flows else "-",
                ("1.00*" if r.baseline else ratio),
                vs_floor,
                str(len(r.runs)),
                r.verdict() + (f"; {r.note}" if r.note else ""),
            )
        )
    widths = [max(len(x[i]) for x in lines) for i in range(len(head) - 1)]
    out = []
    for j, x in enumerate(lines):
        out.append(
            "  ".join(c.ljust(w) for c, w in zip(x[:-1], widths, strict=True)) + "  " + x[-1]
        )
        if j == 0:
            out.append("  ".join("-" * w for w in widths) + "  " + "-" * 7)
    return "\n".join(out)


def have(cmd: str) -> bool:
    return shutil.which(cmd) is not None


# ---- the naive floor: semaphore + asyncio.open_connection + wait_for 1 s --------------------


def naive_main(argv: list[str]) -> int:
    import asyncio
    import errno

    import uvloop

    addrs = [a for a in argv if a != "-p" and "-" not in a]
    lo, hi = (int(x) for x in argv[argv.index("-p") + 1].split("-"))
    sem = asyncio.Semaphore(1000)
    lines: list[str] = []

    async def probe(a: str, p: int) -> None:
        async with sem:
            try:
                _, w = await asyncio.wait_for(asyncio.open_connection(a, p), 1.0)
                w.transport.abort()
                s = "open"
            except (asyncio.TimeoutError, TimeoutError):
                s = "filtered"
            except ConnectionRefusedError:
                s = "closed"
            except OSError as e:
                s = "closed" if e.errno == errno.ECONNREFUSED else "filtered"
            lines.append(f"{a} {p} {s}\n")

    async def main() -> None:
        await asyncio.gather(*(probe(a, p) for a in addrs for p in range(lo, hi + 1)))

    uvloop.run(main())
    sys.stdout.write("".join(lines))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["naive"]:
        sys.exit(naive_main(sys.argv[2:]))
    sys.exit("usage: python benchmarks/_common.py naive ADDR... -p LO-HI")
