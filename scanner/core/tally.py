"""``--emit failures``: passing flows counted, not written (pure).

With ``--emit failures`` a run writes a result line only for a flow that did not pass; every
passing flow is counted in one ``tally`` record per (source, destination, requirement)::

    {"type":"tally","src_host":"node1","src":"198.18.7.1","host":"node2","dst":"198.18.7.2",
     "req":"kubelet","proto":"tcp","af":"ipv4","flows":18,"states":{"open":18},"ports":"10250"}

One record per address family too: a dual-stack requirement's IPv4 and IPv6 flows between the
same two hosts are two records, each with its ``af`` (as every result record has).

``flows`` is how many passing flows the record stands for, ``states`` splits them by state,
``ports`` lists their ports (absent for ICMP / IP-in-IP). The summary says ``results``
(lines written) and ``tallied``; results + tallied == planned. Memory: one record per
(destination, requirement) with its ports as runs, never a set of flows.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator
from typing import Any

EMITS = ("all", "failures")


class Runs:
    """Distinct ports as sorted runs [lo, hi]: a sweep of 2,768 ports is one run."""

    __slots__ = ("starts", "ends")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def add(self, p: int) -> None:
        st, en = self.starts, self.ends
        if en and en[-1] + 1 == p:  # the common case: ports in plan order
            en[-1] = p
            return
        i = bisect_right(st, p) - 1
        if i >= 0 and p <= en[i]:
            return
        if i >= 0 and en[i] + 1 == p:
            en[i] = p
            if i + 1 < len(st) and st[i + 1] == p + 1:
                en[i] = en[i + 1]
                del st[i + 1], en[i + 1]
            return
        if i + 1 < len(st) and st[i + 1] == p + 1:
            st[i + 1] = p
            return
        st.insert(i + 1, p)
        en.insert(i + 1, p)

    def text(self) -> str:
        return ",".join(
            str(a) if a == b else f"{a}-{b}" for a, b in zip(self.starts, self.ends, strict=True)
        )


class Group:
    __slots__ = ("src", "dst", "proto", "af", "flows", "states", "ports")

    def __init__(self, src: str | None, dst: str | None, proto: str, af: str) -> None:
        self.src, self.dst, self.proto, self.af = src, dst, proto, af
        self.flows = 0
        self.states: dict[str, int] = {}
        self.ports: Runs | None = None


class Tallies:
    """Passing flows folded per (source, destination, requirement, address family)."""

    def __init__(self) -> None:
        self.groups: dict[tuple[str, str, str, str], Group] = {}
        self.flows = 0

    def add(
        self,
        src_host: str | None,
        src: str | None,
        host: str | None,
        dst: str,
        req: str | None,
        proto: str,
        port: int | None,
        state: str,
        af: str | None = None,
    ) -> None:
        af = af or af_of(dst)
        key = (src_host or src or "-", host or dst, req or "-", af)
        g = self.groups.get(key)
        if g is None:
            g = self.groups[key] = Group(src, dst, proto, af)
        g.flows += 1
        g.states[state] = g.states.get(state, 0) + 1
        if port is not None:
            if g.ports is None:
                g.ports = Runs()
            g.ports.add(port)
        self.flows += 1

    def merge(self, rec: dict[str, Any]) -> None:
        """Fold a tally record (another shard's) into these."""
        af = rec.get("af") or af_of(rec.get("dst"))
        key = (rec["src_host"], rec["host"], rec["req"], af)
        g = self.groups.get(key)
        if g is None:
            g = self.groups[key] = Group(rec.get("src"), rec.get("dst"), rec["proto"], af)
        g.flows += rec["flows"]
        for s, n in rec["states"].items():
            g.states[s] = g.states.get(s, 0) + n
        if rec.get("ports"):
            if g.ports is None:
                g.ports = Runs()
            for lo, hi in parse_runs(rec["ports"]):
                for p in range(lo, hi + 1):
                    g.ports.add(p)
        self.flows += rec["flows"]

    def records(self, scan_id: str) -> Iterator[dict[str, Any]]:
        for (src_host, host, req, _af), g in sorted(self.groups.items()):
            rec: dict[str, Any] = {
                "type": "tally",
                "scan_id": scan_id,
                "src_host": src_host,
                "src": g.src,
                "host": host,
                "dst": g.dst,
                "req": req,
                "proto": g.proto,
                "af": g.af,
                "flows": g.flows,
                "states": g.states,
            }
            if g.ports is not None:
                rec["ports"] = g.ports.text()
            yield rec


def af_of(dst: str | None) -> str:
    """The family of a tally written without ``af`` (older agents and files): from dst."""
    return "ipv6" if ":" in (dst or "") else "ipv4"


def parse_runs(text: str) -> list[tuple[int, int]]:
    """ "22,2379-2381" -> [(22, 22), (2379, 2381)] (the tally's own output; no validation)."""
    out = []
    for tok in text.split(","):
        if tok:
            a, _, b = tok.partition("-")
            out.append((int(a), int(b or a)))
    return out
