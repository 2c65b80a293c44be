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
    """A batch of result lines as one bytes object (written with one write call)."""
    return b"".join(
        orjson.dumps(result_dict(r, scan_id), option=orjson.OPT_APPEND_NEWLINE) for r in results
    )


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
