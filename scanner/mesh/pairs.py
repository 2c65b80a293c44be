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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from scanner.core.ports import ports_text as ranges  # one implementation, re-exported

EXACT_PORTS = 32  # a PortSet keeps the ports themselves up to this many, then count + range
SILENT = frozenset({"filtered", "open|filtered"})


def pair_verdict(a_to_b: str, b_to_a: str) -> str:
    """Two direction verdicts -> pass | fail | one-way | unknown."""
    if a_to_b == "unknown" or b_to_a == "unknown":
        return "unknown"
    if a_to_b == b_to_a:
        return a_to_b  # pass or fail
    return "one-way"


class PortSet:
    """Ports of one direction: exact up to EXACT_PORTS, then a count and the lowest/highest."""

    __slots__ = ("exact", "count", "lo", "hi", "none")

    def __init__(self) -> None:
        self.exact: set[int] | None = set()
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
        if self.exact is not None:
            self.exact.add(port)
            if len(self.exact) > EXACT_PORTS:
                self.exact = None

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


@dataclass
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
                ps = self.failures[(state, reason)] = PortSet()
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


class PairJoin:
    """Fold result and witness records; produce the pair records at the end.

    ``hosts``: the mesh's host names (destinations that are not mesh hosts, such as VIPs, have
    no reverse direction and are not folded).
    """

    def __init__(self, hosts: Iterable[str]) -> None:
        self.hosts = frozenset(hosts)
        # (req, src, dst, address family): a dual-stack requirement is two pairs, one per family
        self.dirs: dict[tuple[str, str, str, str], Direction] = {}
        # (src addr, dst addr, proto, port) of tagged probes seen arriving by a witness
        self.seen: set[tuple[str, str, str, int | None]] = set()

    def add(self, rec: dict[str, Any]) -> None:
        """A result record (with src_host, host, req, verdict as the agents annotate them)."""
        src, dst, req = rec.get("src_host"), rec.get("host"), rec.get("req")
        if src not in self.hosts or dst not in self.hosts or req is None:
            return
        af = rec.get("af") or ("ipv6" if ":" in str(rec.get("dst") or "") else "ipv4")
        key = (req, src, dst, af)
        d = self.dirs.get(key)
        if d is None:
            d = self.dirs[key] = Direction(rec.get("proto") or "?", rec.get("src"), rec.get("dst"))
        # a verdict_reason (a port the responder could not bind) says more than the probe's
        reason = rec.get("verdict_reason") or rec.get("reason", "?")
        d.add(rec.get("port"), rec.get("state", "?"), reason, rec.get("verdict"))

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

    def pairs(self) -> Iterator[dict[str, Any]]:
        """One record per (req, a, b) with both directions planned; a < b by name."""
        for (req, src, dst, af), ab in sorted(self.dirs.items()):
            if src >= dst:
                continue
            ba = self.dirs.get((req, dst, src, af))
            if ba is None:
                continue
            yield self.pair(req, src, dst, ab, ba, af)

    def pair(
        self, req: str, a: str, b: str, ab: Direction, ba: Direction, af: str = "ipv4"
    ) -> dict[str, Any]:
        va, vb = ab.verdict(), ba.verdict()
        rec: dict[str, Any] = {"type": "pair", "a": a, "b": b, "req": req, "proto": ab.proto}
        rec["af"] = af
        if ab.ports.exact is not None and ba.ports.exact is not None:
            ports = PortSet()
            for p in sorted(ab.ports.exact | ba.ports.exact):
                ports.add(p)
        else:  # a collapsed sweep: the larger side describes it
            ports = ab.ports if ab.ports.count >= ba.ports.count else ba.ports
        single = ports.single()
        if ports.count == 0 or single is not None:
            rec["port"] = single
        else:
            rec["ports"] = ports.text()
        rec["a_to_b"] = va
        rec["b_to_a"] = vb
        rec["verdict"] = pair_verdict(va, vb)
        over = " over IPv6" if af == "ipv6" else ""
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
