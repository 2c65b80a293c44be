"""The result record and its NDJSON encoding: one type, serialised in one place.

Record types (field ``type``), all versioned by ``version`` in the start record:
  start    first line of every run
  result   one per planned flow, always exactly one
  host     a host-level event (mesh: unreachable agent), optional
  pair     mesh: both directions of a requirement between two hosts
  summary  last line: planned == results always

The JSON Schema of these records ships as ``scanner/schema.json``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from scanner import SCHEMA_VERSION
from scanner.core.flows import Flow

# nmap's state words, plus "error" for a probe that could not be made and "skipped"-like
# situations reported as error with a reason (e.g. needs-cap-net-raw).
STATES = ("open", "closed", "filtered", "open|filtered", "error")
VERDICTS = ("pass", "fail", "unknown")


@dataclass(slots=True)
class Result:
    """The outcome of one flow."""

    flow: Flow
    state: str
    reason: str
    rtt_ms: float | None = None
    attempts: int = 1
    ts: float = field(default_factory=time.time)
    verdict: str | None = None
    extra: dict[str, Any] | None = None
    # the flow as planned, when the engine probed another: a host-name destination resolved
    # to ``flow.dst`` (not serialised: the record says the address it probed and the host)
    planned: Flow | None = None


class _Clock:
    """ISO-8601 UTC timestamps with milliseconds; the per-second prefix is cached (hot path)."""

    __slots__ = ("_sec", "_prefix")

    def __init__(self) -> None:
        self._sec = -1
        self._prefix = ""

    def __call__(self, t: float) -> str:
        # whole milliseconds, truncated; the 1 us nudge undoes float error (x.123 is stored as
        # x.12299999...), which (t - int(t)) * 1000 would turn into .122
        sec, ms = divmod(int(t * 1000 + 0.001), 1000)
        if sec != self._sec:
            self._sec = sec
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{self._prefix}.{ms:03d}Z"


iso_ts = _Clock()


def result_dict(r: Result, scan_id: str) -> dict[str, Any]:
    """The documented field set of a result record (see README, 'Output schema')."""
    f = r.flow
    d: dict[str, Any] = {
        "type": "result",
        "scan_id": scan_id,
        "ts": iso_ts(r.ts),
        "src": f.src,
        "dst": f.dst,
        "af": f.af,
        "host": f.host,
        "proto": f.proto,
        "port": f.port,
        "state": r.state,
        "reason": r.reason,
        "rtt_ms": None if r.rtt_ms is None else round(r.rtt_ms, 3),
        "attempts": r.attempts,
    }
    if f.src_host is not None:
        d["src_host"] = f.src_host
    if f.req is not None:
        d["req"] = f.req
    if r.verdict is not None:
        d["verdict"] = r.verdict
    if r.extra:
        d.update(r.extra)
    return d


def encode(record: dict[str, Any]) -> bytes:
    """One NDJSON line (with the trailing newline)."""
    return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)


def encode_results(results: Iterable[Result], scan_id: str) -> bytes:
    """A batch of result lines as one bytes object (written with one write call): each line
    is byte for byte ``encode(result_dict(r, scan_id))``.

    The hot path of every sweep (issue 16: a third of an agent's probing thread went to
    result_dict + orjson per line). The parts of a line that repeat are JSON-encoded once, by
    orjson, and cached: a flow's static fields (src, dst, af, host, proto / src_host, req), a
    (state, reason), a verdict, an extra field's string value. A line is those fragments and
    the per-result numbers (ts, port, rtt_ms, attempts) in one f-string, in result_dict's key
    order. Anything this does not know to be exact goes through result_dict + orjson instead
    (``_line``): an extra field outside _FAST_EXTRAS, a value of another type, an rtt_ms whose
    float orjson might write otherwise than repr (``_RTT_REPR``). tests/test_results_encode.py
    compares the two over generated results."""
    return _Lines(scan_id).join(results)


# Extra fields (Result.extra) the fast path writes itself: "src" replaces the flow's src in
# its place (dict.update keeps a key's position); the others are not result_dict keys, so
# they follow the verdict in the extra's own order, as dict.update appends them.
_FAST_EXTRAS = frozenset({"i", "verdict_reason", "icmp_from", "tcp_method"})
_INT_MAX = 1 << 63  # orjson writes ints up to 2**64-1; below 2**63 is safe in every version
_CACHE_MAX = 65536  # entries per cache; cleared when full (memory stays O(1) in flows)
_J: dict[str, str] = {}  # str value -> its JSON text (as orjson writes it)
_FLOWS: dict[tuple[Any, ...], tuple[str, str]] = {}  # static flow fields -> 2 fragments
_STATES: dict[tuple[str, str], str] = {}  # (state, reason) -> fragment
_VERDICTS: dict[str | None, str] = {None: ""}


def _rtt_repr_is_orjsons() -> bool:
    """Whether repr() writes a rounded rtt_ms (0.0, -0.0, or 0.001 <= |x| < 1e15) as the
    installed orjson does (shortest round-trip digits, no exponent in that range). Checked
    once; if not, every rtt goes through orjson."""
    probes = (0.0, -0.0, 0.001, 0.5, 12.346, 1234567.891, 123456789012.345, 999999999999999.9)
    return all(repr(x).encode() == orjson.dumps(x) for x in probes)


_RTT_REPR = _rtt_repr_is_orjsons()


def _js(v: Any) -> str | None:
    """The JSON text of a str value (cached), "null" for None; None for any other type (the
    caller falls back to orjson)."""
    if v is None:
        return "null"
    if type(v) is not str:
        return None
    t = _J.get(v)
    if t is None:
        if len(_J) >= _CACHE_MAX:
            _J.clear()
        t = _J[v] = orjson.dumps(v).decode()
    return t


class _Decline(Exception):
    """A result the fast path leaves to result_dict + orjson."""


class _Lines:
    """encode_results for one batch (``join``)."""

    __slots__ = ("scan_id", "head")

    def __init__(self, scan_id: str) -> None:
        self.scan_id = scan_id
        sid = _js(scan_id)
        self.head = None if sid is None else '{"type":"result","scan_id":' + sid + ',"ts":"'

    def join(self, results: Iterable[Result]) -> bytes:
        head = self.head
        if head is None:
            return b"".join(self._line(r).encode() for r in results)
        flows, states, verdicts = _FLOWS, _STATES, _VERDICTS
        line = self._line
        out: list[str] = []
        add = out.append
        last_ms = -1
        ts = ""
        for r in results:
            try:
                text = None
                f = r.flow
                extra = r.extra
                src = f.src
                tail = ""
                if extra:
                    for k, v in extra.items():
                        if k == "src":
                            src = v
                        elif k not in _FAST_EXTRAS:
                            break
                        elif type(v) is int:
                            if not 0 <= v < _INT_MAX:
                                break
                            tail += f',"{k}":{v}'
                        else:
                            t = _js(v)
                            if t is None:
                                break
                            tail += f',"{k}":{t}'
                    else:
                        extra = None
                    if extra:  # the loop broke: not a line the fast path writes
                        raise _Decline
                # (a src of another type from an extra is no key of _FLOWS: a miss, then
                # _flow_fragments declines it; unhashable values raise TypeError: line(r))
                key = (src, f.dst, f.fam, f.host, f.proto, f.src_host, f.req)
                frags = flows.get(key) or _flow_fragments(key, f.af)
                sr = states.get((r.state, r.reason)) or _state_fragment(r.state, r.reason)
                vd = verdicts.get(r.verdict)
                if vd is None:
                    vd = _verdict_fragment(r.verdict)
                port = f.port
                if port is None:
                    port = "null"
                elif type(port) is not int or not 0 <= port < _INT_MAX:
                    frags = None
                attempts = r.attempts
                if type(attempts) is not int or not 0 <= attempts < _INT_MAX:
                    frags = None
                rtt = r.rtt_ms
                if rtt is None:
                    rtt = "null"
                elif type(rtt) is float and _RTT_REPR:
                    x = round(rtt, 3)
                    if 0.001 <= x < 1e15 or x == 0.0 or -1e15 < x <= -0.001:
                        rtt = repr(x)
                    else:
                        frags = None
                else:
                    frags = None
                if frags is not None and sr is not None and vd is not None:
                    t = r.ts
                    ms = int(t * 1000 + 0.001)  # iso_ts's own millisecond: same ms, same text
                    if ms != last_ms:
                        ts = iso_ts(t)
                        last_ms = ms
                    text = (
                        f'{head}{ts}{frags[0]}{port},{sr}{rtt},"attempts":{attempts}'
                        f"{frags[1]}{vd}{tail}}}\n"
                    )
            except (TypeError, _Decline):  # orjson's own TypeError is raised by line(r)
                text = None
            add(line(r) if text is None else text)
        return "".join(out).encode()

    def _line(self, r: Result) -> str:
        return orjson.dumps(result_dict(r, self.scan_id), option=orjson.OPT_APPEND_NEWLINE).decode()


def _flow_fragments(key: tuple[Any, ...], af: str) -> tuple[str, str] | None:
    """The cached text of a flow's static fields: from ts's closing quote to port's colon, and
    the src_host/req tail; None if a field is not a str (or None)."""
    src, dst, _fam, host, proto, src_host, req = key
    js = [_js(v) for v in (src, dst, af, host, proto)]
    if None in js or (tail := _opt_fields(src_host, req)) is None:
        return None
    s, d, a, h, p = js
    frags = (f'","src":{s},"dst":{d},"af":{a},"host":{h},"proto":{p},"port":', tail)
    if len(_FLOWS) >= _CACHE_MAX:
        _FLOWS.clear()
    _FLOWS[key] = frags
    return frags


def _opt_fields(src_host: Any, req: Any) -> str | None:
    out = ""
    for name, v in (("src_host", src_host), ("req", req)):
        if v is not None:
            t = _js(v)
            if t is None:
                return None
            out += f',"{name}":{t}'
    return out


def _state_fragment(state: Any, reason: Any) -> str | None:
    s, why = _js(state), _js(reason)
    if s is None or why is None:
        return None
    frag = f'"state":{s},"reason":{why},"rtt_ms":'
    if len(_STATES) >= _CACHE_MAX:
        _STATES.clear()
    _STATES[(state, reason)] = frag
    return frag


def _verdict_fragment(verdict: Any) -> str | None:
    t = _js(verdict)
    if t is None or verdict is None:
        return None
    frag = f',"verdict":{t}'
    if len(_VERDICTS) >= 64:
        _VERDICTS.clear()
        _VERDICTS[None] = ""
    _VERDICTS[verdict] = frag
    return frag


def start_record(
    scan_id: str, argv: list[str], planned: int | None, **extra: Any
) -> dict[str, Any]:
    d: dict[str, Any] = {
        "type": "start",
        "version": SCHEMA_VERSION,
        "scan_id": scan_id,
        "ts": iso_ts(time.time()),
        "argv": argv,
        "planned": planned,
    }
    d.update(extra)
    return d


def summary_record(
    scan_id: str,
    planned: int,
    results: int,
    states: dict[str, int],
    elapsed_s: float,
    **extra: Any,
) -> dict[str, Any]:
    d: dict[str, Any] = {
        "type": "summary",
        "scan_id": scan_id,
        "ts": iso_ts(time.time()),
        "planned": planned,
        "results": results,
        "states": states,
        "elapsed_s": round(elapsed_s, 4),
        "rate_pps": None,
    }
    d.update(extra)
    # flows decided per second: under --emit failures the passing flows are tallied, not
    # written, so the rate counts results + tallied (== planned), not the lines written
    decided = results + int(extra.get("tallied") or 0)
    d["rate_pps"] = round(decided / elapsed_s, 1) if elapsed_s > 0 else None
    return d


def new_scan_id() -> str:
    return os.urandom(8).hex()
