"""Group failing directions so one fault reads as one finding (pure).

A firewall fault has a shape: a host that drops a port from everyone (ingress), a host that
cannot send it anywhere (egress), one direction of one pair (one-way), both directions of one
pair. Given the failing cells of one requirement, ``group_cells`` covers them greedily with the
largest such shapes first: a destination or a source shared by at least two failing cells
becomes one finding; what is left is reported per pair, with the reverse direction's state.
At 300 hosts a single bad host is one line, not 299.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field

from scanner.report.aggregate import (
    LOCAL_PROHIBITED,
    STRIDE,
    Cell,
    PortSet,
    Requirement,
    Run,
    natural_key,
)

# Finding kinds
INGRESS = "ingress"  # one destination, several sources
EGRESS = "egress"  # one source, several destinations
ONE_WAY = "one-way"  # a -> b fails, b -> a passes
BOTH = "both"  # a -> b and b -> a fail
SINGLE = "single"  # a -> b fails, b -> a not required (or unknown)


@dataclass
class Finding:
    kind: str
    host: int  # ingress: the destination; egress: the source; pairs: the source (a)
    peers: list[int]  # ingress: sources; egress: destinations; pairs: [b]
    every: bool  # ingress/egress: the peers are every host required on the other side
    required: int  # how many peers the requirement asks for on the other side
    cells: list[int] = field(default_factory=list)  # the cell keys covered
    reverse: str | None = None  # pairs: state of b -> a

    def ports(self, req: Requirement) -> tuple[PortSet, PortSet]:
        """(blocked ports, closed ports) over the finding's cells (to read, not to change:
        a finding of one cell gives that cell's own)."""
        if len(self.cells) == 1:  # most findings of scattered failures: no copy
            c = req.cells[self.cells[0]]
            if isinstance(c, Cell):
                return c.fail_ports, c.closed_ports
        blocked, closed = PortSet(), PortSet()
        for k in self.cells:
            c = req.cells[k]
            if isinstance(c, Cell):
                blocked.update(c.fail_ports)
                closed.update(c.closed_ports)
        return blocked, closed

    def reasons(self, req: Requirement) -> dict[str, int]:
        out: dict[str, int] = {}
        for k in self.cells:
            c = req.cells[k]
            if isinstance(c, Cell):
                for r, n in c.reasons.items():
                    out[r] = out.get(r, 0) + n
        return out


def failing_keys(req: Requirement, state: str = "fail") -> list[int]:
    return sorted(k for k, c in req.marked() if c.state == state)


def group_cells(run: Run, req: Requirement, keys: list[int], min_group: int = 2) -> list[Finding]:
    """Cover ``keys`` (cells of ``req``) with findings, largest groups first."""
    names = run.names
    by_dst: dict[int, set[int]] = {}
    by_src: dict[int, set[int]] = {}
    for k in keys:
        s, d = divmod(k, STRIDE)
        by_dst.setdefault(d, set()).add(s)
        by_src.setdefault(s, set()).add(d)
    # how many peers each host has on the other side of this requirement (all cells)
    n_srcs, n_dsts = req.peer_counts()

    out: list[Finding] = []
    # ties go to the first host in natural order (node2 before node10), not to whichever host
    # the input happened to name first: the mesh's summary and the report group alike. Each
    # side's groups sit in a heap keyed (-size, natural rank, first seen); a group only
    # shrinks, so an entry whose size is out of date is pushed back with its size when it
    # comes up (a scan of every group per finding made 1,000 hosts at 1% failing take minutes)
    nk = {h: natural_key(names[h]) for h in {*by_dst, *by_src}}
    dense = {k: i for i, k in enumerate(sorted(set(nk.values())))}
    rank = {h: dense[k] for h, k in nk.items()}

    def heap_of(groups: dict[int, set[int]]) -> list[tuple[int, int, int, int]]:
        h = [(-len(v), rank[g], i, g) for i, (g, v) in enumerate(groups.items())]
        heapq.heapify(h)
        return h

    def top(heap: list[tuple[int, int, int, int]], groups: dict[int, set[int]]) -> int:
        """The size of the best group (its entry at heap[0]), 0 when none is left."""
        while heap:
            size, r, i, g = heap[0]
            have = groups.get(g)
            if have is not None and len(have) == -size:
                return -size
            if have:
                heapq.heapreplace(heap, (-len(have), r, i, g))
            else:
                heapq.heappop(heap)
        return 0

    heap_dst, heap_src = heap_of(by_dst), heap_of(by_src)
    while True:
        nd = top(heap_dst, by_dst)
        ns = top(heap_src, by_src)
        if max(nd, ns) < min_group:
            break
        if nd >= ns:  # ties go to ingress: a host's own input chain is the usual culprit
            d = heap_dst[0][3]
            srcs = sorted(by_dst[d], key=lambda i: natural_key(names[i]))
            cells = [s * STRIDE + d for s in srcs]
            out.append(Finding(INGRESS, d, srcs, len(srcs) == n_srcs[d], n_srcs[d], cells))
        else:
            s = heap_src[0][3]
            dsts = sorted(by_src[s], key=lambda i: natural_key(names[i]))
            cells = [s * STRIDE + d for d in dsts]
            out.append(Finding(EGRESS, s, dsts, len(dsts) == n_dsts[s], n_dsts[s], cells))
        for k in cells:
            s, d = divmod(k, STRIDE)
            by_dst[d].discard(s)
            by_src[s].discard(d)
            if not by_dst[d]:
                del by_dst[d]
            if not by_src[s]:
                del by_src[s]

    hkey: dict[int, tuple] = {}  # host -> its natural key, once per host (not per cell)

    def host_key(h: int) -> tuple:
        v = hkey.get(h)
        if v is None:
            v = hkey[h] = natural_key(names[h])
        return v

    left = sorted(
        (s * STRIDE + d for s, ds in by_src.items() for d in ds),
        key=lambda k: (host_key(k // STRIDE), host_key(k % STRIDE)),
    )
    done: set[int] = set()
    in_left = set(left)  # membership per cell: a list scan here made 10,000 cells O(n^2)
    for k in left:
        if k in done:
            continue
        s, d = divmod(k, STRIDE)
        rk = d * STRIDE + s
        rstate = req.cell_state(rk)
        if rstate == "pass":
            kind = ONE_WAY
        elif rstate == "fail" and rk in in_left and rk not in done:
            kind = BOTH
        else:
            kind = SINGLE
        cells = [k, rk] if kind == BOTH else [k]
        done.update(cells)
        out.append(Finding(kind, s, [d], False, 1, cells, rstate))
    return out


def iter_findings(run: Run) -> Iterator[tuple[Requirement, list[Finding], list[Finding]]]:
    """(requirement, fail findings, unknown findings) for every requirement that did not pass."""
    for key in sorted(run.reqs, key=natural_req_key):
        req = run.reqs[key]
        if not (req.nfail or req.nunknown):
            continue
        # a send the source's own output rules refused is grouped apart from the rest: a
        # group of the two would blame the destination (or its firewall) for both
        local, other = [], []
        for k in failing_keys(req, "fail"):
            (local if _refused_locally(req.cells[k]) else other).append(k)
        fails = group_cells(run, req, other) + group_cells(run, req, local)
        unknowns = group_cells(run, req, failing_keys(req, "unknown"))
        yield req, fails, unknowns


def _refused_locally(c: object) -> bool:
    reasons = c.reasons if isinstance(c, Cell) else None
    return bool(reasons) and all(r.endswith(LOCAL_PROHIBITED) for r in reasons)  # type: ignore[union-attr]


def natural_req_key(key: str) -> tuple:
    return natural_key(key)
