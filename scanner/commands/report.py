"""`portmesh report`: turn NDJSON results (scan, check, mesh) into a report."""

from __future__ import annotations

import contextlib
import gzip
import os
import sys

import click

from scanner.errors import InputError


@click.command(name="report")
@click.argument("inputs", nargs=-1, metavar="[FILE|-]...")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "html", "ecs", "ndjson"]),
    default="text",
    show_default=True,
    help="text: findings + matrix; html: one self-contained page; ecs: Elastic Common Schema NDJSON; ndjson: portmesh's own records (with --join: the joined mesh run).",
)
@click.option(
    "--join",
    is_flag=True,
    help="The inputs are per-host `check` files of one mesh (and the responders' files, for the witness): join them into one run with the pair records and one-way verdicts of `portmesh mesh`; a mesh-style summary goes to stderr.",
)
@click.option(
    "--fix",
    type=click.Choice(["nftables", "iptables", "firewalld"]),
    default=None,
    help="Instead of a view, write a shell script (to review, never applied) that opens the failing flows per destination host.",
)
@click.option(
    "--nft-table",
    default="inet filter",
    show_default=True,
    help="[family] name of the table whose chain the nftables fix inserts into.",
)
@click.option(
    "--nft-chain",
    default="input",
    show_default=True,
    help="The chain the nftables fix inserts its accept rules at the head of.",
)
@click.option("-o", "--output", default=None, metavar="FILE", help="Write here instead of stdout.")
@click.option("--title", default=None, help="Title of the HTML page.")
def command(
    inputs: tuple[str, ...],
    fmt: str,
    fix: str | None,
    nft_table: str,
    nft_chain: str,
    output: str | None,
    title: str | None,
    join: bool,
) -> int:
    """Report on NDJSON from `scan`, `check` or `mesh` (files, or stdin: `portmesh mesh ... | portmesh report`).

    Exit (text): 0 when the input holds no failure, 1 when it holds any. Exports (--format
    html/ecs, --fix) exit 0 once written. 2 on bad input.
    """
    # lazy: the library loads after option parsing, so `portmesh report --help` and bad options
    # cost ~0.05 s CPU instead of ~0.09 s with these imports at the top (measured, median of 10)
    from scanner.report import ReportConfig, run_report

    paths = list(inputs)
    if not paths:
        if sys.stdin is None or sys.stdin.isatty():
            raise InputError(
                "no input: give NDJSON files, or pipe them in (e.g. portmesh mesh ... | portmesh report)"
            )
        paths = ["-"]
    config = ReportConfig(
        inputs=paths, fmt=fmt, fix=fix, nft_table=nft_table, nft_chain=nft_chain, title=title
    ).validate()

    def run(out) -> int:
        if not join:
            return run_report(config, out)
        return _joined(config, out)

    if output is None:
        return run(sys.stdout.buffer)
    # write next to the target and rename, so a failed run leaves no half-written report
    tmp = f"{output}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            code = run(fh)
        if fix is not None:
            os.chmod(tmp, 0o755)
        os.replace(tmp, output)
    except OSError as e:
        raise InputError(f"cannot write {output}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return code


def _joined(config, out) -> int:
    """``--join``: per-host check files -> one mesh run (scanner.mesh.join), then the view."""
    # lazy: as in command() above (`portmesh report --help` stays light)
    from scanner.mesh.join import JOIN_TYPES, JoinStats, human_summary, join_records
    from scanner.report import run_report
    from scanner.report.reader import ReadStats, read_records

    hosts, planned = _starts(config.inputs)
    stats, jstats = ReadStats(), JoinStats()
    records = join_records(
        read_records(config.inputs, stats, extra=JOIN_TYPES),
        hosts,
        ["portmesh", *sys.argv[1:]],
        planned=planned,
        stats=jstats,
    )
    code = run_report(config, out, records=records, stats=stats)
    for line in human_summary(jstats):
        sys.stderr.write(line + "\n")
    return code


def _starts(paths: list[str]) -> tuple[list[str], int]:
    """(the hosts that probed, the sum of their planned flows), from each check file's first
    line, its start record ({"check": {"host": NAME}}); files without one (a responder's)
    add nothing. InputError when no file is a check run."""
    # lazy: orjson (~20 ms) only with --join, not for `portmesh report --help`
    import orjson

    hosts: list[str] = []
    total = 0
    for p in paths:
        if p == "-":
            raise InputError("--join reads files (one per host), not stdin")
        try:
            with gzip.open(p, "rb") if p.endswith(".gz") else open(p, "rb") as fh:
                first = fh.readline()
        except OSError as e:
            raise InputError(f"cannot read {p}: {e.strerror or e}") from None
        try:
            rec = orjson.loads(first)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or rec.get("type") != "start":
            continue
        host = (rec.get("check") or {}).get("host") if isinstance(rec.get("check"), dict) else None
        if not isinstance(host, str):
            raise InputError(
                f"--join: {p} is not a `portmesh check` run (its start record names no host)"
            )
        if host in hosts:
            raise InputError(f"--join: two check runs from {host!r} ({p})")
        hosts.append(host)
        n = rec.get("planned")
        total += n if isinstance(n, int) else 0
    if not hosts:
        raise InputError("--join: no `portmesh check` file among the inputs (a start record first)")
    return hosts, total
