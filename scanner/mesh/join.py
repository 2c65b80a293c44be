"""Join per-host ``check`` files into one mesh run (``portmesh report --join``; pure).

When something other than ``portmesh mesh`` fans the checks out (the Ansible playbook of
``scanner.ansible``, a job scheduler, a person with a loop), every host writes its own
``check`` NDJSON with its own ``scan_id``, and the responders' files hold the witness reports.
``join_records`` turns that stream into what ``mesh`` writes: one ``start``, every ``result``
re-stamped with one ``scan_id``, the ``pair`` records of the same ``PairJoin`` the coordinator
uses (so the verdicts and reasons are the mesh's, one-way included), and one ``summary``.

Memory is the pair join's, O(hosts^2 x requirements): results stream through.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from scanner.core.results import new_scan_id, start_record, summary_record
from scanner.mesh.pairs import PairJoin

# record types read from the per-host files (the reader passes witness records through too)
JOIN_TYPES = ("start", "result", "host", "summary", "witness", "tally")


@dataclass
class JoinStats:
    """What the join saw, for the human summary."""

    runs: set[str] = field(default_factory=set)  # scan_ids of the joined files
    sources: set[str] = field(default_factory=set)  # hosts that probed (src_host of results)
    planned: int = 0  # sum of the files' start records' planned
    results: int = 0
    tallied: int = 0  # passing flows counted in tally records (check --emit failures)
    states: Counter[str] = field(default_factory=Counter)
    verdicts: Counter[str] = field(default_factory=Counter)
    pairs: Counter[str] = field(default_factory=Counter)
    witness: int = 0
    short: list[dict[str, Any]] = field(default_factory=list)  # one-way and failed pairs
    unreachable: dict[str, str] = field(default_factory=dict)
    incomplete: list[str] = field(default_factory=list)  # runs whose summary is missing/short
    # failing directions with no pair record (the reverse is not planned, or the destination
    # is no mesh host): (req, af, src, dst, proto) -> [ports, reason]; listed as mesh lists them
    failed: dict[tuple[str, str, str, str, str], list[Any]] = field(default_factory=dict)
    unpaired: list[dict[str, Any]] = field(default_factory=list)
    unpaired_more: int = 0  # failing directions beyond FAILED_CAP, counted only


def join_records(
    records: Iterable[dict[str, Any]],
    hosts: Iterable[str],
    argv: list[str],
    planned: int | None = None,
    stats: JoinStats | None = None,
    scan_id: str | None = None,
) -> Iterator[dict[str, Any]]:
    """The joined run, streamed: start, results (one scan_id), host, pairs, summary.

    ``hosts``: the hosts that probed (each file's ``start.check.host``): the pair join's
    hosts, as the mesh's. ``planned``: the sum of the inputs' planned counts.
    """
    st = stats if stats is not None else JoinStats()
    sid = scan_id or new_scan_id()
    t0 = time.perf_counter()
    join = PairJoin(hosts)
    yield start_record(sid, argv, planned, join={"inputs": "per-host check files"})
    finished: dict[str, dict[str, Any]] = {}
    started: dict[str, int] = {}
    for rec in records:
        t = rec.get("type")
        run = str(rec.get("scan_id") or "-")
        if t == "result":
            st.runs.add(run)
            st.results += 1
            st.states[str(rec.get("state"))] += 1
            st.verdicts[str(rec.get("verdict") or "unknown")] += 1
            if rec.get("src_host"):
                st.sources.add(str(rec["src_host"]))
            join.add(rec)
            if rec.get("verdict") == "fail":
                _failed(st, rec)
            yield {**rec, "scan_id": sid}
        elif t == "tally":
            # check --emit failures: passing flows of one direction, counted; the pair join
            # folds them in bulk (PairJoin.add_tally) where this tree's join has it
            flows = rec.get("flows")
            if isinstance(flows, int) and flows > 0:
                st.runs.add(run)
                st.tallied += flows
                st.verdicts["pass"] += flows
                if rec.get("src_host"):
                    st.sources.add(str(rec["src_host"]))
                add_tally = getattr(join, "add_tally", None)
                if add_tally is not None:
                    add_tally(rec)
                yield {**rec, "scan_id": sid}
        elif t == "witness":
            st.witness += 1
            join.witness(rec)
        elif t == "start":
            n = rec.get("planned")
            if isinstance(n, int):
                started[run] = n
                st.planned += n
        elif t == "summary":
            finished[run] = rec
        elif t == "host" and rec.get("state") == "unreachable":
            st.unreachable[str(rec.get("name"))] = str(rec.get("reason") or "")
            yield {**rec, "scan_id": sid}
    for run, n in sorted(started.items()):
        s = finished.get(run)
        done = None if s is None else (s.get("results") or 0) + (s.get("tallied") or 0)
        if done != n:
            st.incomplete.append(run)
    paired: set[tuple[str, str, str, str]] = set()
    for rec in join.pairs():
        rec = {"type": "pair", "scan_id": sid, **{k: v for k, v in rec.items() if k != "type"}}
        st.pairs[rec["verdict"]] += 1
        if rec["verdict"] in ("one-way", "fail") and len(st.short) < 10_000:
            st.short.append(rec)
        if rec["verdict"] != "pass" and st.failed:
            paired.add((rec["req"], rec.get("af") or "ipv4", rec["a"], rec["b"]))
        yield rec
    for (req, af, src, dst, proto), (ports, reason) in st.failed.items():
        if (req, af, *sorted((src, dst))) not in paired:
            st.unpaired.append({"req": req, "af": af, "src": src, "dst": dst, "proto": proto,
                                "ports": ports, "reason": reason})  # fmt: skip
    yield summary_record(
        sid,
        st.planned if planned is None else planned,
        st.results,
        dict(st.states),
        time.perf_counter() - t0,
        verdicts={k: st.verdicts.get(k, 0) for k in ("pass", "fail", "unknown")},
        pairs={k: st.pairs.get(k, 0) for k in ("pass", "fail", "one-way", "unknown")},
        hosts={"total": len(st.sources), "unreachable": sorted(st.unreachable)},
        **({"tallied": st.tallied} if st.tallied else {}),
        join={"runs": len(st.runs), "witness": st.witness, "incomplete": st.incomplete},
    )


SHORT_CAP = 200  # pairs listed per kind on stderr; the NDJSON has them all
FAILED_CAP = 100_000  # failing directions remembered for the unpaired list (memory bound)


def _failed(st: JoinStats, rec: dict[str, Any]) -> None:
    """Remember a failing flow's direction: it is listed when no pair record covers it."""
    dst = str(rec.get("host") or rec.get("dst"))
    af = rec.get("af") or ("ipv6" if ":" in str(rec.get("dst") or "") else "ipv4")
    key = (str(rec.get("req") or "-"), str(af), str(rec.get("src_host")), dst,
           str(rec.get("proto")))  # fmt: skip
    got = st.failed.get(key)
    if got is None:
        if len(st.failed) >= FAILED_CAP:
            st.unpaired_more += 1
            return
        reason = rec.get("verdict_reason") or f"{rec.get('state')} ({rec.get('reason')})"
        got = st.failed[key] = [[], str(reason)]
    if rec.get("port") is not None and len(got[0]) < 8:
        got[0].append(rec["port"])


def human_summary(st: JoinStats) -> list[str]:
    """The mesh's stderr summary for a joined run: totals, one-way pairs, two-way failures."""
    v, p = st.verdicts, st.pairs
    out = [
        f"portmesh report --join: {len(st.runs)} check files, {len(st.sources)} hosts, "
        f"{st.results + st.tallied}/{st.planned} flows: {v.get('pass', 0)} pass, {v.get('fail', 0)} fail, "
        f"{v.get('unknown', 0)} unknown; pairs: {p.get('pass', 0)} pass, "
        f"{p.get('one-way', 0)} one-way, {p.get('fail', 0)} fail, {p.get('unknown', 0)} unknown"
    ]
    for run in st.incomplete:
        out.append(f"INCOMPLETE check run {run}: its summary is missing or short of its plan")
    for name, reason in sorted(st.unreachable.items()):
        out.append(f"UNREACHABLE {name}: {reason}")
    for kind, verdict in (("ONE-WAY", "one-way"), ("FAIL   ", "fail")):
        items = [r for r in st.short if r["verdict"] == verdict]
        for r in items[:SHORT_CAP]:
            port = r.get("ports") or r.get("port")
            what = r["proto"] if port is None else f"{r['proto']}/{port}"
            out.append(
                f"{kind} {r['req']:<26} {what:<16} {r['a']} <-> {r['b']}: {r.get('reason', '')}"
            )
        if len(items) > SHORT_CAP:
            out.append(f"{kind} ... and {len(items) - SHORT_CAP} more (see the pair records)")
    # failing directions no pair record holds: the reverse is not planned (etcd.peer from a
    # non-etcd node), or the destination is no mesh host (a VIP, a registry)
    for r in st.unpaired[:SHORT_CAP]:
        ports = ",".join(str(x) for x in sorted(set(r["ports"])))
        what = r["proto"] if not ports else f"{r['proto']}/{ports}"
        af = " (IPv6)" if r["af"] == "ipv6" else ""
        out.append(
            f"FAIL    {r['req']:<26} {what:<16} {r['src']} -> {r['dst']}{af}: {r['reason']}"
            " (one direction planned)"
        )
    more = len(st.unpaired) - SHORT_CAP + st.unpaired_more
    if more > 0:
        out.append(f"FAIL    ... and {more} more failing directions (see the result records)")
    return out
