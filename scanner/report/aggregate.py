"""Fold a stream of records into per-requirement, per-direction cells (pure, bounded memory).

The unit is a *cell*: one run (``scan_id``), one requirement, one source host, one destination
host. A cell holds counts of pass / fail / unknown and, only when something did not pass, the
failing ports (as ranges, so a NodePort sweep of 2,768 ports is one or a few ranges), a few
reasons and a few sample flows. A cell that only ever passed is stored as a bare integer.
Memory therefore grows with hosts x hosts x requirements, never with the number of lines.

Verdicts: a record's own ``verdict`` (check, mesh) wins. A plain ``scan`` has none, so one is
derived from the state (see ``derive_verdict``), and the requirement key is ``proto/port``.
"""

from __future__ import annotations

import bisect
import contextlib
import ipaddress
import itertools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from scanner.core.flows import IPV6_SUFFIX
from scanner.core.model import natural_key
from scanner.core.verdicts import verdict

VERDICTS = ("pass", "fail", "unknown")
LOCAL = "(local)"  # source name of a plain scan's results (no src / src_host recorded)
MAX_RANGES = 64  # beyond this many disjoint ranges a PortSet switches to a 8 KiB bitmap
MAX_REASONS = 4
MAX_SAMPLES = 5


def derive_verdict(rec: dict[str, Any]) -> str:
    """The record's own verdict (check, mesh); for a plain scan, what `check` would say with
    ``--expect reachable`` and no responder (scanner/core/verdicts.py): open and closed pass (an RST
    proves the packets got through), filtered fails, an unanswered UDP probe is unknown."""
    v = rec.get("verdict")
    if v in VERDICTS:
        return v
    return verdict(str(rec.get("proto")), str(rec.get("state")))


# the reason of a send this host's own output firewall refused (EPERM): nothing left it
LOCAL_PROHIBITED = "local-prohibited"


class PortSet:
    """A set of ports kept as sorted disjoint ranges; exact, bounded (<= 8 KiB)."""

    __slots__ = ("_lo", "_hi", "_bits", "count")

    def __init__(self, ports: Iterable[int] = ()) -> None:
        self._lo: list[int] = []
        self._hi: list[int] = []
        self._bits: bytearray | None = None
        self.count = 0
        for p in ports:
            self.add(p)

    def __contains__(self, p: int) -> bool:
        if self._bits is not None:
            return bool(self._bits[p >> 3] & (1 << (p & 7)))
        i = bisect.bisect_right(self._lo, p) - 1
        return i >= 0 and p <= self._hi[i]

    def __bool__(self) -> bool:
        return self.count > 0

    def add(self, p: int) -> None:
        if self._bits is not None:
            b = 1 << (p & 7)
            if not self._bits[p >> 3] & b:
                self._bits[p >> 3] |= b
                self.count += 1
            return
        lo, hi = self._lo, self._hi
        # Fast path: results arrive mostly in ascending port order per pair.
        if hi and lo[-1] <= p:
            if p <= hi[-1]:
                return
            if p == hi[-1] + 1:
                hi[-1] = p
                self.count += 1
                return
            lo.append(p)
            hi.append(p)
            self.count += 1
            self._maybe_bitmap()
            return
        i = bisect.bisect_right(lo, p) - 1
        if i >= 0 and p <= hi[i]:
            return
        self.count += 1
        joins_left = i >= 0 and hi[i] + 1 == p
        joins_right = i + 1 < len(lo) and lo[i + 1] == p + 1
        if joins_left and joins_right:
            hi[i] = hi[i + 1]
            del lo[i + 1], hi[i + 1]
        elif joins_left:
            hi[i] = p
        elif joins_right:
            lo[i + 1] = p
        else:
            lo.insert(i + 1, p)
            hi.insert(i + 1, p)
            self._maybe_bitmap()

    def update(self, other: PortSet) -> None:
        for a, b in other.ranges():
            for p in range(a, b + 1):
                self.add(p)

    def _maybe_bitmap(self) -> None:
        if len(self._lo) <= MAX_RANGES:
            return
        bits = bytearray(8192)
        for a, b in zip(self._lo, self._hi, strict=True):
            for p in range(a, b + 1):
                bits[p >> 3] |= 1 << (p & 7)
        self._bits = bits
        self._lo, self._hi = [], []

    def ranges(self) -> Iterator[tuple[int, int]]:
        if self._bits is None:
            yield from zip(self._lo, self._hi, strict=True)
            return
        bits, start = self._bits, None
        for byte_i, byte in enumerate(bits):
            if byte in (0, 255):
                if byte == 0 and start is not None:
                    yield start, byte_i * 8 - 1
                    start = None
                elif byte == 255 and start is None:
                    start = byte_i * 8
                continue
            for k in range(8):
                on = byte & (1 << k)
                if on and start is None:
                    start = byte_i * 8 + k
                elif not on and start is not None:
                    yield start, byte_i * 8 + k - 1
                    start = None
        if start is not None:
            yield start, 65535


def format_ranges(ranges: Iterable[tuple[int, int]], sep: str = ",", dash: str = "-") -> str:
    return sep.join(str(a) if a == b else f"{a}{dash}{b}" for a, b in ranges)


def port_label(proto: str, ports: PortSet | None, limit: int = 6) -> str:
    """ "tcp/10250", "tcp/30100-30199", "udp/4789,8472", "icmp"; long lists are cut."""
    if not ports:
        return proto
    rs = list(_take(ports.ranges(), limit + 1))
    text = format_ranges(rs[:limit])
    if len(rs) > limit:
        text += f",... ({ports.count} ports)"
    return f"{proto}/{text}"


def _take(it: Iterator[tuple[int, int]], n: int) -> Iterator[tuple[int, int]]:
    for i, x in enumerate(it):
        if i >= n:
            return
        yield x


_NUM_SUFFIX = re.compile(r"^(.*?)(\d+)$")


def compress_names(names: Iterable[str], limit: int = 12) -> str:
    """Host lists the way cluster tools print them: node[1-4,7], worker-a; cut after ``limit``."""
    groups: dict[str, list[tuple[int, str]]] = {}
    plain: list[str] = []
    for n in sorted(set(names), key=natural_key):
        m = _NUM_SUFFIX.match(n)
        if m and not (len(m.group(2)) > 1 and m.group(2).startswith("0")):
            groups.setdefault(m.group(1), []).append((int(m.group(2)), n))
        else:
            plain.append(n)
    parts: list[str] = []
    for prefix, items in groups.items():
        if len(items) == 1:
            parts.append(items[0][1])
            continue
        nums = PortSet()  # any non-negative integers < 65536 fit; larger ones listed plainly
        big = []
        for k, name in items:
            if k < 65536:
                nums.add(k)
            else:
                big.append(name)
        parts.append(f"{prefix}[{format_ranges(nums.ranges())}]")
        parts.extend(big)
    parts.extend(plain)
    parts.sort(key=natural_key)
    if len(parts) > limit:
        return ", ".join(parts[:limit]) + f" (+{len(parts) - limit} more)"
    return ", ".join(parts)


NO_PORTS = PortSet()  # a cell's port set of a kind it has none of (shared: never added to)
NO_SAMPLES: list[dict[str, Any]] = []  # a cell's samples while it has none (shared)
NO_SRCS: frozenset[str] = frozenset()
_SHARED: dict[Any, Any] = {}
SHARED_VALUES = 1 << 14  # values kept for sharing (then it starts over)


def _shared(v: Any) -> Any:
    """One object per equal value (reason texts, sets of source addresses): a cell is made
    per failing direction, 250,000 of them in a 1,000-host mesh with 1% of its flows failing."""
    have = _SHARED.get(v)
    if have is None:
        if len(_SHARED) >= SHARED_VALUES:
            _SHARED.clear()
        have = _SHARED[v] = v
    return have


class Cell:
    """One direction (src -> dst) of one requirement in one run, once something did not pass."""

    __slots__ = (
        "npass",
        "nfail",
        "nunknown",
        "fail_ports",
        "closed_ports",
        "unknown_ports",
        "reasons",
        "samples",
        "fail_srcs",
        "local_ports",
        "nlocal",
    )

    def __init__(self, npass: int = 0) -> None:
        self.npass = npass
        self.nfail = 0
        self.nunknown = 0
        # (the three are the shared NO_PORTS until a port is added: most cells have one kind)
        self.fail_ports = NO_PORTS  # failed and not 'closed': a firewall drops or rejects
        self.closed_ports = NO_PORTS  # failed as 'closed' (--expect listening): nothing listens
        self.unknown_ports = NO_PORTS
        self.reasons: dict[str, int] = {}
        self.samples: list[dict[str, Any]] = NO_SAMPLES  # a list of its own once it has one
        # the source addresses the failing flows were recorded with (``src``: where the packets
        # really left from - a multi-homed host may use several: bounded by its addresses)
        self.fail_srcs: frozenset[str] = NO_SRCS
        # failed as local-prohibited: the source's own output chain refused the send (a subset
        # of fail_ports; nlocal counts them, portless protocols included)
        self.local_ports: PortSet | None = None
        self.nlocal = 0

    @property
    def state(self) -> str:
        if self.nfail:
            return "fail"
        if self.nunknown:
            return "unknown"
        return "pass"

    def note(
        self, verdict: str, rec: dict[str, Any], listening: bool = False, samples: bool = True
    ) -> None:
        """``listening``: the run checked for listeners (check --expect listening), so a failed
        'closed' means nothing listens; otherwise it is a reject (an RST from a firewall, or
        from the host where our responder should have answered). ``samples``: keep the first
        flows as samples (the HTML report shows them; the text does not)."""
        port = rec.get("port")
        if verdict == "fail":
            self.nfail += 1
            src = rec.get("src")
            if src:
                src = str(src)
                if src not in self.fail_srcs:
                    # a frozenset shared by the cells with the same sources (bounded cache)
                    self.fail_srcs = _shared(self.fail_srcs | {src})
            if port is not None:
                if listening and rec.get("state") == "closed":
                    ps = self.closed_ports
                    if ps is NO_PORTS:
                        ps = self.closed_ports = PortSet()
                else:
                    ps = self.fail_ports
                    if ps is NO_PORTS:
                        ps = self.fail_ports = PortSet()
                ps.add(port)
            if rec.get("reason") == LOCAL_PROHIBITED:
                self.nlocal += 1
                if port is not None:
                    if self.local_ports is None:
                        self.local_ports = PortSet()
                    self.local_ports.add(port)
        else:
            self.nunknown += 1
            if port is not None:
                if self.unknown_ports is NO_PORTS:
                    self.unknown_ports = PortSet()
                self.unknown_ports.add(port)
        reason = _shared(f"{rec.get('state')}: {rec.get('reason') or '?'}")
        if reason in self.reasons or len(self.reasons) < MAX_REASONS:
            self.reasons[reason] = self.reasons.get(reason, 0) + 1
        else:
            self.reasons["other"] = self.reasons.get("other", 0) + 1
        if samples and len(self.samples) < MAX_SAMPLES:
            if self.samples is NO_SAMPLES:
                self.samples = []
            self.samples.append(
                {
                    "port": port,
                    "state": rec.get("state"),
                    "reason": rec.get("reason"),
                    "verdict": verdict,
                    "rtt_ms": rec.get("rtt_ms"),
                    "attempts": rec.get("attempts"),
                }
            )

    def top_reason(self) -> str:
        if not self.reasons:
            return ""
        return max(self.reasons.items(), key=lambda kv: kv[1])[0]


# A requirement checked over IPv6 is reported apart from its IPv4 twin, under IPV6_SUFFIX
# (scanner.core.flows: check's stderr names it the same way).


@dataclass
class Requirement:
    """One requirement (catalog id, or proto/port for a plain scan) within one run."""

    key: str
    proto: str
    ports: PortSet = field(default_factory=PortSet)
    last_tally_ports: str | None = None  # the ports text of the last tally folded into ports
    # (src index, dst index) -> int (pass count, every flow passed) or Cell
    cells: dict[int, int | Cell] = field(default_factory=dict)
    nfail: int = 0
    nunknown: int = 0
    npass: int = 0

    def cell_state(self, key: int) -> str | None:
        c = self.cells.get(key)
        if c is None:
            return None
        return "pass" if isinstance(c, int) else c.state

    def marked(self) -> Iterator[tuple[int, Cell]]:
        """(key, Cell) of every direction where something did not pass. ``cells`` may be a
        mapping that keeps its all-passing directions in a table elsewhere (the mesh's summary:
        ``scanner.mesh.summary.TableCells``); its other cells are in its ``own`` dict."""
        own = getattr(self.cells, "own", self.cells)
        return ((k, c) for k, c in own.items() if isinstance(c, Cell))

    def peer_counts(self) -> tuple[dict[int, int], dict[int, int]]:
        """(host -> directions into it, host -> directions out of it) over every cell."""
        counted = getattr(self.cells, "peer_counts", None)
        if counted is not None:
            return counted()  # type: ignore[no-any-return]
        n_srcs: dict[int, int] = {}
        n_dsts: dict[int, int] = {}
        for k in self.cells:
            s, d = divmod(k, STRIDE)
            n_srcs[d] = n_srcs.get(d, 0) + 1
            n_dsts[s] = n_dsts.get(s, 0) + 1
        return n_srcs, n_dsts


@dataclass
class Run:
    """One scan_id: its hosts, requirements and bookkeeping."""

    scan_id: str
    argv: list[str] | None = None
    listening: bool = False  # check --expect listening: 'closed' means nothing listens
    started: str | None = None
    planned: int | None = None
    summary: dict[str, Any] | None = None
    names: list[str] = field(default_factory=list)  # host index -> name
    index: dict[str, int] = field(default_factory=dict)  # name -> index
    addrs: dict[int, str] = field(default_factory=dict)  # host index -> address seen
    unreachable: dict[str, str] = field(default_factory=dict)  # host name -> reason
    reqs: dict[str, Requirement] = field(default_factory=dict)
    results: int = 0
    starts: int = 0  # start records seen: more than one means the run was fed twice
    tallied: int = 0  # passing flows counted in tally records (--emit failures)
    pairs: int = 0
    pair_verdicts: dict[str, int] = field(default_factory=dict)

    def host(self, name: str, addr: str | None = None) -> int:
        i = self.index.get(name)
        if i is None:
            i = self.index[name] = len(self.names)
            self.names.append(name)
        if addr and i not in self.addrs:
            self.addrs[i] = addr
        return i

    @property
    def nfail(self) -> int:
        return sum(r.nfail for r in self.reqs.values())


# Host indexes pack into one int key: src * STRIDE + dst (smaller dict entries than tuples).
STRIDE = 1 << 20


def split_key(key: int) -> tuple[int, int]:
    return divmod(key, STRIDE)


class Aggregate:
    """Everything a report needs, built by feeding records one at a time."""

    def __init__(self, samples: bool = True) -> None:
        self.samples = samples  # keep sample flows per cell (for the HTML report)
        self.runs: dict[str, Run] = {}
        self.failures = 0  # fail verdicts + fail/one-way pair records
        self.unknowns = 0
        self.passes = 0
        # `portmesh watch` streams state changes; the report shows the latest state of each
        # (node, peer, requirement, direction), folded in once the input has been read
        self._watch: dict[tuple[str, str, str, str, str], dict[str, Any]] = {}

    def run(self, scan_id: str) -> Run:
        r = self.runs.get(scan_id)
        if r is None:
            r = self.runs[scan_id] = Run(scan_id)
        return r

    def feed(self, records: Iterable[dict[str, Any]]) -> Aggregate:
        add = self.add
        for rec in records:
            add(rec)
        self._fold_watch()
        return self

    def _fold_watch(self) -> None:
        latest, self._watch = self._watch, {}
        for rec in latest.values():
            self._result(self.run(str(rec.get("scan_id") or "watch")), rec)

    def add(self, rec: dict[str, Any]) -> None:
        t = rec["type"]
        if t == "watch":
            key = (
                rec.get("node"),
                rec.get("peer"),
                rec.get("req"),
                rec.get("direction"),
                rec.get("proto"),
            )
            self._watch[key] = rec  # type: ignore[index]
            return
        run = self.run(str(rec.get("scan_id") or "-"))
        if t == "result":
            self._result(run, rec)
        elif t == "pair":
            self._pair(run, rec)
        elif t == "tally":
            self._tally(run, rec)
        elif t == "host":
            if rec.get("state") == "unreachable":
                run.unreachable[rec["name"]] = str(rec.get("reason") or "")
                run.host(rec["name"], rec.get("address"))
        elif t == "start":
            run.starts += 1
            run.argv = rec.get("argv")
            run.listening = _expects_listening(run.argv) or rec.get("expect") == "listening"
            run.started = rec.get("ts")
            run.planned = rec.get("planned")
        elif t == "summary":
            run.summary = rec

    def _result(self, run: Run, rec: dict[str, Any]) -> None:
        run.results += 1
        proto = rec["proto"]
        port = rec.get("port")
        key = rec.get("req") or (f"{proto}/{port}" if port is not None else proto)
        if rec.get("af") == "ipv6" or ":" in rec["dst"]:
            key += IPV6_SUFFIX  # the family is part of what failed: name it
        req = run.reqs.get(key)
        if req is None:
            req = run.reqs[key] = Requirement(key, proto)
        if port is not None:
            req.ports.add(port)
        src_name = rec.get("src_host") or rec.get("src") or LOCAL
        s = run.host(src_name, rec.get("src"))
        d = run.host(rec.get("host") or rec["dst"], rec["dst"])
        ck = s * STRIDE + d
        verdict = derive_verdict(rec)
        cur = req.cells.get(ck)
        if verdict == "pass":
            self.passes += 1
            req.npass += 1
            if cur is None:
                req.cells[ck] = 1
            elif isinstance(cur, int):
                req.cells[ck] = cur + 1
            else:
                cur.npass += 1
            return
        if verdict == "fail":
            self.failures += 1
            req.nfail += 1
        else:
            self.unknowns += 1
            req.nunknown += 1
        if not isinstance(cur, Cell):
            cur = req.cells[ck] = Cell(cur or 0)
        cur.note(verdict, rec, run.listening, self.samples)

    def add_passes(
        self,
        run: Run,
        key: str,
        proto: str,
        src: tuple[str, str | None],
        dst: tuple[str, str],
        n: int,
    ) -> None:
        """``n`` passing results of one direction at once, for a caller that counted them
        itself (the mesh coordinator: a Counter increment per result instead of ``add``).
        ``src``/``dst`` are (name, address)."""
        req = run.reqs.get(key)
        if req is None:
            req = run.reqs[key] = Requirement(key, proto)
        ck = run.host(*src) * STRIDE + run.host(*dst)
        run.results += n
        self.passes += n
        req.npass += n
        cur = req.cells.get(ck)
        if cur is None:
            req.cells[ck] = n
        elif isinstance(cur, int):
            req.cells[ck] = cur + n
        else:
            cur.npass += n

    def add_pass_cells(
        self,
        run: Run,
        key: str,
        proto: str,
        hosts: list[tuple[str, str | None]],
        cells: Iterable[tuple[int, int, int]],
    ) -> None:
        """``add_passes`` for many directions of one requirement at once: ``cells`` yields
        (src, dst, n) with src and dst indexes into ``hosts`` ((name, address) pairs). A host
        joins the run the first time a cell names it, as with ``add_passes``."""
        it = iter(cells)
        first = next(it, None)
        if first is None:
            return
        req = run.reqs.get(key)
        if req is None:
            req = run.reqs[key] = Requirement(key, proto)
        idx: list[int | None] = [None] * len(hosts)
        have = req.cells
        total = 0
        for s, d, n in itertools.chain((first,), it):
            rs = idx[s]
            if rs is None:
                rs = idx[s] = run.host(*hosts[s])
            rd = idx[d]
            if rd is None:
                rd = idx[d] = run.host(*hosts[d])
            ck = rs * STRIDE + rd
            cur = have.get(ck)
            if cur is None:
                have[ck] = n
            elif cur.__class__ is int:
                have[ck] = cur + n  # type: ignore[operator]
            else:
                cur.npass += n  # type: ignore[union-attr]
            total += n
        run.results += total
        self.passes += total
        req.npass += total

    def _tally(self, run: Run, rec: dict[str, Any]) -> None:
        """A tally record (``--emit failures``): ``flows`` passing flows of one direction."""
        n = rec["flows"]
        run.tallied += n
        proto = rec["proto"]
        text = rec.get("ports")
        key = rec.get("req") or (f"{proto}/{text}" if text else proto)
        if rec.get("af") == "ipv6" or ":" in (rec.get("dst") or ""):
            key += IPV6_SUFFIX  # as for results: the family's directions apart
        req = run.reqs.get(key)
        if req is None:
            req = run.reqs[key] = Requirement(key, proto)
        if text and text != req.last_tally_ports:  # most directions repeat the same ports
            req.last_tally_ports = text
            for tok in text.split(","):
                a, _, b = tok.partition("-")
                with contextlib.suppress(ValueError):
                    for p in range(int(a), int(b or a) + 1):
                        req.ports.add(p)
        s = run.host(rec["src_host"], rec.get("src"))
        d = run.host(rec["host"], rec.get("dst"))
        if not n:
            return
        ck = s * STRIDE + d
        cur = req.cells.get(ck)
        self.passes += n
        req.npass += n
        if cur is None:
            req.cells[ck] = n
        elif isinstance(cur, int):
            req.cells[ck] = cur + n
        else:
            cur.npass += n

    def _pair(self, run: Run, rec: dict[str, Any]) -> None:
        """Pair records (mesh) restate both directions; they only fill directions no result
        record covered (an input filtered down to pair lines still gives a report)."""
        run.pairs += 1
        v = str(rec.get("verdict"))
        run.pair_verdicts[v] = run.pair_verdicts.get(v, 0) + 1
        proto = str(rec.get("proto") or "?")
        ports = rec.get("ports") if rec.get("ports") is not None else rec.get("port")
        key = rec.get("req") or (f"{proto}/{ports}" if ports is not None else proto)
        if rec.get("af") == "ipv6":
            key += IPV6_SUFFIX
        req = run.reqs.get(key)
        if req is None:
            req = run.reqs[key] = Requirement(key, proto)
        port_list = _pair_ports(ports)
        for p in port_list:
            req.ports.add(p)
        a, b = run.host(rec["a"]), run.host(rec["b"])
        for s, d, val in ((a, b, rec.get("a_to_b")), (b, a, rec.get("b_to_a"))):
            ck = s * STRIDE + d
            if ck in req.cells:
                continue
            if isinstance(val, dict):
                val = val.get("verdict")
            verdict = val if val in VERDICTS else "unknown"
            if verdict == "pass":
                req.cells[ck] = 1
                req.npass += 1
                self.passes += 1
                continue
            cell = req.cells[ck] = Cell()
            if verdict == "fail":
                self.failures += 1
                req.nfail += 1
            else:
                self.unknowns += 1
                req.nunknown += 1
            fake = {"state": "pair", "reason": f"pair record: {rec.get('verdict')}"}
            if port_list:
                for p in port_list:
                    cell.note(verdict, {**fake, "port": p})
                # note() counted one flow per port; a pair record is one observation
                if verdict == "fail":
                    cell.nfail = 1
                else:
                    cell.nunknown = 1
            else:
                cell.note(verdict, fake)


def duplicate_warning(run: Run) -> str | None:
    """A run fed more than once (a truncated copy and the full file): the counts add up twice.
    Flows are not remembered (memory stays O(hosts^2)), so this is told from the counts."""
    over = run.planned is not None and run.results > run.planned
    if not over and run.starts <= 1:
        return None
    what = (
        f"{run.results} results for {run.planned} planned flows"
        if over
        else (f"its start record {run.starts} times")
    )
    return (
        f"duplicate results of one run: {what} (the same run fed twice, e.g. a truncated copy "
        "and the full file?); counts include the duplicates"
    )


def _expects_listening(argv: Any) -> bool:
    if not isinstance(argv, list):
        return False
    args = [str(a) for a in argv]
    if "--expect=listening" in args:
        return True
    return any(a == "--expect" and b == "listening" for a, b in zip(args, args[1:], strict=False))


def _pair_ports(ports: Any) -> list[int]:
    if isinstance(ports, int):
        return [ports]
    if isinstance(ports, list):
        return [p for p in ports if isinstance(p, int) and 0 <= p <= 65535]
    if isinstance(ports, str):
        out: list[int] = []
        for tok in ports.split(","):
            a, _, b = tok.strip().partition("-")
            if a.isdigit() and (not b or b.isdigit()):
                lo, hi = int(a), int(b or a)
                if 0 <= lo <= hi <= 65535 and hi - lo < 65536:
                    out.extend(range(lo, hi + 1))
        return out
    return []


def address_family(addr: str | None) -> int | None:
    if not addr:
        return None
    try:
        return ipaddress.ip_address(addr).version
    except ValueError:
        return None
