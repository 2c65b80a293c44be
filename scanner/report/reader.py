"""Stream NDJSON records from files or stdin, line by line, tolerating damage.

A report reads what ``scan``, ``check`` and ``mesh`` wrote, possibly hundreds of thousands of
lines and possibly cut short (a killed run leaves a truncated last line). Nothing here keeps more
than one line in memory; damage is counted and the first few line numbers are kept for the
report, never raised.
"""

from __future__ import annotations

import gzip
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import orjson

from scanner.errors import InputError

# The record types the report understands; anything else (plan's "flow", agent chatter) is
# counted as ignored, not as damage.
KNOWN_TYPES = ("start", "result", "host", "pair", "summary", "tally", "watch")
# Fields without which a result record cannot be placed in the report.
RESULT_FIELDS = ("dst", "proto", "state")
MAX_BAD_SAMPLES = 5


@dataclass
class ReadStats:
    """What the reader saw, for the report's header and its stderr notes."""

    lines: int = 0
    records: int = 0
    malformed: int = 0
    ignored: int = 0
    truncated: str | None = None  # "file:line" of a truncated last line, if any
    bad: list[tuple[str, int, str]] = field(default_factory=list)  # (source, line, why), first few

    def note_bad(self, source: str, lineno: int, why: str) -> None:
        self.malformed += 1
        if len(self.bad) < MAX_BAD_SAMPLES:
            self.bad.append((source, lineno, why))

    def notes(self) -> list[str]:
        out = []
        if self.malformed:
            where = "; ".join(f"{s}:{n}: {w}" for s, n, w in self.bad)
            more = (
                ""
                if self.malformed <= len(self.bad)
                else f"; +{self.malformed - len(self.bad)} more"
            )
            out.append(f"{self.malformed} malformed line(s) skipped ({where}{more})")
        if self.truncated:
            out.append(f"truncated last line ignored ({self.truncated})")
        return out


def _open(path: str) -> tuple[str, IO[bytes]]:
    if path == "-":
        return "<stdin>", sys.stdin.buffer
    try:
        if path.endswith(".gz"):
            return path, gzip.open(path, "rb")  # type: ignore[return-value]
        return path, open(path, "rb")  # noqa: SIM115 (closed by the caller)
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None


def _why(rec: Any) -> str | None:
    """None when the parsed value is a usable record, else a short reason."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    t = rec.get("type")
    if not isinstance(t, str):
        return "no 'type' field"
    if t == "result":
        for f in RESULT_FIELDS:
            if not isinstance(rec.get(f), str):
                return f"result without '{f}'"
        port = rec.get("port")
        if port is not None and (not isinstance(port, int) or not 0 <= port <= 65535):
            return "result with a bad 'port'"
    elif t == "pair":
        for f in ("a", "b"):
            if not isinstance(rec.get(f), str):
                return f"pair without '{f}'"
    elif t == "host" and not isinstance(rec.get("name"), str):
        return "host without 'name'"
    elif t == "tally":
        for f in ("src_host", "host", "proto"):
            if not isinstance(rec.get(f), str):
                return f"tally without '{f}'"
        n = rec.get("flows")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            return "tally with a bad 'flows'"
        if rec.get("ports") is not None and not isinstance(rec.get("ports"), str):
            return "tally with a bad 'ports'"
    return None


def iter_lines(
    source: str, stream: Iterable[bytes], stats: ReadStats, extra: tuple[str, ...] = ()
) -> Iterator[dict[str, Any]]:
    """Parse one stream; yield the usable records and count the rest in ``stats``.

    ``extra``: record types to pass through besides KNOWN_TYPES (``--join`` reads ``witness``).
    """
    pending: tuple[int, bytes] | None = None  # the previous line, held back one step
    for lineno, raw in enumerate(stream, 1):
        stats.lines += 1
        if pending is not None:
            rec = _parse(source, *pending, stats, last=False, extra=extra)
            if rec is not None:
                yield rec
        pending = (lineno, raw)
    if pending is not None:
        rec = _parse(source, *pending, stats, last=True, extra=extra)
        if rec is not None:
            yield rec


def _parse(
    source: str, lineno: int, raw: bytes, stats: ReadStats, last: bool, extra: tuple[str, ...] = ()
) -> dict[str, Any] | None:
    line = raw.strip()
    if not line:
        return None
    try:
        rec = orjson.loads(line)
    except orjson.JSONDecodeError:
        if last and not raw.endswith(b"\n"):
            # A killed writer leaves half a line at the end: expected, not damage.
            stats.truncated = f"{source}:{lineno}"
        else:
            stats.note_bad(source, lineno, "not JSON")
        return None
    why = _why(rec)
    if why is not None:
        stats.note_bad(source, lineno, why)
        return None
    if rec["type"] not in KNOWN_TYPES and rec["type"] not in extra:
        stats.ignored += 1
        return None
    stats.records += 1
    return rec


def read_records(
    paths: Iterable[str], stats: ReadStats, extra: tuple[str, ...] = ()
) -> Iterator[dict[str, Any]]:
    """Every usable record of every path ('-' is stdin), in order, streamed."""
    for path in paths:
        name, fh = _open(path)
        try:
            yield from iter_lines(name, fh, stats, extra)
        except OSError as e:
            raise InputError(f"cannot read {path}: {e.strerror or e}") from None
        finally:
            if fh is not sys.stdin.buffer:
                fh.close()
