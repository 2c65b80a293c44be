"""The pair join: both directions of a requirement between two hosts -> one verdict (pure).

Every result record of a mesh is folded, as it streams in, into a ``Direction`` keyed by
``(req, src_host, dst_host)``: counts of pass / fail / unknown, the ports seen and the failed
ports with their (state, reason). Memory is bounded by hosts^2 x requirements, never by flows:
a NodePort sweep of 2,768 ports per pair keeps a count and a range, not the ports
(``PortSet`` stays exact only up to ``EXACT_PORTS`` ports).

At the end, every (req, a, b) whose two directions were both planned becomes one pair record::

    {"type":"pair","a":"node1","b":"node2","req":"etcd.peer","proto":"tcp","port":2380,
     "a_to_b":"pass","b_to_a":"fail","verdict":"one-way",
     "reason":"node2 -> node1: filtered (no-response)",
     "detail":{"a_to_b":{"pass":1,"fail":0,"unknown":0},"b_to_a":{"pass":0,"fail":1,...}}}

A direction fails when any of its flows fails, is unknown when none fails but one could not be
decided (state error: the agent was unreachable, the probe needed a privilege), else passes.
The pair verdict: both pass -> pass; both fail -> fail; exactly one fails while the other
passes -> one-way; a direction unknown -> unknown (a one-way failure cannot be told from a
two-way one without both sides).

Witness reports (``scanner.responder.witness``: a tagged ICMP echo, IP-in-IP packet or datagram to a
kernel-owned UDP port seen on the destination's interface) refine a silent failure: the packet
*reached* the destination's interface, so the path there is open and the loss is the
destination's own input firewall or the way back. The reason says so; the verdict stays fail,
since the flow as a whole does not work.
"""

from __future__ import annotations

import contextlib
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import compress
from typing import Any

import orjson

from scanner.core.flows import IPV6_SUFFIX
from scanner.core.ports import ports_text as ranges  # one implementation, re-exported
from scanner.core.tally import parse_runs

EXACT_PORTS = 32  # a PortSet keeps the ports themselves up to this many, then count + range
SILENT = frozenset({"filtered", "open|filtered"})


def pair_verdict(a_to_b: str, b_to_a: str) -> str:
    """Two direction verdicts -> pass | fail | one-way | unknown."""
    if a_to_b == "unknown" or b_to_a == "unknown":
        return "unknown"
    if a_to_b == b_to_a:
        return a_to_b  # pass or fail
    return "one-way"


_NO_PORTS: frozenset[int] = frozenset()
_SHARED: dict[Any, Any] = {}
SHARED_SETS = 1 << 16  # distinct exact port sets kept for sharing (then it starts over)


def _shared(ports: frozenset[int]) -> frozenset[int]:
    """One frozenset per distinct set of ports (bounded; a set not shared is still right)."""
    have = _SHARED.get(ports)
    if have is None:
        if len(_SHARED) >= SHARED_SETS:
            _SHARED.clear()
        have = _SHARED[ports] = ports
    return have


def _shared_value(v: Any) -> Any:
    """One object per equal address or (state, reason) of the directions with a failure
    (bounded; the cache shares with ``_shared``'s: their keys never compare equal)."""
    try:
        have = _SHARED.get(v)
    except TypeError:
        return v  # not hashable: kept as it is
    if have is None:
        if len(_SHARED) >= SHARED_SETS:
            _SHARED.clear()
        have = _SHARED[v] = v
    return have


class PortSet:
    """Ports of one direction: exact up to EXACT_PORTS, then a count and the lowest/highest."""

    __slots__ = ("exact", "count", "lo", "hi", "none")

    def __init__(self) -> None:
        # the ports while they are few: a frozenset shared by every PortSet holding the same
        # ports (``_shared``): the directions of a requirement mostly do (16 ports: ~730 bytes
        # once, not per direction with a failure)
        self.exact: frozenset[int] | None = _NO_PORTS
        self.count = 0
        self.lo: int | None = None
        self.hi: int | None = None
        self.none = 0  # portless flows (icmp, ipip)

    def add(self, port: int | None) -> None:
        if port is None:
            self.none += 1
            return
        self.count += 1
        self.lo = port if self.lo is None or port < self.lo else self.lo
        self.hi = port if self.hi is None or port > self.hi else self.hi
        exact = self.exact
        if exact is not None and port not in exact:
            self.exact = None if len(exact) >= EXACT_PORTS else _shared(exact | {port})

    def add_runs(self, runs: list[tuple[int, int]], flows: int) -> None:
        """``flows`` flows over these distinct ports (a tally): as if added one by one."""
        if not runs:
            self.none += flows
            return
        self.count += flows
        lo, hi = runs[0][0], runs[-1][1]
        self.lo = lo if self.lo is None or lo < self.lo else self.lo
        self.hi = hi if self.hi is None or hi > self.hi else self.hi
        if self.exact is not None:
            n = sum(b - a + 1 for a, b in runs)
            if n > EXACT_PORTS:
                self.exact = None
                return
            exact = set(self.exact)
            for a, b in runs:
                exact.update(range(a, b + 1))
            self.exact = None if len(exact) > EXACT_PORTS else _shared(frozenset(exact))

    def __len__(self) -> int:
        return self.count + self.none

    def __contains__(self, port: object) -> bool:
        if port is None:
            return self.none > 0
        return self.exact is not None and port in self.exact

    def text(self) -> str:
        if self.count == 0:
            return ""
        if self.exact is not None:
            return ranges(self.exact)
        assert self.lo is not None and self.hi is not None
        if self.count == self.hi - self.lo + 1:
            return f"{self.lo}-{self.hi}"
        return f"{self.count} ports in {self.lo}-{self.hi}"

    def single(self) -> int | None:
        """The one port, when there is exactly one."""
        if self.count == 1 and self.exact:
            return next(iter(self.exact))
        return None


@dataclass(slots=True)
class Direction:
    """The flows of one requirement from one host to another, folded."""

    proto: str
    src: str | None = None  # addresses, for matching witness reports
    dst: str | None = None
    passed: int = 0
    failed: int = 0
    unknown: int = 0
    ports: PortSet = field(default_factory=PortSet)
    # (state, reason) -> failed ports; a handful of distinct pairs at most
    failures: dict[tuple[str, str], PortSet] = field(default_factory=dict)
    unknowns: dict[str, int] = field(default_factory=dict)  # reason -> flows

    def add(self, port: int | None, state: str, reason: str, verdict: str | None) -> None:
        self.ports.add(port)
        if verdict == "pass":
            self.passed += 1
        elif verdict == "fail":
            self.failed += 1
            ps = self.failures.get((state, reason))
            if ps is None:
                ps = self.failures[_shared_value((state, reason))] = PortSet()
            ps.add(port)
        else:
            self.unknown += 1
            self.unknowns[reason] = self.unknowns.get(reason, 0) + 1

    def verdict(self) -> str:
        if self.failed:
            return "fail"
        if self.unknown:
            return "unknown"
        return "pass"

    def counts(self) -> dict[str, int]:
        return {"pass": self.passed, "fail": self.failed, "unknown": self.unknown}

    def why(self, src: str, dst: str, witnessed: bool = False, over: str = "") -> str:
        """One line: what went wrong in this direction (empty when it passed)."""
        parts = []
        for (state, reason), ps in sorted(self.failures.items()):
            where = f"{self.proto}/{ps.text()} " if ps.count else ""
            parts.append(f"{where}{state} ({reason})")
        if self.failed:
            text = f"{src} -> {dst}{over}: " + "; ".join(parts)
            if witnessed:
                text += (
                    f"; the probe arrived at {dst} (witness) but no answer came back: "
                    f"dropped by {dst}'s own input firewall or on the way back"
                )
            return text
        if self.unknown:
            rs = ", ".join(f"{r} x{n}" if n > 1 else r for r, n in sorted(self.unknowns.items()))
            return f"{src} -> {dst}{over}: undecided ({rs})"
        return ""


PortState = tuple  # (exact frozenset | None, count, lo, hi, none): a PortSet as a value
ABSENT = 0  # no flow of this direction yet
SPARSE = 0xFFFFFFFF  # the direction has a non-passing flow: its Direction is in ``sparse``
TALLY_MEMO = 1 << 16  # memoised tally transitions kept (then the memo starts over)


class _States:
    """PortSets interned as small ints, with memoised transitions (port-major plans give every
    direction of a requirement the same few port sets, so a handful of states serve them all)."""

    def __init__(self) -> None:
        self.states: list[PortState] = [(None, 0, None, None, 0), (frozenset(), 0, None, None, 0)]
        self.ids: dict[PortState, int] = {self.states[1]: 1}
        self.memo: dict[int, int] = {}
        self.tally_memo: dict[tuple[int, str | None, int], int] = {}

    def intern(self, ps: PortSet) -> int:
        st = (
            None if ps.exact is None else frozenset(ps.exact),
            ps.count,
            ps.lo,
            ps.hi,
            ps.none,
        )
        i = self.ids.get(st)
        if i is None:
            i = self.ids[st] = len(self.states)
            self.states.append(st)
        return i

    def portset(self, sid: int) -> PortSet:
        exact, count, lo, hi, none = self.states[sid]
        ps = PortSet()
        ps.exact = exact  # frozen: shared, as _shared would
        ps.count, ps.lo, ps.hi, ps.none = count, lo, hi, none
        return ps

    def tally_step(self, sid: int, text: str | None, flows: int) -> int:
        """The state after a tally of ``flows`` flows over the ports ``text`` (memoised: most
        directions of a requirement tally the same ports from the same state)."""
        key = (sid, text, flows)
        n = self.tally_memo.get(key)
        if n is None:
            ps = self.portset(sid)
            ps.add_runs(parse_runs(text) if text else [], flows)
            n = self.intern(ps)
            if len(self.tally_memo) >= TALLY_MEMO:
                self.tally_memo.clear()  # bounded: every failing pattern its own text
            self.tally_memo[key] = n
        return n

    def step(self, sid: int, port: int | None) -> int:
        key = (sid << 17) | (0 if port is None else port + 1)
        n = self.memo.get(key)
        if n is None:
            ps = self.portset(sid)
            ps.add(port)
            n = self.memo[key] = self.intern(ps)
        return n


class _Req:
    """One requirement's directions: two flat arrays over (src, dst) host indexes."""

    __slots__ = ("proto", "passed", "sig", "sparse")

    def __init__(self, proto: str, cells: int) -> None:
        self.proto = proto
        self.passed = array("I", bytes(4 * cells))  # passing flows per direction
        self.sig = array("I", bytes(4 * cells))  # its PortSet's state id; ABSENT; SPARSE
        self.sparse: dict[int, Direction] = {}  # directions with a non-passing flow


# the requirement key of IPv6 directions (a dual-stack requirement is joined per family)
V6_KEY = "\x00ipv6"


def _is_v6(rec: dict[str, Any]) -> bool:
    """Did this result or tally go over IPv6 (its ``af``; a record without one: its dst)?"""
    af = rec.get("af")
    if af is not None:
        return af == "ipv6"
    return ":" in str(rec.get("dst") or "")


class PairJoin:
    """Fold result, tally and witness records; produce the pair records at the end.

    ``hosts``: the mesh's host names (destinations that are not mesh hosts, such as VIPs, have
    no reverse direction and are not folded).

    Memory: per requirement two 4-byte arrays over hosts x hosts (8 MB at 1,000 hosts), the
    interned port sets, and a ``Direction`` only for a direction with a flow that did not
    pass: ~8 bytes per passing direction instead of a ~670-byte object each.
    """

    def __init__(self, hosts: Iterable[str]) -> None:
        self.hosts = frozenset(hosts)
        self.names = sorted(self.hosts)
        self.index = {n: i for i, n in enumerate(self.names)}
        self.n = len(self.names)
        self.reqs: dict[str, _Req] = {}
        self.states = _States()
        # (src addr, dst addr, proto, port) of tagged probes seen arriving by a witness
        self.seen: set[tuple[str, str, str, int | None]] = set()

    def _cell(self, rec: dict[str, Any]) -> tuple[_Req, int] | None:
        index = self.index
        s, d, req = index.get(rec.get("src_host")), index.get(rec.get("host")), rec.get("req")  # type: ignore[arg-type]
        if s is None or d is None or req is None:
            return None
        if _is_v6(rec):
            req += V6_KEY  # a dual-stack requirement: one table per family
        t = self.reqs.get(req)
        if t is None:
            t = self.reqs[req] = _Req(rec.get("proto") or "?", self.n * self.n)
        return t, s * self.n + d

    def _sparse(self, t: _Req, k: int, rec: dict[str, Any]) -> Direction:
        d = t.sparse.get(k)
        if d is None:
            d = Direction(t.proto, _shared_value(rec.get("src")), _shared_value(rec.get("dst")))
            sid = t.sig[k]
            if sid != ABSENT:
                d.passed = t.passed[k]
                d.ports = self.states.portset(sid)
            t.sparse[k] = d
            t.sig[k] = SPARSE
        return d

    def add(self, rec: dict[str, Any]) -> bool:
        """A result record (with src_host, host, req, verdict as the agents annotate them).
        False when it is not folded (a destination outside the mesh, no requirement)."""
        cell = self._cell(rec)
        if cell is None:
            return False
        t, k = cell
        sid = t.sig[k]
        if sid != SPARSE and rec.get("verdict") == "pass":
            t.passed[k] += 1
            t.sig[k] = self.states.step(sid or 1, rec.get("port"))
            return True
        d = self._sparse(t, k, rec)
        # a verdict_reason (a port the responder could not bind) says more than the probe's
        reason = rec.get("verdict_reason") or rec.get("reason", "?")
        d.add(rec.get("port"), rec.get("state", "?"), reason, rec.get("verdict"))
        return True

    def add_passing(self, s: int, rec: dict[str, Any]) -> bool:
        """The hot path of ``add`` for a passing flow from host index ``s``: False when the
        record needs the general path (unknown host or requirement, a direction with a failure).
        """
        req = rec.get("req")
        if req is not None and _is_v6(rec):
            req += V6_KEY
        t = self.reqs.get(req)  # type: ignore[arg-type]
        d = self.index.get(rec.get("host"))  # type: ignore[arg-type]
        if t is None or d is None:
            return False
        k = s * self.n + d
        sid = t.sig[k]
        if sid == SPARSE:
            return False
        t.passed[k] += 1
        port = rec.get("port")
        n = self.states.memo.get(((sid or 1) << 17) | (0 if port is None else port + 1))
        t.sig[k] = n if n is not None else self.states.step(sid or 1, port)
        return True

    def add_tally(self, rec: dict[str, Any]) -> bool:
        """A tally record (``--emit failures``): ``flows`` passing flows of one direction.
        False when it is not folded (no flows, a destination outside the mesh)."""
        flows = rec.get("flows", 0)
        if not flows:
            return False
        cell = self._cell(rec)
        if cell is None:
            return False
        t, k = cell
        text = rec.get("ports")
        sid = t.sig[k]
        if sid == SPARSE:
            d = t.sparse[k]
            d.passed += flows
            d.ports.add_runs(parse_runs(text) if text else [], flows)
            return True
        t.passed[k] += flows
        t.sig[k] = self.states.tally_step(sid or 1, text or None, flows)
        return True

    def passes(self) -> Iterator[tuple[str, bool, str, Iterator[tuple[int, int, int]]]]:
        """(req, ipv6, proto, cells) per requirement and family: cells yields (src index,
        dst index, passing flows) for every direction with a passing flow (indexes into
        ``names``). The mesh's summary counts its passes from here, not per result."""
        n = self.n
        for key, t in self.reqs.items():
            req, v6, _ = key.partition(V6_KEY)
            yield req, bool(v6), t.proto, self._pass_cells(t, n)

    @staticmethod
    def _pass_cells(t: _Req, n: int) -> Iterator[tuple[int, int, int]]:
        sig, passed, sparse = t.sig, t.passed, t.sparse
        # compress: only the directions that have a flow (sig != ABSENT), at C speed
        for k in compress(range(len(sig)), sig):
            c = sparse[k].passed if sig[k] == SPARSE else passed[k]
            if c:
                s, d = divmod(k, n)
                yield s, d, c

    def direction(self, req: str, src: str, dst: str, af: str = "ipv4") -> Direction | None:
        """The folded direction (a Direction built on the fly for an all-passing one)."""
        t = self.reqs.get(req + V6_KEY if af == "ipv6" else req)
        s, d = self.index.get(src), self.index.get(dst)
        if t is None or s is None or d is None:
            return None
        return self._dir(t, s * self.n + d)

    def _dir(self, t: _Req, k: int) -> Direction | None:
        sid = t.sig[k]
        if sid == ABSENT:
            return None
        if sid == SPARSE:
            return t.sparse[k]
        d = Direction(t.proto)
        d.passed = t.passed[k]
        d.ports = self.states.portset(sid)
        return d

    def witness(self, rec: dict[str, Any]) -> None:
        """A witness record ({"type":"witness","proto","src","dst","port",...})."""
        with contextlib.suppress(KeyError, TypeError, AttributeError):
            self.seen.add((rec["src"], rec["dst"], rec["proto"], rec.get("port")))

    def _witnessed(self, d: Direction) -> bool:
        """Did every silent failure of this direction reach the destination (witness)?"""
        if not d.failed or d.src is None or d.dst is None:
            return False
        for (state, reason), ps in d.failures.items():
            if state not in SILENT or reason != "no-response":
                return False  # an answer came back (a reject): nothing was lost
            if ps.none and (d.src, d.dst, d.proto, None) not in self.seen:
                return False
            if ps.count:
                if ps.exact is None:
                    return False
                if any((d.src, d.dst, d.proto, p) not in self.seen for p in ps.exact):
                    return False
        return True

    def pairs(self, scan_id: str | None = None) -> Iterator[dict[str, Any]]:
        """One record per (req, a, b) with both directions planned; a < b by name.

        With ``scan_id`` the records carry it (second field, as the coordinator writes them).
        Two all-passing directions take a fast path with the ports text memoised per pair of
        port sets: a 1,000-host mesh has millions of such pairs.
        """
        names = self.names
        head = {"type": "pair"} if scan_id is None else {"type": "pair", "scan_id": scan_id}
        for key in sorted(self.reqs):
            t = self.reqs[key]
            req, v6, _ = key.partition(V6_KEY)
            af = "ipv6" if v6 else "ipv4"
            sig, passed = t.sig, t.passed
            proto = t.proto
            port_fields: dict[tuple[int, int], dict[str, Any]] = {}
            for a, b, kab, kba, sab, sba in self._cells(sig):
                if sab == SPARSE or sba == SPARSE:
                    rec = self._sparse_pair(t, req, a, b, kab, kba, af)
                    if scan_id is not None:
                        rec = {**head, **{k: v for k, v in rec.items() if k != "type"}}
                    yield rec
                    continue
                pf = port_fields.get((sab, sba))
                if pf is None:
                    pf = port_fields[(sab, sba)] = self._port_field(
                        self.states.portset(sab), self.states.portset(sba)
                    )
                yield {
                    **head,
                    "a": names[a],
                    "b": names[b],
                    "req": req,
                    "proto": proto,
                    "af": af,
                    **pf,
                    "a_to_b": "pass",
                    "b_to_a": "pass",
                    "verdict": "pass",
                    "detail": {
                        "a_to_b": {"pass": passed[kab], "fail": 0, "unknown": 0},
                        "b_to_a": {"pass": passed[kba], "fail": 0, "unknown": 0},
                    },
                }

    def pair_blocks(self, scan_id: str) -> Iterator[tuple[dict[str, int], bytes]]:
        """``pairs(scan_id)`` encoded, a row at a time: (pairs per verdict, their lines joined),
        the same bytes in the same order; the lines of two all-passing directions formatted
        from a template per requirement and pair of port sets (a 1,000-host mesh writes
        millions of them). A row's two sides are read as array slices (the
        row of a, the column of a) instead of an index computation per pair."""
        names, n = self.names, self.n
        q = [orjson.dumps(x) for x in names]
        head = {"type": "pair", "scan_id": scan_id}
        start = b'{"type":"pair","scan_id":' + orjson.dumps(scan_id) + b',"a":'
        for key in sorted(self.reqs):
            t = self.reqs[key]
            req, v6, _ = key.partition(V6_KEY)
            af = "ipv6" if v6 else "ipv4"
            mid = (
                b',"req":' + orjson.dumps(req) + b',"proto":' + orjson.dumps(t.proto)
                + b',"af":' + orjson.dumps(af) + b","
            )  # fmt: skip
            sig, passed = t.sig, t.passed
            templates: dict[int, bytes] = {}
            for a in range(n - 1):
                lo, hi = a * n + a + 1, a * n + n
                ab = sig[lo:hi]  # a -> b for b = a+1 .. n-1
                if ab.count(ABSENT) == len(ab):
                    continue
                ba = sig[(a + 1) * n + a :: n]  # b -> a, the same b
                pab, pba = passed[lo:hi], passed[(a + 1) * n + a :: n]
                start_a = start + q[a]
                out: list[bytes] = []
                counts: dict[str, int] = {}
                npass = 0
                for i, sab in enumerate(ab):
                    if sab == ABSENT:
                        continue
                    sba = ba[i]
                    if sba == ABSENT:
                        continue
                    b = a + 1 + i
                    if sab == SPARSE or sba == SPARSE:
                        rec = self._sparse_pair(t, req, a, b, lo + i, b * n + a, af)
                        rec = {**head, **{k: v for k, v in rec.items() if k != "type"}}
                        v = rec["verdict"]
                        counts[v] = counts.get(v, 0) + 1
                        out.append(orjson.dumps(rec, option=orjson.OPT_APPEND_NEWLINE))
                        continue
                    tk = (sab << 32) | sba
                    tpl = templates.get(tk)
                    if tpl is None:
                        pf = self._port_field(self.states.portset(sab), self.states.portset(sba))
                        tpl = templates[tk] = (
                            b',"b":%b' + (mid + orjson.dumps(pf)[1:-1]).replace(b"%", b"%%")
                            + b',"a_to_b":"pass","b_to_a":"pass","verdict":"pass","detail":'
                            b'{"a_to_b":{"pass":%d,"fail":0,"unknown":0},'
                            b'"b_to_a":{"pass":%d,"fail":0,"unknown":0}}}\n'
                        )  # fmt: skip
                    out.append(start_a + tpl % (q[b], pab[i], pba[i]))
                    npass += 1
                if npass:
                    counts["pass"] = counts.get("pass", 0) + npass
                if out:
                    yield counts, b"".join(out)

    def _cells(self, sig: Any) -> Iterator[tuple[int, int, int, int, int, int]]:
        """(a, b, index a->b, index b->a, sig a->b, sig b->a) of every pair a < b whose two
        directions were both planned."""
        n = self.n
        for a in range(n):
            row = a * n
            for b in range(a + 1, n):
                sab = sig[row + b]
                if sab == ABSENT:
                    continue
                kba = b * n + a
                sba = sig[kba]
                if sba != ABSENT:
                    yield a, b, row + b, kba, sab, sba

    def _sparse_pair(
        self, t: Any, req: str, a: int, b: int, kab: int, kba: int, af: str
    ) -> dict[str, Any]:
        ab, ba = self._dir(t, kab), self._dir(t, kba)
        return self.pair(req, self.names[a], self.names[b], ab, ba, af)  # type: ignore[arg-type]

    @staticmethod
    def _port_field(pa: PortSet, pb: PortSet) -> dict[str, Any]:
        if pa.exact is not None and pb.exact is not None:
            ports = PortSet()
            for p in sorted(pa.exact | pb.exact):
                ports.add(p)
        else:  # a collapsed sweep: the larger side describes it
            ports = pa if pa.count >= pb.count else pb
        single = ports.single()
        if ports.count == 0 or single is not None:
            return {"port": single}
        return {"ports": ports.text()}

    def pair(
        self, req: str, a: str, b: str, ab: Direction, ba: Direction, af: str = "ipv4"
    ) -> dict[str, Any]:
        va, vb = ab.verdict(), ba.verdict()
        rec: dict[str, Any] = {"type": "pair", "a": a, "b": b, "req": req, "proto": ab.proto}
        rec["af"] = af
        over = IPV6_SUFFIX if af == "ipv6" else ""
        rec.update(self._port_field(ab.ports, ba.ports))
        rec["a_to_b"] = va
        rec["b_to_a"] = vb
        rec["verdict"] = pair_verdict(va, vb)
        reasons = [
            r
            for r in (
                ab.why(a, b, self._witnessed(ab), over),
                ba.why(b, a, self._witnessed(ba), over),
            )
            if r
        ]
        if reasons:
            rec["reason"] = "; ".join(reasons)
        rec["detail"] = {"a_to_b": ab.counts(), "b_to_a": ba.counts()}
        return rec
