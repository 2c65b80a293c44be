"""The prober's own neighbour table (ARP / NDP): never a false ``fail`` because it was full.

Every on-link destination needs an entry in the source host's neighbour table. The kernel
holds at most ``gc_thresh3`` entries (net.ipv4.neigh.default.gc_thresh3, 1,024 by default)
and cannot evict one updated in the last 5 seconds, so a host probing ~1,000 peers at once
overflows it. Measured on kernel 6.18 (this lab): the packet is then dropped *silently* - a
non-blocking connect() says EINPROGRESS, sendto() succeeds, and only the table's
``table_fulls`` counter and a "neighbor table overflow!" line in dmesg tell - so a probe sees
silence and would report ``filtered (no-response)``. Older kernels return ENOBUFS or
EHOSTUNREACH from the send instead.

What the engine does about it (``NeighGuard``):

- keep the number of distinct on-link destinations that are in flight, or were in the last
  ``LINGER`` seconds (not yet evictable), under a budget taken from ``gc_thresh3``;
- after an attempt that came back silent, unreachable or out of buffers, read the table's
  ``table_fulls`` counter: when it rose during the attempt, the attempt does not count (it
  may never have left the host): the budget shrinks and the flow is retried after a pause;
- a flow still hit after ``RETRIES`` such retries is ``error`` / ``neighbour-table-full``
  (verdict unknown), and the run says once on stderr which sysctl to raise.

A second kernel effect, on a fresh table: the first packets to a new neighbour wait while it is
resolved (INCOMPLETE; packets beyond ``unres_qlen_bytes`` are discarded), and a lost ARP/NDP
request is sent again only after ``retrans_time`` (1 s by default). A short ``--timeout`` then
expires before the probe left the host, and the silence would be a false ``filtered``. So a
silent attempt that started before its destination's entry was seen resolved does not count
(``settle``): the guard waits until the kernel has resolved the entry (or given up: FAILED,
then the silence is the truth) and the flow is tried again, once.

The thresholds and counters are the kernel's neighbour-table settings: ``/proc/sys`` and
``/proc/net/stat`` in the initial network namespace; inside any other namespace (a lab host,
a container) those files do not exist, and the same numbers come from rtnetlink
(RTM_GETNEIGHTBL, what ``ip ntable show`` prints). The table and its limits are global to the
kernel: every namespace's entries count against the one ``gc_thresh3``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

LINGER = 5.0  # the kernel keeps an entry updated in the last 5 s (neigh_forced_gc's tref)
MIN_BUDGET = 8
RETRIES = 6  # neighbour-table retries of one flow; the pauses below add up to > LINGER
PAUSES = (0.25, 0.5, 1.0, 2.0, 2.0, 2.0)
FRESH = 0.005  # a counter read younger than this is reused
# how long an ARP/NDP resolution can run before the kernel gives up (3 solicitations 1 s
# apart, the default mcast_solicit x retrans_time), with a margin
RESOLVE_WINDOW = 5.0
# outcomes that a full table can produce (silence on 5.x/6.x, errors on older kernels)
SUSPECT_REASONS = frozenset({"no-response", "host-unreach", "enobufs", "no-buffers"})
REASON = "neighbour-table-full"
TABLES = {4: "arp_cache", 6: "ndisc_cache"}
SYSCTL = {4: "net.ipv4.neigh.default.gc_thresh3", 6: "net.ipv6.neigh.default.gc_thresh3"}


@dataclass(frozen=True, slots=True)
class Table:
    """One neighbour table's limits and counters (global to the kernel)."""

    family: int  # 4 or 6
    thresh1: int
    thresh2: int
    thresh3: int
    entries: int
    table_fulls: int


# ---- reading the kernel's numbers -----------------------------------------------------------

_RTM_NEWNEIGHTBL, _RTM_GETNEIGHTBL = 64, 66
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NDTA_THRESH1, _NDTA_THRESH2, _NDTA_THRESH3, _NDTA_CONFIG, _NDTA_STATS = 2, 3, 4, 5, 7
_FAMILY = {socket.AF_INET: 4, socket.AF_INET6: 6}


def _messages(data: bytes, mtype: int) -> tuple[list[tuple[int, int]], bool]:
    """The (offset, end) of every netlink message of type ``mtype`` in ``data``, and whether
    NLMSG_DONE (or an error) ended the dump (pure)."""
    out: list[tuple[int, int]] = []
    off = 0
    while off + 16 <= len(data):
        mlen, t = struct.unpack_from("=IH", data, off)
        if mlen < 16:
            break
        if t in (_NLMSG_DONE, _NLMSG_ERROR):
            return out, True
        if t == mtype:
            out.append((off, off + mlen))
        off += (mlen + 3) & ~3
    return out, False


def _attrs(data: bytes, a: int, end: int) -> dict[int, bytes]:
    """The rtnetlink attributes between ``a`` and ``end``: type -> payload (pure)."""
    attrs: dict[int, bytes] = {}
    while a + 4 <= end:
        alen, atype = struct.unpack_from("=HH", data, a)
        if alen < 4:
            break
        attrs[atype & 0x3FFF] = data[a + 4 : a + alen]
        a += (alen + 3) & ~3
    return attrs


def parse_neightbl(data: bytes) -> tuple[dict[int, Table], bool]:
    """RTM_NEWNEIGHTBL messages -> {family: Table}, and whether NLMSG_DONE was seen (pure)."""
    out: dict[int, Table] = {}
    msgs, done = _messages(data, _RTM_NEWNEIGHTBL)
    for off, end in msgs:
        if end - off < 20:
            continue
        fam = _FAMILY.get(data[off + 16])
        attrs = _attrs(data, off + 20, end)
        t3 = attrs.get(_NDTA_THRESH3)
        if fam is not None and t3 is not None and len(t3) >= 4:
            cfg = attrs.get(_NDTA_CONFIG, b"")
            stats = attrs.get(_NDTA_STATS, b"")
            out[fam] = Table(
                fam,
                struct.unpack("=I", attrs.get(_NDTA_THRESH1, b"\0\0\0\0")[:4])[0],
                struct.unpack("=I", attrs.get(_NDTA_THRESH2, b"\0\0\0\0")[:4])[0],
                struct.unpack("=I", t3[:4])[0],
                struct.unpack_from("=I", cfg, 4)[0] if len(cfg) >= 8 else 0,
                struct.unpack_from("=Q", stats, 80)[0] if len(stats) >= 88 else 0,
            )
    return out, done


def _netlink_tables(family: int = 0) -> dict[int, Table]:
    """Every neighbour table through rtnetlink (works in any network namespace)."""
    fam = {4: socket.AF_INET, 6: socket.AF_INET6}.get(family, socket.AF_UNSPEC)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as s:  # NETLINK_ROUTE
        s.settimeout(1.0)
        s.bind((0, 0))
        req = struct.pack("=IHHII", 20, _RTM_GETNEIGHTBL, 0x301, 1, 0) + struct.pack(
            "=BBH", fam, 0, 0
        )
        s.send(req)
        out: dict[int, Table] = {}
        while True:
            got, done = parse_neightbl(s.recv(1 << 16))
            out.update(got)
            if done:
                return out


def parse_stat(text: str) -> tuple[int, int]:
    """/proc/net/stat/arp_cache -> (entries, table_fulls summed over CPUs) (pure)."""
    lines = text.split("\n")
    head = lines[0].split()
    ie, it = head.index("entries"), head.index("table_fulls")
    entries = fulls = 0
    for line in lines[1:]:
        cols = line.split()
        if len(cols) > it:
            entries = int(cols[ie], 16)  # the same global count on every line
            fulls += int(cols[it], 16)
    return entries, fulls


def _proc_table(family: int) -> Table | None:
    """From /proc (initial namespace only; None where the files are missing)."""
    v = "ipv4" if family == 4 else "ipv6"
    try:
        th = []
        for k in (1, 2, 3):
            with open(f"/proc/sys/net/{v}/neigh/default/gc_thresh{k}", encoding="ascii") as fh:
                th.append(int(fh.read()))
        with open(f"/proc/net/stat/{TABLES[family]}", encoding="ascii") as fh:
            entries, fulls = parse_stat(fh.read())
    except (OSError, ValueError):
        return None
    return Table(family, th[0], th[1], th[2], entries, fulls)


def read_table(family: int) -> Table | None:
    """The neighbour table of this family, or None when this system does not say (not Linux)."""
    t = _proc_table(family)
    if t is not None:
        return t
    try:
        return _netlink_tables(family).get(family)
    except (OSError, struct.error):
        return None


def fulls_reader(family: int) -> Callable[[], int] | None:
    """A cheap function returning the table's ``table_fulls`` counter now (None: unavailable)."""
    path = f"/proc/net/stat/{TABLES[family]}"
    try:
        with open(path, encoding="ascii") as fh:
            parse_stat(fh.read())
    except (OSError, ValueError):
        pass
    else:

        def from_proc() -> int:
            with open(path, encoding="ascii") as fh:
                return parse_stat(fh.read())[1]

        return from_proc
    if read_table(family) is None:
        return None

    def from_netlink() -> int:
        t = _netlink_tables(family).get(family)
        return 0 if t is None else t.table_fulls

    return from_netlink


# NUD states (linux/neighbour.h) and rtnetlink neighbour messages
NUD_INCOMPLETE, NUD_REACHABLE, NUD_FAILED = 0x01, 0x02, 0x20
_RTM_NEWNEIGH, _RTM_GETNEIGH = 28, 30
_NDA_DST, _NDA_CACHEINFO = 1, 3
SETTLE_WAIT = 3.5  # the kernel's own give-up: mcast_solicit (3) x retrans_time (1 s), and some
SETTLE_POLL = 0.02
try:
    _CLK_TCK = float(os.sysconf("SC_CLK_TCK"))  # the unit of nda_cacheinfo's ages
except (ValueError, OSError, AttributeError):
    _CLK_TCK = 100.0


def parse_neigh(data: bytes) -> tuple[dict[str, tuple[int, float]], bool]:
    """RTM_NEWNEIGH messages -> {address: (NUD state, seconds since its state last changed)},
    and whether NLMSG_DONE was seen (pure)."""
    out: dict[str, tuple[int, float]] = {}
    msgs, done = _messages(data, _RTM_NEWNEIGH)
    for off, end in msgs:
        if end - off < 28:
            continue
        fam = data[off + 16]
        state = struct.unpack_from("=H", data, off + 24)[0]
        attrs = _attrs(data, off + 28, end)
        dst = attrs.get(_NDA_DST)
        if dst is None or fam not in (socket.AF_INET, socket.AF_INET6):
            continue
        try:
            addr = socket.inet_ntop(fam, dst)
        except (ValueError, OSError):
            continue
        ci = attrs.get(_NDA_CACHEINFO, b"")
        age = struct.unpack_from("=I", ci, 8)[0] / _CLK_TCK if len(ci) >= 12 else 0.0
        out[addr] = (state, age)  # age: ndm_updated, in clock ticks
    return out, done


def neigh_dump(family: int) -> dict[str, tuple[int, float]]:
    """This namespace's neighbour entries of one family (4 or 6), through rtnetlink."""
    fam = socket.AF_INET6 if family == 6 else socket.AF_INET
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as s:  # NETLINK_ROUTE
        s.settimeout(1.0)
        s.bind((0, 0))
        req = struct.pack("=IHHII", 28, _RTM_GETNEIGH, 0x301, 1, 0) + struct.pack(
            "=BBHiHBB", fam, 0, 0, 0, 0, 0, 0
        )
        s.send(req)
        out: dict[str, tuple[int, float]] = {}
        while True:
            got, done = parse_neigh(s.recv(1 << 16))
            out.update(got)
            if done:
                return out


# ---- which destinations need an entry -------------------------------------------------------


Route = tuple[int, int, bool]  # (network as int, prefix length, on-link: no gateway)


def parse_routes_v4(text: str) -> list[Route]:
    """/proc/net/route -> routes (pure; lo and reject routes are not on-link)."""
    out: list[Route] = []
    for line in text.splitlines()[1:]:
        c = line.split()
        if len(c) < 8:
            continue
        dest = int.from_bytes(bytes.fromhex(c[1]), "little")
        gw = int(c[2], 16)
        flags = int(c[3], 16)
        mask = int.from_bytes(bytes.fromhex(c[7]), "little")
        plen = bin(mask).count("1")
        onlink = gw == 0 and c[0] != "lo" and not flags & 0x0200  # RTF_REJECT
        out.append((dest, plen, onlink))
    return out


def parse_routes_v6(text: str) -> list[Route]:
    """/proc/net/ipv6_route -> routes (pure)."""
    out: list[Route] = []
    for line in text.splitlines():
        c = line.split()
        if len(c) < 10:
            continue
        dest = int(c[0], 16)
        plen = int(c[1], 16)
        flags = int(c[8], 16)
        onlink = int(c[4], 16) == 0 and c[9] != "lo" and not flags & 0x0200
        out.append((dest, plen, onlink))
    return out


def is_onlink(addr: str, v4: list[Route], v6: list[Route]) -> int:
    """4 or 6 when ``addr`` is reached without a gateway (it needs its own entry), else 0."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return 0
    if ip.is_loopback or ip.is_multicast:
        return 0
    routes, bits, fam = (v4, 32, 4) if ip.version == 4 else (v6, 128, 6)
    n = int(ip)
    best = -1
    onlink = False
    for net, plen, ol in routes:
        if plen > best and (plen == 0 or (n >> (bits - plen)) == (net >> (bits - plen))):
            best, onlink = plen, ol
    return fam if onlink else 0


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii") as fh:
            return fh.read()
    except OSError:
        return ""


# ---- the guard --------------------------------------------------------------------------------


class NeighGuard:
    """Distinct on-link destinations in flight under the table's budget; hits detected.

    The engine calls ``family(dst)`` once per destination, ``acquire``/``release`` around a
    destination's in-flight flows, ``mark(fam)`` before an attempt and ``hit(fam, mark, out)``
    after one; everything else is bookkeeping. ``share``: the number of processes probing from
    this host at once (shards), each gets its part of the budget.
    """

    def __init__(
        self,
        tables: dict[int, Table],
        readers: dict[int, Callable[[], int]],
        *,
        share: int = 1,
        routes: tuple[list[Route], list[Route]] | None = None,
    ) -> None:
        self.tables = tables
        self.readers = readers
        share = max(1, share)
        self.budget = {
            f: max(MIN_BUDGET, budget_for(t.thresh3) // share) for f, t in tables.items()
        }
        self.start_budget = dict(self.budget)
        self.active = dict.fromkeys(tables, 0)
        self.waiters: dict[int, deque[asyncio.Future[None]]] = {f: deque() for f in tables}
        self.lingering: deque[tuple[float, Any]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._cache: dict[int, tuple[int, float]] = {}
        self._rose_at: dict[int, float] = {}  # family -> when its table_fulls was seen rising
        for f in tables:
            with contextlib.suppress(OSError, ValueError):
                self._cache[f] = (readers[f](), time.monotonic())
        if routes is None:
            routes = (
                parse_routes_v4(_read("/proc/net/route")),
                parse_routes_v6(_read("/proc/net/ipv6_route")),
            )
        self.routes = routes
        self.hits = 0  # attempts that did not count: the table overflowed meanwhile
        self.unknown = 0  # flows given up on (neighbour-table-full)
        self.waited = 0  # flows that waited for a destination slot
        self.fulls0 = {f: c for f, (c, _) in self._cache.items()}
        self.settled = 0  # silent attempts that did not count: sent before the entry resolved
        self._dumps: dict[int, tuple[float, dict[str, tuple[int, float]] | None]] = {}
        self._settling: dict[str, asyncio.Future[float]] = {}

    @classmethod
    def create(cls, share: int = 1) -> NeighGuard | None:
        """A guard for this host's tables, or None when the kernel does not tell (not Linux)."""
        tables: dict[int, Table] = {}
        readers: dict[int, Callable[[], int]] = {}
        for fam in (4, 6):
            t = read_table(fam)
            r = fulls_reader(fam) if t is not None else None
            if t is not None and r is not None and t.thresh3 > 0:
                tables[fam], readers[fam] = t, r
        return cls(tables, readers, share=share) if tables else None

    # -- destinations ------------------------------------------------------------------------

    def family(self, dst: str) -> int:
        fam = is_onlink(dst, *self.routes)
        return fam if fam in self.budget else 0

    async def acquire(self, hs: Any) -> None:
        """Count ``hs`` (a HostState with fam, held, expiry) among the active destinations."""
        fam = hs.fam
        while not hs.held:
            self._expire(time.monotonic())
            if self.active[fam] < self.budget[fam]:
                self.active[fam] += 1
                hs.held = True
                return
            self.waited += 1
            fut = asyncio.get_running_loop().create_future()
            self.waiters[fam].append(fut)
            self._arm()
            await fut

    def release(self, hs: Any) -> None:
        """``hs`` has nothing in flight: it stays counted for LINGER seconds."""
        hs.expiry = time.monotonic() + LINGER
        self.lingering.append((hs.expiry, hs))
        if any(self.waiters.values()):
            self._arm()

    def forget(self, hs: Any) -> None:
        """The engine drops an idle HostState: give its slot back at once."""
        if hs.held:
            hs.held = False
            self.active[hs.fam] -= 1
            self._wake(hs.fam)

    def _expire(self, now: float) -> None:
        lg = self.lingering
        while lg and lg[0][0] <= now:
            exp, hs = lg.popleft()
            if hs.held and hs.inflight == 0 and hs.expiry == exp:
                hs.held = False
                self.active[hs.fam] -= 1
                self._wake(hs.fam)

    def _wake(self, fam: int) -> None:
        ws = self.waiters[fam]
        while ws:
            w = ws.popleft()
            if not w.done():
                w.set_result(None)
                return

    def _arm(self) -> None:
        if self._timer is not None or not self.lingering:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, self.lingering[0][0] - time.monotonic()) + 0.001
        self._timer = loop.call_later(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._expire(time.monotonic())
        for fam, ws in self.waiters.items():
            # a shrunk budget: wake as many as there is room for now
            room = self.budget[fam] - self.active[fam]
            while ws and room > 0:
                w = ws.popleft()
                if not w.done():
                    w.set_result(None)
                    room -= 1
        if any(self.waiters.values()):
            self._arm()

    # -- detection ---------------------------------------------------------------------------

    def mark(self, fam: int) -> int:
        """The counter before an attempt (a cached value: an older one only makes us stricter)."""
        c = self._cache.get(fam)
        return c[0] if c is not None else 0

    def fulls(self, fam: int) -> int:
        now = time.monotonic()
        c = self._cache.get(fam)
        if c is not None and now - c[1] < FRESH:
            return c[0]
        try:
            v = self.readers[fam]()
        except (OSError, ValueError, struct.error):
            return c[0] if c is not None else 0
        if c is not None and v > c[0]:
            self._rose_at[fam] = now
        self._cache[fam] = (v, now)
        return v

    def hit(self, fam: int, mark: int, state: str, reason: str, silent: bool) -> bool:
        """Did the table overflow while this attempt ran (so its silence proves nothing)?"""
        if not (silent or reason in SUSPECT_REASONS) or state == "open":
            return False
        if self.fulls(fam) <= mark and not (
            # this host's own "host unreachable": its ARP/NDP resolution failed, which can
            # have started attempts earlier (the peer could not add our entry to answer, as
            # the table is one for every namespace): an overflow within the resolution's
            # time counts too
            reason == "host-unreach"
            and time.monotonic() - self._rose_at.get(fam, float("-inf")) < RESOLVE_WINDOW
        ):
            return False
        self.hits += 1
        # fewer destinations at once from now on
        self.budget[fam] = max(MIN_BUDGET, min(self.budget[fam], (self.active[fam] * 3) // 4))
        return True

    # -- resolution --------------------------------------------------------------------------

    def suspect(self, hs: Any, t0: float, timeout: float) -> bool:
        """Might an attempt that started at ``t0`` (perf_counter) and came back silent after
        ``timeout`` have left this host too late (its destination's entry not yet resolved)?"""
        return hs.l2_at is None or self.cut(hs, t0, timeout)

    @staticmethod
    def cut(hs: Any, t0: float, timeout: float) -> bool:
        """Was the entry resolved only after half the attempt's wait had gone (its packet then
        had less than half its time, or never left)? A resolution a few milliseconds after the
        first packets of a burst leaves their silence standing: it is real loss, and the loss
        estimate needs it."""
        at = hs.l2_at
        return at is not None and at != float("-inf") and t0 + timeout / 2 < at

    async def settle(self, hs: Any, dst: str) -> bool:
        """Wait until ``dst``'s entry is resolved or the kernel gave up on it; True when it
        resolved (attempts that started before ``hs.l2_at`` then do not count), False when
        the silence stands (FAILED, no entry, or the kernel does not tell)."""
        if hs.l2_at is None:
            fut = self._settling.get(dst)
            if fut is None:
                fut = self._settling[dst] = asyncio.ensure_future(self._resolved_at(hs.fam, dst))
            hs.l2_at = await asyncio.shield(fut)
            self._settling.pop(dst, None)
        return hs.l2_at != float("-inf")

    async def _resolved_at(self, fam: int, dst: str) -> float:
        """When (perf_counter) ``dst``'s entry was last seen to change into a resolved state,
        or -inf when the silences to it stand."""
        with contextlib.suppress(ValueError):
            dst = str(ipaddress.ip_address(dst.split("%", 1)[0]))
        deadline = time.perf_counter() + SETTLE_WAIT
        while True:
            states = self._dump(fam)
            if states is None:
                return float("-inf")  # the kernel does not tell: as before
            st = states.get(dst)
            if st is not None and st[0] & NUD_REACHABLE:
                # since when: resolved then (from INCOMPLETE), or confirmed again (from DELAY,
                # when nothing was queued: only stricter)
                return time.perf_counter() - st[1]
            if st is not None and st[0] & ~(NUD_INCOMPLETE | NUD_FAILED):
                # STALE, DELAY, PROBE: it had an address all along (REACHABLE lasts >= 15 s,
                # so it was not resolved since the attempt); NOARP, PERMANENT: never queued
                return float("-inf")
            if st is None or st[0] != NUD_INCOMPLETE or time.perf_counter() > deadline:
                return float("-inf")  # FAILED or gone: the host did not answer ARP/NDP
            await asyncio.sleep(SETTLE_POLL)

    def _dump(self, fam: int) -> dict[str, tuple[int, float]] | None:
        now = time.perf_counter()
        c = self._dumps.get(fam)
        if c is not None and now - c[0] < SETTLE_POLL / 2:
            return c[1]
        try:
            d: dict[str, tuple[int, float]] | None = neigh_dump(fam)
        except (OSError, struct.error):
            d = None
        self._dumps[fam] = (now, d)
        return d

    def report(self) -> dict[str, Any]:
        """For the summary: what the guard did (only interesting when something happened)."""
        fulls = {f: self.fulls(f) - self.fulls0.get(f, 0) for f in self.tables}
        out = {
            "limit": {str(f): self.start_budget[f] for f in self.tables},
            "limit_end": {str(f): self.budget[f] for f in self.tables},
            "gc_thresh3": {str(f): t.thresh3 for f, t in self.tables.items()},
            "table_fulls": {str(f): n for f, n in fulls.items()},
            "retried": self.hits,
            "waited": self.waited,
            "unknown": self.unknown,
        }
        if self.settled:
            out["unresolved_retried"] = self.settled
        return out


def budget_for(thresh3: int) -> int:
    """Distinct on-link destinations at once: gc_thresh3 less a reserve for the host's own."""
    return thresh3 - max(16, thresh3 // 16)


def advice(thresh3: dict[int, int], families: set[int], flows: int) -> str:
    """The one stderr line when flows were given up on."""
    fams = sorted(families) or [4]
    names = " / ".join(SYSCTL[f] for f in fams)
    now = ", ".join(f"{SYSCTL[f]} = {thresh3[f]}" for f in fams if f in thresh3)
    now = f" ({now})" if now else ""
    return (
        f"portmesh: {flows} flows could not be probed because this host's neighbour table "
        f"(ARP/NDP) was full{now}: they are unknown (neighbour-table-full); raise {names} "
        f"(and gc_thresh1/gc_thresh2 with it) above the number of peers, then probe again\n"
    )
