"""The mesh coordinator: an agent on every host, responders everywhere, every host probes.

Phases (each a barrier over the live agents):

  1. start  every agent through the exec template; ``hello`` (protocol version, the secret)
  2. respond  every agent starts its responder on the ports the plan probes it on; wait for
              every ``ready``
  3. probe  every agent plans its own slice (``sources={its name}``) and streams results;
            the coordinator forwards them, folds them into the pair join and the failure
            matrix, and keeps a per-agent window of plan indexes (what is still owed)
  4. stop   every agent ends its responder (the witness reports are in by then) and exits
  5. join   pair records, the summary record, the human summary on stderr

A host whose exec fails, whose agent dies, answers with an error or times out is reported
once as ``{"type":"host","name","state":"unreachable","reason"}`` and every flow it owed as a
source is emitted as ``error`` with that reason, so planned == results over every source.

Memory: O(hosts^2 x requirements) for the pair join and the matrix, O(hosts x legs) for the
responder port lists, and per agent a window of plan indexes as wide as its in-flight probes.
Nothing per flow is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shlex
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import orjson

from scanner.core.model import natural_key
from scanner.core.privileges import raise_nofile
from scanner.core.results import encode, iso_ts, new_scan_id, start_record, summary_record
from scanner.core.tags import new_secret
from scanner.core.tally import parse_runs
from scanner.engine.check import TokenWatch
from scanner.engine.neigh import REASON as NEIGH_FULL
from scanner.engine.output import NdjsonOutput
from scanner.engine.process import run_loop
from scanner.errors import InputError
from scanner.mesh import transport
from scanner.mesh.agent import PROTOCOL_VERSION, site_to_wire
from scanner.mesh.launch import (
    DEFAULT_TTL,
    HELLO_TIMEOUT,
    READY_TIMEOUT,
    STOP_TIMEOUT,
    MeshConfig,
    catalog_files,
    engine_share,
    held_ports,
    per_source_counts,
    responder_ports,
    silent_ports,
    unbound_ports,
    unique_hosts,
    unsure_ports,
)
from scanner.mesh.link import AgentFailed, AgentLink, Window, loads_or_none
from scanner.mesh.pairs import SPARSE, V6_KEY, PairJoin
from scanner.mesh.summary import Matrix, human, progress
from scanner.plan.planner import plan, plan_meta

# the names other modules and tests import from here (the module was split along its seams)
__all__ = [
    "DEFAULT_TTL",
    "HELLO_TIMEOUT",
    "READY_TIMEOUT",
    "STOP_TIMEOUT",
    "AgentFailed",
    "AgentLink",
    "Mesh",
    "MeshConfig",
    "Window",
    "flows_of",
    "held_ports",
    "per_source_counts",
    "responder_ports",
    "run_mesh",
    "unbound_ports",
    "unsure_ports",
    "silent_ports",
]


TALLY_CACHE = 1 << 14  # entries per cache of tally line parts (then that cache starts over)


def _runs_ok(runs: Any, n: int) -> bool:
    """Are a block's runs [start, length, ...] of plan indexes n indexes in all?"""
    if runs.__class__ is not list or len(runs) % 2:
        return False
    total = 0
    for j in range(0, len(runs), 2):
        a, k = runs[j], runs[j + 1]
        if a.__class__ is not int or k.__class__ is not int or a < 0 or k < 1:
            return False
        total += k
    return total == n


def _unhashable(pairs: list[Any]) -> bool:
    """Does the list hold a value that cannot be a key (the fold looks hosts up)? Any other
    value is folded as a plain result line with it would be (outside the mesh)."""
    try:
        hash(tuple(pairs))
    except TypeError:
        return True
    return False


def _block_groups_ok(groups: list[Any], n: int) -> bool:
    """Is every group [req, proto, af, src, src_host, state, port, [host, dst, ...]] of the
    types the fold takes, and do the groups hold exactly n lines?"""
    total = 0
    for g in groups:
        if g.__class__ is not list or len(g) != 8:
            return False
        req, proto, af, src, src_host, state, port, pairs = g
        if (
            af not in ("ipv4", "ipv6")
            or state.__class__ is not str
            or not (port is None or (port.__class__ is int and 0 <= port <= 65535))
            or pairs.__class__ is not list
            or len(pairs) % 2
            or _unhashable(pairs)
            or not all(x is None or x.__class__ is str for x in (req, proto, src, src_host))
        ):
            return False
        total += len(pairs) // 2
    return total == n


def _block_matches(head: dict[str, Any], lines: bytes, n: int) -> bool:
    """Do a block's n lines, read one by one, keep their places (their plan indexes) when its
    bytes did not frame it? Each line must be one its groups list (a passing result without
    ``i``, none twice) or a broken result line (a prefix written on it: it stays one flow,
    owed). A line that is neither (a stray line written into the block, or the tail of a
    line cut by one) shifts the lines after it off their places."""
    groups = head.get("groups")
    if groups.__class__ is not list or not _block_groups_ok(groups, n):
        return False
    want: Counter[tuple[Any, ...]] = Counter()
    for req, proto, af, src, src_host, state, port, pairs in groups:
        for j in range(0, len(pairs), 2):
            want[(req, proto, af, src, src_host, state, port, pairs[j], pairs[j + 1])] += 1
    for line in lines[:-1].split(b"\n"):
        r = loads_or_none(line)
        if r.__class__ is dict and r.get("verdict") == "pass" and "i" not in r:
            g = r.get
            k = (g("req"), g("proto"), g("af"), g("src"), g("src_host"), g("state"),
                 g("port"), g("host"), g("dst"))  # fmt: skip
            with contextlib.suppress(TypeError):  # a value that cannot be a key
                if want[k]:
                    want[k] -= 1
                    continue
        if b'{"type":"result"' not in line:
            return False
    return True


# ---- the mesh -------------------------------------------------------------------------------


class Mesh:
    def __init__(self, cfg: MeshConfig) -> None:
        self.cfg = cfg
        self.out = cfg.output or NdjsonOutput()
        self.scan_id = new_scan_id()
        self.tokens = TokenWatch()  # did any answer carry our token (another secret?)
        self.hosts = unique_hosts(cfg.site)
        names = frozenset(h.name for h in self.hosts)
        self.selection = dataclasses.replace(cfg.selection, sources=names, scanner=None)
        self.planned_by = per_source_counts(cfg.catalog, cfg.site, self.selection)
        self.planned = sum(self.planned_by.values())
        self.join = PairJoin(names)
        self.matrix = Matrix()
        self.states: Counter[str] = Counter()
        self.results = 0
        self.tallied = 0  # --emit failures: passing flows counted in tally records
        self.neigh_full = 0  # flows unknown because an agent's neighbour table was full
        self.links: list[AgentLink] = []
        # the bytes of tally lines by (host, dst) (bounded)
        self._tally_dests: dict[tuple[str, str], bytes] = {}
        # agents whose line longer than a read (a done with its tallies) is being gathered
        self.long_lines = asyncio.Semaphore(transport.LONG_LINES)
        self.unreachable: dict[str, str] = {}
        self.interrupted = False
        self.t0 = time.perf_counter()
        # agent name -> addresses its packets left from that are not its inventory address
        self.moved: dict[str, set[str]] = {}
        self.check_exec()

    def check_exec(self) -> None:
        """Refuse a template that names hosts but gives two of them the same command: both
        agents would run on one machine and probe from it under two names (Kubean's node1 of
        two clusters with ``ip netns exec LAB-{name}``). A template without placeholders
        (``env``: every agent here) is the operator's explicit choice."""
        tpl = self.cfg.exec_template or ""
        if not tpl or not any("{" + p + "}" in tpl for p in transport.PLACEHOLDERS):
            return
        seen: dict[tuple[str, ...], str] = {}
        for h in self.hosts:
            words = tuple(transport.render(tpl, h.inventory_name, h.address, h.user, h.cluster))
            other = seen.setdefault(words, h.name)
            if other != h.name:
                raise InputError(
                    f"--exec {tpl!r} gives {other} and {h.name} the same command "
                    f"({shlex.join(words)}): both agents would run on one machine; "
                    "tell them apart with {cluster} or {address}"
                )

    # -- results -----------------------------------------------------------------------------

    def on_result(self, link: AgentLink, rec: dict[str, Any], line: bytes) -> None:
        """One result line of an agent (see ``on_results``)."""
        self.on_results(link, [rec], [line])

    def on_results(self, link: AgentLink, recs: list[Any], lines: list[bytes]) -> None:
        """An agent's records, parsed, with their lines (the hot path: 26 million result
        lines at 1,000 hosts, in batches of one read each).

        A passing result of the agent's own host to a mesh host, in a direction that has not
        failed, is the common case: its flow index is marked in the window, its direction's
        count and port set are stepped in the pair join (``PairJoin.add_passing``, inlined:
        a call per line is a tenth of the time here) and its bytes are forwarded. Anything
        else goes through ``emit``.
        """
        join = self.join
        fast = link.jidx is not None and self.cfg.only is None
        row = (link.jidx or 0) * join.n
        reqs, index = join.reqs, join.index
        memo, step = join.states.memo, join.states.step
        states = self.states
        write = self.out.write
        name, addr, addr6 = link.name, link.host.address, link.host.address6
        window, got = link.window, link.got
        folded = token = synack = 0
        for rec, line in zip(recs, lines, strict=True):
            if rec.__class__ is not dict:
                link.garbage += 1  # a peer's garbage never ends the reader (said at the end)
                continue
            get = rec.get
            if get("type") != "result":
                link._control(rec)
                continue
            if link.failed is not None:
                continue  # not one more line of a failed agent is counted
            why = get("reason")  # TokenWatch, inline: this loop is the hot path
            if why == "syn-ack":
                synack += 1
            elif why == "responder":
                token += 1
            i = rec.pop("i", None)
            if i.__class__ is not int or i < 0:
                # no plan index: no flow it can stand for (it would be owed again at the end)
                link.garbage += 1
                continue
            if got is not None:
                got.append(i)
            elif i == window.low and not window.starts:
                window.low = i + 1  # in order: the common case
            elif not window.add(i):
                continue  # a duplicate line: every flow has exactly one result
            link.results += 1
            src = get("src")
            if src != addr and src is not None and src != addr6 and src != get("dst"):
                # the agent's packets left from another address than its host's: it runs on
                # another machine than the one named (or a multi-homed host routes so)
                self.moved.setdefault(name, set()).add(src)
            # forward the agent's own bytes minus the index field (it is the last one written)
            cut = line.rfind(b',"i":')
            if cut <= 0:
                self.emit(rec)
                continue
            raw = line[:cut] + b"}\n"
            if fast and get("verdict") == "pass" and get("src_host") == name:
                req = get("req")
                af = get("af")
                if req.__class__ is str and (
                    af == "ipv6" if af is not None else ":" in str(get("dst") or "")
                ):
                    req += V6_KEY  # a dual-stack requirement: one table per family
                t = reqs.get(req)
                d = index.get(get("host"))
                if t is not None and d is not None:
                    # a passing flow folded: count it and forward its bytes (what emit()
                    # does; its direction's passes are read back by Matrix.fold)
                    k = row + d
                    sig = t.sig
                    sid = sig[k] or 1
                    port = get("port")
                    if sid != SPARSE:
                        t.passed[k] += 1
                        n = memo.get((sid << 17) | (0 if port is None else port + 1))
                        sig[k] = n if n is not None else step(sid, port)
                    else:  # a direction with a failure: Direction.add of a pass
                        dd = t.sparse[k]
                        dd.ports.add(port)
                        dd.passed += 1
                    state = get("state", "?")
                    states[state] = states.get(state, 0) + 1
                    folded += 1
                    write(raw)
                    continue
            self.emit(rec, raw)
        self.tokens.token += token
        self.tokens.synack += synack
        if folded:
            self.results += folded
            vs = self.matrix.verdicts
            vs["pass"] = vs.get("pass", 0) + folded

    def on_passes(
        self, link: AgentLink, head: dict[str, Any], lines: bytes, exact: bool = True
    ) -> None:
        """A block of an agent's passing results (wire.PassBlocks): its header and its ``n``
        lines, unread. The header's runs claim the lines' plan indexes in the window, its
        groups are folded into the pair join as ``on_results`` folds one line each, and the
        lines are forwarded as they came. A block that cannot be taken so (``exact`` False:
        its bytes did not frame it; ``--only``; the agent's host outside the join; an index
        already seen; a header or a first line that does not hold what a block must) goes
        line by line through ``on_results`` with its indexes put back: the plain path, which
        reads every line and counts a broken one (its flow owed). Without ``n`` indexes to
        put back, every line of the block is such a broken line."""
        if link.failed is not None:
            return
        n = head.get("n")
        runs = head.get("i")
        # its n lines as AgentLink.feed framed them (whole lines, counted there)
        if n.__class__ is not int or not _runs_ok(runs, n):
            link.garbage += lines.count(b"\n")
            return
        if not exact and not _block_matches(head, lines, n):
            # a line written into the block shifted its lines: their places cannot tell
            # their indexes, so none is counted, every flow of the block is owed and the
            # block's lines pushed out of it carry no index (broken lines)
            link.garbage += n
            return
        groups = head.get("groups")
        why = head.get("why")
        first = loads_or_none(lines[: lines.find(b"\n")]) if exact else None
        if (
            first.__class__ is not dict
            or link.jidx is None
            or self.cfg.only is not None
            or link.got is not None
            or groups.__class__ is not list
            or why.__class__ is not dict
            or why.get("responder", 0).__class__ is not int  # type: ignore[union-attr]
            or why.get("syn-ack", 0).__class__ is not int  # type: ignore[union-attr]
            or first.get("type") != "result"  # type: ignore[union-attr]
            or first.get("verdict") != "pass"  # type: ignore[union-attr]
            or "i" in first  # type: ignore[operator]
            or not _block_groups_ok(groups, n)
            or not link.window.claim(runs)
        ):
            self._block_lines(link, lines[:-1].split(b"\n"), runs)
            return
        join = self.join
        row = link.jidx * join.n
        reqs, index, step = join.reqs, join.index, join.states.step
        states = self.states
        name, addr, addr6 = link.name, link.host.address, link.host.address6
        folded = 0
        for req, proto, af, src, src_host, state, port, pairs in groups:
            npairs = len(pairs) // 2
            states[state] = states.get(state, 0) + npairs
            if src != addr and src is not None and src != addr6:
                for j in range(1, len(pairs), 2):
                    if pairs[j] != src:
                        self.moved.setdefault(name, set()).add(src)
                        break
            tbl = None
            if src_host == name and req.__class__ is str:
                tbl = reqs.get(req + V6_KEY if af == "ipv6" else req)
            memo: dict[int, int] = {}  # the port set's state before -> after this port
            for j in range(0, len(pairs), 2):
                host = pairs[j]
                d = index.get(host) if tbl is not None else None
                if d is not None:
                    k = row + d
                    sid = tbl.sig[k] or 1  # type: ignore[union-attr]
                    if sid != SPARSE:
                        tbl.passed[k] += 1  # type: ignore[union-attr]
                        to = memo.get(sid)
                        if to is None:
                            to = memo[sid] = step(sid, port)
                        tbl.sig[k] = to  # type: ignore[union-attr]
                    else:  # a direction with a failure: Direction.add of a pass
                        dd = tbl.sparse[k]  # type: ignore[union-attr]
                        dd.ports.add(port)
                        dd.passed += 1
                    folded += 1
                    continue
                rec = {
                    "type": "result", "src": src, "dst": pairs[j + 1], "af": af, "host": host,
                    "proto": proto, "port": port, "state": state, "src_host": src_host,
                    "req": req, "verdict": "pass",
                }  # fmt: skip
                self.matrix.add(rec, join.add(rec))
        self.tokens.token += why.get("responder", 0)
        self.tokens.synack += why.get("syn-ack", 0)
        link.results += n  # type: ignore[operator]
        self.results += n  # type: ignore[operator]
        if folded:
            vs = self.matrix.verdicts
            vs["pass"] = vs.get("pass", 0) + folded
        self.out.write(lines)

    def _block_lines(self, link: AgentLink, lines: list[bytes], runs: list[int]) -> None:
        """A block's lines one by one, as result lines with their plan indexes."""
        idx = [i for j in range(0, len(runs), 2) for i in range(runs[j], runs[j] + runs[j + 1])]
        with_i = [
            line[:-1] + b',"i":%d}' % i if line.endswith(b"}") else line
            for line, i in zip(lines, idx, strict=True)
        ]
        recs = [loads_or_none(x) for x in with_i]
        self.on_results(link, recs, with_i)

    def on_tally_groups(self, link: AgentLink, groups: list[Any]) -> None:
        """An agent's tally records (inside its ``done``, in columns: wire.TallyGroups): fold,
        count, write them.

        ~9 million records at 1,000 hosts with the NodePort sample, in groups of ~1,000 that
        share everything but the destination, so a group's bytes are put together once and a
        record costs what joining three byte strings does. The common record, passing flows
        of the agent's own host to a mesh host in a direction without a failure, is folded
        here as ``PairJoin.add_tally`` would, with the port set's transition memoised per
        group (``_States.tally_step``). Anything else takes ``add_tally`` and
        ``Matrix.add_passes``. A group that cannot be read (a field of the wrong type) raises
        ValueError before any group is counted: the agent fails and every flow it sent no line
        for is owed (unknown), as no tally can tell which flows an unread group stood for.
        (tests/test_mesh_tallies.py checks this against a plain record-by-record fold.)"""
        join = self.join
        row = -1 if link.jidx is None else link.jidx * join.n
        reqs, index, step = join.reqs, join.index, join.states.tally_step
        states = self.states
        write = self.out.write
        dumps = orjson.dumps
        head = (
            b'{"type":"tally","scan_id":' + dumps(self.scan_id)
            + b',"src_host":' + dumps(link.name) + b',"src":'
        )  # fmt: skip
        dests = self._tally_dests
        tallied = folded = 0
        if groups.__class__ is not list:
            raise ValueError(f"tally_groups is not a list ({type(groups).__name__})")
        ready = []  # every group read before one is counted: all of them or none
        for g in groups:
            try:
                req, proto, af, src, st, ports, pairs = g
                if pairs.__class__ is not list or len(pairs) % 2 or af not in ("ipv4", "ipv6"):
                    raise ValueError
                hash((req, proto, src))  # keys of the pair join and the matrix (TypeError)
                if not all(x.__class__ is str for x in pairs):
                    raise ValueError
                conv = {str(k): int(v) for k, v in st.items()}
                flows = sum(conv.values())
                ports = str(ports) if ports else None
                if ports:
                    parse_runs(ports)  # read when folded: an unreadable one counts nothing
                tail = (
                    dumps(req) + b',"proto":' + dumps(proto) + b',"af":' + dumps(af)
                    + b',"flows":%d,"states":' % flows + dumps(conv)
                    + (b',"ports":' + dumps(ports) if ports else b"") + b"}\n"
                )  # fmt: skip
                pre = head + dumps(src) + b',"host":'
            except (TypeError, ValueError, AttributeError):
                raise ValueError(f"a tally group that cannot be read: {g!r:.120}") from None
            ready.append((req, proto, af, src, conv, flows, ports, tail, pre, pairs))
        for req, proto, af, src, conv, flows, ports, tail, pre, pairs in ready:
            n = len(pairs) // 2
            if not n:
                continue
            tallied += flows * n
            for k, v in conv.items():
                states[k] += v * n
            tbl = None
            if flows and row >= 0 and req.__class__ is str:
                tbl = reqs.get(req + V6_KEY if af == "ipv6" else req)
            passed, sig = (tbl.passed, tbl.sig) if tbl is not None else (None, None)
            memo: dict[int, int] = {}  # port-set state before -> after this group's tally
            lines = []
            for j in range(0, 2 * n, 2):
                host, dst = pairs[j], pairs[j + 1]
                b = dests.get((host, dst))
                if b is None:
                    if len(dests) >= TALLY_CACHE:
                        dests.clear()
                    b = dests[(host, dst)] = dumps(host) + b',"dst":' + dumps(dst) + b',"req":'
                lines.append(pre + b + tail)
                if sig is not None:
                    d = index.get(host)
                    if d is not None:
                        k = row + d
                        sid = sig[k]
                        if sid != SPARSE:
                            passed[k] += flows  # type: ignore[index]
                            to = memo.get(sid)
                            if to is None:
                                to = memo[sid] = step(sid or 1, ports, flows)
                            sig[k] = to
                            folded += flows
                            continue
                rec: dict[str, Any] = {
                    "type": "tally", "scan_id": self.scan_id, "src_host": link.name,
                    "src": src, "host": host, "dst": dst, "req": req, "proto": proto, "af": af,
                    "flows": flows, "states": dict(conv),
                }  # fmt: skip
                if ports:
                    rec["ports"] = ports
                self.matrix.add_passes(rec, flows, join.add_tally(rec))
            write(b"".join(lines))
        link.tallied += tallied
        self.tallied += tallied
        if folded:
            vs = self.matrix.verdicts
            vs["pass"] = vs.get("pass", 0) + folded

    def emit(self, rec: dict[str, Any], raw: bytes | None = None) -> None:
        self.results += 1
        state = rec.get("state", "?")
        states = self.states
        states[state] = states.get(state, 0) + 1
        if state == "error" and rec.get("reason") == NEIGH_FULL:
            self.neigh_full += 1
        self.matrix.add(rec, self.join.add(rec))
        only = self.cfg.only
        if only is None or state in only or rec.get("verdict") in only:
            self.out.write(raw if raw is not None else encode(rec))

    def fail(self, link: AgentLink, reason: str) -> None:
        if link.failed is not None:
            return
        link.failed = reason
        if self.interrupted:
            # an agent cut short by the operator's Ctrl-C is not an unreachable host
            link.failed = "interrupted"
            link.kill()
            return
        self.unreachable[link.name] = reason
        link.kill()
        self.out.record(
            {
                "type": "host",
                "scan_id": self.scan_id,
                "name": link.name,
                "address": link.host.address,
                "state": "unreachable",
                "reason": reason,
            }
        )
        self.out.flush()

    def owed(self, link: AgentLink, reason: str) -> None:
        """Every flow of this source without a result: error with the host's reason."""
        sel = dataclasses.replace(self.selection, sources=frozenset({link.name}))
        ts = iso_ts(time.time())
        got = set(link.got) if link.got is not None else None
        for i, f in enumerate(plan(self.cfg.catalog, self.cfg.site, sel)):
            if got is not None:
                if i in got:
                    continue
            elif i in link.window:
                continue
            else:
                link.window.add(i)
            rec = {
                "type": "result",
                "scan_id": self.scan_id,
                "ts": ts,
                "src": f.src,
                "dst": f.dst,
                "af": f.af,
                "host": f.host,
                "proto": f.proto,
                "port": f.port,
                "state": "error",
                "reason": reason,
                "rtt_ms": None,
                "attempts": 0,
                "src_host": f.src_host,
                "req": f.req,
                "verdict": "unknown",
            }
            self.emit(rec)

    # -- phases ------------------------------------------------------------------------------

    def agent_argv(self, host: Any) -> list[str]:
        return transport.command_argv(*self.agent_parts(host))

    def agent_parts(self, host: Any) -> tuple[list[str], list[str]]:
        """(the exec template's words for this host, the agent command's words)."""
        cfg = self.cfg
        tpl = cfg.exec_template or transport.default_template(host.user)
        prefix = transport.render(tpl, host.inventory_name, host.address, host.user, host.cluster)
        if cfg.bundle is not None:
            agent = transport.bootstrap_argv(cfg.bundle_python)
        else:
            agent = transport.agent_words(prefix, cfg.agent_cmd)
        return prefix, agent

    async def _phase(self, links: list[AgentLink], step: Any) -> None:
        async def one(link: AgentLink) -> None:
            if link.failed is not None:
                return
            try:
                await step(link)
            except AgentFailed as e:
                self.fail(link, str(e))

        await asyncio.gather(*(one(x) for x in links))

    def live(self) -> list[AgentLink]:
        return [x for x in self.links if x.failed is None]

    async def run(self) -> None:
        cfg = self.cfg
        given = cfg.engine.probe_options.secret
        # a given secret (--secret-file) is shared with responders that already run on the
        # hosts (a lab's): their ports answer our probes as our own responders would
        secret = given.decode() if given else new_secret().decode()
        payload = transport.bundle_payload(cfg.bundle) if cfg.bundle else None
        ports = responder_ports(cfg.catalog, cfg.site, self.selection, cfg.withhold)
        self.links = [AgentLink(self, h, self.agent_parts(h)) for h in self.hosts]

        gate = asyncio.Semaphore(cfg.forks)

        async def hello(link: AgentLink) -> None:
            async with gate:  # at most `forks` execs (and bundle copies) in progress
                await link.start(payload)
            link.send(
                {
                    "type": "hello",
                    "version": PROTOCOL_VERSION,
                    "secret": secret,
                    "name": link.name,
                    "roles": sorted(link.host.roles),
                }
            )
            link.hello_rec = await link.expect("hello", cfg.hello_timeout)

        async def respond(link: AgentLink) -> None:
            tcp, udp = ports.get(link.name, ("", ""))
            msg = {"type": "respond", "tcp": tcp, "udp": udp, "ttl": cfg.ttl,
                   "witness": cfg.witness,
                   # where the peers probe it: a port held on 127.0.0.1 is answered there
                   "addr": link.host.address}  # fmt: skip
            if cfg.local_bind:
                msg["bind"] = link.host.address
            link.send(msg)
            link.ready_rec = await link.expect("ready", cfg.ready_timeout)

        await self._phase(self.links, hello)
        if not self.interrupted:
            await self._phase(self.live(), respond)
        live = self.live()
        probe_msg = {
            "type": "probe",
            "scan_id": self.scan_id,
            "site": site_to_wire(cfg.site),
            "catalog": {"files": catalog_files(cfg.catalog)},
            "selection": {
                "cni": self.selection.cni,
                "with": sorted(self.selection.with_features),
                "without": sorted(self.selection.without_features),
                "nodeport_sample": self.selection.nodeport_sample,
            },
            "engine": engine_share(cfg.engine, max(1, len(live)), cfg.loop),
            "expect": cfg.expect,
            "emit": cfg.emit,
            "unbound": unbound_ports(self.links),
            "unsure": unsure_ports(self.links),
            "silent": silent_ports(self.links),
        }
        if cfg.local_bind:
            probe_msg["from_own_address"] = True
        probe = orjson.dumps(probe_msg) + b"\n"  # encoded once: the same bytes for every agent

        async def probe_one(link: AgentLink) -> None:
            await link.send_raw(probe)
            if self.interrupted:
                link.send({"type": "stop"})
            await link.expect("done", None)

        if not self.interrupted:
            await self._phase(live, probe_one)

        async def stop(link: AgentLink) -> None:
            link.send({"type": "stop"})
            with contextlib.suppress(AgentFailed):
                await link.expect("exit-of-agent", STOP_TIMEOUT)

        await self._phase(self.live(), stop)
        for link in self.links:
            link.kill()
            if link.reader is not None:
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(link.reader, 2.0)
        for link in self.links:
            if link.garbage:
                # something else writes to the agent's stdout (a login banner, a wrapper): a
                # result line it broke is a flow without a line, owed below as unknown
                sys.stderr.write(
                    f"portmesh mesh: {link.name}: {link.garbage} line(s) on the agent's stdout "
                    "were not agent records (does something else write there: a login banner, "
                    "a shell profile, a wrapper of --agent-cmd?)\n"
                )
            if link.failed == "interrupted" and link.name not in self.unreachable:
                self.owed(link, "interrupted")
            elif link.failed is not None:
                self.owed(link, f"agent unreachable: {link.failed}")
            elif link.got is not None and link.tallied:
                if link.results + link.tallied != link.planned:
                    # its tallies are counted: owed() cannot tell which flows they covered
                    sys.stderr.write(
                        f"portmesh mesh: {link.name}: {link.results} results + {link.tallied} "
                        f"tallied != {link.planned} planned (agent bug?)\n"
                    )
            elif (
                link.got is None and link.window.low < link.planned
            ) or link.results < link.planned:
                # the agent ended without every result (interrupted before it probed, or it
                # said done too early): never silently lose a flow
                why = "interrupted" if self.interrupted else "the agent ended without a result"
                self.owed(link, why)

    def interrupt(self) -> None:
        """Ctrl-C: every agent stops launching probes and reports the rest as interrupted."""
        if self.interrupted:
            for link in self.links:
                link.kill()
            return
        self.interrupted = True
        for link in self.live():
            link.send({"type": "stop"})


# ---- the entry point ------------------------------------------------------------------------


def run_mesh(cfg: MeshConfig) -> int:
    """Run the mesh; exit code 0 no flow fails and every host answered (unknown flows do not
    change it: they are counted and their pairs listed as UNKNOWN on stderr), 1 any fail or
    unreachable host, 130 interrupted."""
    raise_nofile()  # three pipes per agent
    mesh = Mesh(cfg)
    out = mesh.out
    out.record(
        start_record(
            mesh.scan_id,
            cfg.argv,
            mesh.planned,
            mesh={
                "hosts": len(mesh.hosts),
                "exec": cfg.exec_template or "ssh -o BatchMode=yes [{user}@]{address}",
                "agent_cmd": "bundle"
                if cfg.bundle is not None
                else (
                    shlex.join(mesh.agent_parts(mesh.hosts[0])[1]) if mesh.hosts else cfg.agent_cmd
                ),
                "protocol": PROTOCOL_VERSION,
            },
            plan=plan_meta(cfg.catalog, cfg.site, mesh.selection),
        )
    )
    out.flush()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, mesh.interrupt)
                installed.append(sig)

        async def ticker() -> None:
            while True:
                await asyncio.sleep(0.2)
                out.flush()
                if cfg.progress:
                    progress(mesh)

        tick = asyncio.create_task(ticker())
        try:
            await mesh.run()
        finally:
            tick.cancel()
            for sig in installed:
                loop.remove_signal_handler(sig)
            for link in mesh.links:
                link.kill()

    run_loop(cfg.loop, main())
    if cfg.progress:
        sys.stderr.write("\n")
    elapsed = time.perf_counter() - mesh.t0
    pairs: Counter[str] = Counter()
    for counts, lines in mesh.join.pair_blocks(mesh.scan_id):
        pairs.update(counts)
        out.write(lines)
    agents = {
        link.name: {
            "planned": link.planned,
            "results": link.results,
            **({"tallied": link.tallied} if link.got is not None else {}),
            "elapsed_s": (link.done_rec or {}).get("elapsed_s"),
            "rate_pps": (link.done_rec or {}).get("rate_pps"),
            "tcp_method": (link.done_rec or {}).get("tcp_method"),
            "agent": (link.hello_rec or {}).get("agent"),
            "python": (link.hello_rec or {}).get("python"),
            "module": (link.hello_rec or {}).get("module"),
        }
        for link in mesh.links
        if link.failed is None
    }
    emitted: dict[str, Any] = (
        {"emit": "failures", "tallied": mesh.tallied} if cfg.emit == "failures" else {}
    )
    # how TCP was probed: the agents' one method, "mixed" when they differ (each agent's too)
    methods = {a["tcp_method"] for a in agents.values() if a["tcp_method"]}
    if methods:
        emitted["tcp_method"] = methods.pop() if len(methods) == 1 else "mixed"
    summary = summary_record(
        mesh.scan_id,
        mesh.planned,
        mesh.results,
        dict(mesh.states),
        elapsed,
        **emitted,
        verdicts={k: mesh.matrix.verdicts.get(k, 0) for k in ("pass", "fail", "unknown")},
        pairs={k: pairs.get(k, 0) for k in ("pass", "fail", "one-way", "unknown")},
        hosts={"total": len(mesh.hosts), "unreachable": sorted(mesh.unreachable, key=natural_key)},
        agents=agents,
        **({"interrupted": True} if mesh.interrupted else {}),
    )
    out.record(summary)
    out.close()
    human(cfg.summary_to or sys.stderr, mesh, pairs, summary, elapsed)
    warn = mesh.tokens.warning("portmesh mesh")
    if warn:
        (cfg.summary_to or sys.stderr).write(warn)
    if mesh.interrupted:
        return 130
    if mesh.matrix.verdicts.get("fail", 0) or mesh.unreachable:
        return 1
    return 0


def flows_of(cfg: MeshConfig, name: str) -> Iterator[Any]:
    """The planned flows of one source host (for tests and tools)."""
    names = frozenset(h.name for h in unique_hosts(cfg.site))
    sel = dataclasses.replace(cfg.selection, sources=names & {name}, scanner=None)
    return plan(cfg.catalog, cfg.site, sel)
