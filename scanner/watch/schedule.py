"""Who probes whom, on which ports, in which round (pure; the same answer on every node).

Every agent reads the same inventory, so every agent can compute the same schedule: the ends
of the plan (hosts, VIPs, endpoints) sorted by name are positions 0..N-1, and a permutation
``perm`` of the offsets 1..N-1 is drawn from a seed made of those names. In round ``r`` the
agent at position ``i`` visits, for slot ``j`` in 0..K-1,

    q = r*K + j;  peer = (i + perm[q mod (N-1)]) mod N;  visit = q div (N-1)

so every ordered pair is visited once in every ``ceil((N-1)/K)`` rounds (one *sweep*), and the
K peers of a round are hash-chosen, not neighbours in name order. The map inverts in O(K): a
receiver at position ``b`` knows exactly which sources visit it in round ``r``
(``(b - perm[q mod (N-1)]) mod N``), which is what lets it name a one-way drop: the sender's
probe never arrived.

On a visit the source probes every required port of every requirement it has towards that
peer; a requirement with more than ``chunk`` ports (the NodePort range) gets ``chunk`` of them,
the ``visit``-th window of the range, so the whole range is covered in ``ceil(L/chunk)``
sweeps. The probes of a round are paced by the agent (the rate budget), not here.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from scanner.core.flows import Flow


@dataclass(frozen=True)
class Need:
    """One requirement from one end to another: the ports (None for icmp/ipip)."""

    req: str
    proto: str
    ports: tuple[int | None, ...]


@dataclass(frozen=True)
class Topology:
    """The plan folded by pair: positions, addresses and, per (source, destination), the needs.

    Built once from the planner's legs (``from_legs``); memory O(legs + ends), not O(flows).
    """

    names: tuple[str, ...]  # position -> end name (sorted)
    addrs: tuple[str, ...]  # position -> address
    legs: tuple[tuple[frozenset[str], frozenset[str], Need], ...]  # (srcs, dsts, need)
    perm: tuple[int, ...]  # the offsets 1..N-1, shuffled by the seed
    # (requirement id, address family) of legs at an address that is not their ends' main one
    unwatched: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_legs(cls, legs: Iterable[object]) -> Topology:
        """Every end is probed at one address (the first its legs give, the cluster's main
        family): a leg that names an end at another address (Calico's VXLAN or WireGuard over
        IPv6 in a dual-stack cluster) is not folded but listed in ``unwatched``, so that the
        agent says so instead of probing it at the main address as if it were checked."""
        ends: dict[str, str] = {}
        counted = []
        for leg in legs:
            if not leg.count():  # type: ignore[attr-defined]
                continue
            counted.append(leg)
            for n, a in (*leg.srcs, *leg.dsts):  # type: ignore[attr-defined]
                if a:
                    ends.setdefault(n, a)
        folded = []
        unwatched: dict[str, str] = {}
        for leg in counted:
            req = leg.req  # type: ignore[attr-defined]
            if any(a and ends[n] != a for n, a in (*leg.srcs, *leg.dsts)):  # type: ignore[attr-defined]
                unwatched.setdefault(req.id, getattr(leg, "af", "?"))
                continue
            srcs = frozenset(n for n, a in leg.srcs if a)  # type: ignore[attr-defined]
            dsts = frozenset(n for n, a in leg.dsts if a)  # type: ignore[attr-defined]
            folded.append((srcs, dsts, Need(req.id, req.proto, tuple(leg.ports))))  # type: ignore[attr-defined]
        names = tuple(sorted(ends))
        return cls(
            names,
            tuple(ends[n] for n in names),
            tuple(folded),
            _perm(names),
            tuple(sorted(unwatched.items())),
        )

    @property
    def n(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(name) from None

    def needs(self, src: str, dst: str) -> list[Need]:
        """What ``src`` must reach on ``dst`` (empty for a pair the plan does not link)."""
        if src == dst:
            return []
        return [need for srcs, dsts, need in self.legs if src in srcs and dst in dsts]

    def peers_of(self, name: str) -> list[str]:
        """Every end ``name`` has a requirement towards."""
        return [d for d in self.names if self.needs(name, d)]

    def sources_of(self, name: str) -> list[str]:
        """Every end with a requirement towards ``name``."""
        return [s for s in self.names if self.needs(s, name)]


def _perm(names: Sequence[str]) -> tuple[int, ...]:
    seed = hashlib.sha256("\0".join(names).encode()).digest()
    offsets = list(range(1, len(names)))
    random.Random(seed).shuffle(offsets)
    return tuple(offsets)


def slots(n: int, k: int) -> int:
    """Peers visited per round: K, or every other end when there are fewer."""
    return max(0, min(k, n - 1))


def rounds_per_sweep(n: int, k: int) -> int:
    """Rounds until every ordered pair has been visited once."""
    s = slots(n, k)
    return math.ceil((n - 1) / s) if s else 1


def visits(topo: Topology, src: int, rnd: int, k: int) -> Iterator[tuple[int, int]]:
    """(peer position, visit number) of the source at position ``src`` in round ``rnd``."""
    n, s = topo.n, slots(topo.n, k)
    for j in range(s):
        q = rnd * s + j
        yield (src + topo.perm[q % (n - 1)]) % n, q // (n - 1)


def visitors(topo: Topology, dst: int, rnd: int, k: int) -> Iterator[tuple[int, int]]:
    """(source position, visit number) of every end that visits ``dst`` in round ``rnd``:
    the inverse of ``visits``."""
    n, s = topo.n, slots(topo.n, k)
    for j in range(s):
        q = rnd * s + j
        yield (dst - topo.perm[q % (n - 1)]) % n, q // (n - 1)


def fingerprint(topo: Topology, period: float, k: int, chunk: int) -> str:
    """A short hash of everything the schedule is computed from (the plan's ends, addresses and
    needs, the round length, --neighbours, --chunk; never the secret): agents that show the
    same fingerprint visit each other when the other expects it. Agents with different ones
    (another --rate, --round, --chunk or inventory; a rolling update of the DaemonSet) would
    judge each other's probes by the wrong schedule, so the metric carries it and an alert
    fires while more than one is seen."""
    h = hashlib.sha256()
    h.update(repr((1, float(period), k, chunk, topo.names, topo.addrs, topo.perm)).encode())
    for srcs, dsts, need in sorted(
        (tuple(sorted(a)), tuple(sorted(b)), (n.req, n.proto, tuple(map(str, n.ports))))
        for a, b, n in topo.legs
    ):
        h.update(repr((srcs, dsts, need)).encode())
    return h.hexdigest()[:12]


def window(ports: tuple[int | None, ...], visit: int, chunk: int) -> tuple[int | None, ...]:
    """The ports probed on a visit: all of them, or the visit-th ``chunk`` of a long range."""
    if len(ports) <= chunk:
        return ports
    start = (visit * chunk) % len(ports)
    return tuple(ports[(start + t) % len(ports)] for t in range(chunk))


def max_probes_per_round(topo: Topology, k: int, chunk: int) -> int:
    """An upper bound, over every end, of the probes one round asks of it: as if every peer it
    visits were a destination of every requirement it is a source of. The same number on every
    agent, so every agent can size the same round length from it (O(ends x legs))."""
    s = slots(topo.n, k)
    per_src: dict[str, int] = {}
    for srcs, _dsts, need in topo.legs:
        cost = min(len(need.ports), chunk)
        for name in srcs:
            per_src[name] = per_src.get(name, 0) + cost
    return s * max(per_src.values(), default=0)


# Every probe of a round leaves in the round's first LAST_PROBE: rounds are sized for 1.5x their
# probes (2/3 of the round) plus a tenth of jitter, and an agent too late for it skips the round
LAST_PROBE = 0.8


def fits(rnd: int, period: float, now: float, probes: int, rate: float) -> bool:
    """Can round ``rnd``'s ``probes`` all leave at ``rate`` within its first ``LAST_PROBE``?
    An agent that starts (or wakes) too late for that skips the round: a visit cut short looks
    like a miss to its receivers, and two in a row like a drop."""
    return now + probes / rate <= (rnd + LAST_PROBE) * period


def round_flows(topo: Topology, me: str, rnd: int, k: int, chunk: int) -> list[Flow]:
    """The flows ``me`` probes in round ``rnd``."""
    i = topo.index(me)
    src_addr = topo.addrs[i]
    out: list[Flow] = []
    for p, v in visits(topo, i, rnd, k):
        dst, addr = topo.names[p], topo.addrs[p]
        for need in topo.needs(me, dst):
            for port in window(need.ports, v, chunk):
                out.append(Flow(addr, port, need.proto, dst, src_addr, me, need.req))
    return out


def expected_incoming(
    topo: Topology, me: str, rnd: int, k: int, chunk: int
) -> Iterator[tuple[str, Need, tuple[int | None, ...]]]:
    """(source name, need, ports) of every probe ``me`` should receive in round ``rnd``."""
    b = topo.index(me)
    for a, v in visitors(topo, b, rnd, k):
        src = topo.names[a]
        for need in topo.needs(src, me):
            yield src, need, window(need.ports, v, chunk)
