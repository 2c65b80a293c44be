"""``portmesh report``: NDJSON results -> text, HTML, a firewall fix script, or ECS NDJSON.

    config = ReportConfig(inputs=["mesh.ndjson"], fmt="text")
    code = run_report(config, out=sys.stdout.buffer, err=sys.stderr)

The input is streamed once. For ``ecs`` every result is converted as it is read (memory O(1));
for the other views the records are folded into an Aggregate (memory O(hosts^2 x
requirements), never O(lines)) and rendered at the end. Exit code of the text report: 0 when
the input holds no failure, 1 when it holds any (as ``check``); the exports (html, ecs, --fix)
exit 0 when they were written, failures or not; bad input raises InputError (exit 2).

May import: core. (It reads NDJSON, not the engine's objects.)
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from scanner.core.results import encode
from scanner.errors import InputError
from scanner.report.aggregate import Aggregate, derive_verdict
from scanner.report.ecs import write_ecs
from scanner.report.fix import check_nft_name, parse_nft_table, render_fix
from scanner.report.html import render_html
from scanner.report.reader import ReadStats, read_records
from scanner.report.text import render_text

FORMATS = ("text", "html", "ecs", "ndjson")
FIX_KINDS = ("nftables", "iptables", "firewalld")


@dataclass
class ReportConfig:
    inputs: list[str] = field(default_factory=lambda: ["-"])
    fmt: str = "text"  # one of FORMATS
    fix: str | None = None  # one of FIX_KINDS: output the fix script instead of a view
    nft_table: str = "inet filter"  # "[family] name" of the table the nftables fix inserts into
    nft_chain: str = "input"
    title: str | None = None  # html page title

    def validate(self) -> ReportConfig:
        if self.fmt not in FORMATS:
            raise InputError(f"--format {self.fmt!r}: choose one of {', '.join(FORMATS)}")
        if self.fix is not None and self.fix not in FIX_KINDS:
            raise InputError(f"--fix {self.fix!r}: choose one of {', '.join(FIX_KINDS)}")
        if not self.inputs:
            raise InputError("no input: give NDJSON files or '-' for stdin")

        parse_nft_table(self.nft_table)
        check_nft_name("--nft-chain", self.nft_chain)
        return self


def aggregate(
    inputs: list[str],
    stats: ReadStats | None = None,
    records: Iterable[dict[str, Any]] | None = None,
) -> tuple[Aggregate, ReadStats]:
    """Read and fold every input; InputError when nothing usable was found."""
    stats = stats or ReadStats()
    agg = Aggregate().feed(records if records is not None else read_records(inputs, stats))
    _require_records(inputs, stats)
    return agg, stats


def _require_records(inputs: list[str], stats: ReadStats) -> None:
    if stats.records == 0:
        where = ", ".join("<stdin>" if p == "-" else p for p in inputs)
        extra = f"; {stats.notes()[0]}" if stats.notes() else ""
        raise InputError(
            f"no portmesh records in {where} ({stats.lines} lines, {stats.malformed} malformed{extra})"
        )


def run_report(
    config: ReportConfig,
    out: IO[bytes],
    err: IO[str] | None = None,
    records: Iterable[dict[str, Any]] | None = None,
    stats: ReadStats | None = None,
) -> int:
    """Write the report to ``out``; notes about damaged input go to ``err``. Returns the exit code.

    ``records`` (with the ``stats`` its reader fills): a record stream to report on instead of
    reading ``config.inputs`` (``portmesh report --join`` passes the joined run).
    """
    config.validate()
    err = err if err is not None else sys.stderr
    stats = stats if stats is not None else ReadStats()
    recs = records if records is not None else read_records(config.inputs, stats)
    if config.fix is None and config.fmt == "ndjson":
        failures = 0
        for rec in recs:
            if rec.get("type") == "result" and derive_verdict(rec) == "fail":
                failures += 1
            out.write(encode(rec))
        _require_records(config.inputs, stats)
        _notes(stats, err)
        return 1 if failures else 0
    if config.fix is None and config.fmt == "ecs":
        tallied = [0]
        write_ecs(_count_tallied(recs, tallied), out)
        _require_records(config.inputs, stats)
        _notes(stats, err)
        if tallied[0]:  # --emit failures: the passing flows were counted, not listed
            err.write(
                f"portmesh report: the input tallies {tallied[0]} passing flows "
                "(--emit failures): counted, not listed, so they have no ECS events\n"
            )
        return 0  # an export: written is success, whatever it holds

    agg, stats = aggregate(config.inputs, stats, recs)
    if config.fix is not None:
        out.write(render_fix(agg, config.fix, config.nft_table, config.nft_chain).encode())
    elif config.fmt == "html":
        out.write(render_html(agg, stats, title=config.title).encode())
    else:
        for line in render_text(agg, stats):
            out.write(line.encode() + b"\n")
    if config.fix is not None or config.fmt != "text":
        _notes(stats, err)  # the text view prints them itself
        return 0  # an export (html, --fix): written is success, whatever it holds
    return 1 if agg.failures else 0


def _count_tallied(recs: Iterable[dict[str, Any]], tallied: list[int]) -> Iterator[dict[str, Any]]:
    """The records unchanged; ``tallied[0]`` sums the flows their tally records count."""
    for rec in recs:
        if rec.get("type") == "tally":
            tallied[0] += int(rec.get("flows") or 0)
        yield rec


def _notes(stats: ReadStats, err: IO[str]) -> None:
    for note in stats.notes():
        err.write(f"portmesh report: {note}\n")


__all__ = ["FIX_KINDS", "FORMATS", "ReportConfig", "aggregate", "run_report"]
