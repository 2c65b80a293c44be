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
    type=click.Choice(["text", "html", "ecs"]),
    default="text",
    show_default=True,
    help="text: findings + matrix; html: one self-contained page; ecs: Elastic Common Schema NDJSON.",
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
) -> int:
    """Report on NDJSON from `scan`, `check` or `mesh` (files, or stdin: `portmesh mesh ... | portmesh report`).

    Exit (text): 0 when the input holds no failure, 1 when it holds any. Exports (--format
    html/ecs, --fix) exit 0 once written. 2 on bad input.
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
    if output is None:
        return run_report(config, sys.stdout.buffer)
    # write next to the target and rename, so a failed run leaves no half-written report
    tmp = f"{output}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            code = run_report(config, fh)
        if fix is not None:
            os.chmod(tmp, 0o755)
        os.replace(tmp, output)
    except OSError as e:
        raise InputError(f"cannot write {output}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return code
