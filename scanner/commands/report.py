"""`portmesh report`: turn NDJSON results (scan, check, mesh) into a report."""

from __future__ import annotations

import contextlib
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

    Exit 0 when the input holds no failure, 1 when it holds any, 2 on bad input.
    """
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
    from scanner.mesh.join import JOIN_TYPES, JoinStats, human_summary, join_records
    from scanner.report import run_report
    from scanner.report.reader import ReadStats, read_records

    planned = _planned_up_front(config.inputs)
    stats, jstats = ReadStats(), JoinStats()
    records = join_records(
        read_records(config.inputs, stats, extra=JOIN_TYPES),
        ["portmesh", *sys.argv[1:]],
        planned=planned,
        stats=jstats,
    )
    code = run_report(config, out, records=records, stats=stats)
    for line in human_summary(jstats):
        sys.stderr.write(line + "\n")
    return code


def _planned_up_front(paths: list[str]) -> int | None:
    """The sum of the files' start records' planned (first lines), None if one cannot say."""
    import gzip

    import orjson

    total = 0
    for p in paths:
        if p == "-":
            return None
        try:
            with gzip.open(p, "rb") if p.endswith(".gz") else open(p, "rb") as fh:
                first = fh.readline()
        except OSError:
            return None  # the reader reports it
        try:
            rec = orjson.loads(first)
        except orjson.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("type") == "start":
            n = rec.get("planned")
            if not isinstance(n, int):
                return None
            total += n
    return total
