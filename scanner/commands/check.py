"""`portmesh check`: probe the planned flows whose source is this host; verdict per flow."""

from __future__ import annotations

import sys

import click

from scanner.commands.common import (
    build_engine_config,
    build_output,
    check_site_hosts,
    emit_option,
    engine_options,
    output_options,
    parse_only,
)
from scanner.errors import InputError
from scanner.plan.selection import SelectionOptions, selection_options


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@selection_options
@click.option(
    "--from",
    "from_host",
    default=None,
    metavar="NAME",
    help="This host: its name, NAME@CLUSTER or its address (default: from local addresses).",
)
@click.option(
    "--expect",
    type=click.Choice(["reachable", "listening"]),
    default="reachable",
    show_default=True,
    help="reachable: before install (closed = reachable, passes); listening: after install.",
)
@engine_options
@output_options
@emit_option
def command(
    selection_opts: SelectionOptions, from_host: str | None, expect: str, emit: str, **opts
) -> int:
    """Probe every flow the plan gives this host and say pass, fail or unknown for each.

    Exit 0 when all pass, 1 when any fails, 2 on bad input. Failures are summarised on stderr.
    """
    # lazy: the library loads after option parsing, so `portmesh check --help` and bad options
    # cost ~0.07 s CPU instead of ~0.18 s with these imports at the top (measured, median of 10)
    from scanner.engine.check import CheckConfig, run_check
    from scanner.plan.inventory import local_host

    engine = build_engine_config(opts)
    only = parse_only(opts["only"])
    if from_host is None:
        _, site0, _ = selection_opts.resolve()
        h = local_host(site0)
        if h is None:
            raise InputError(
                "this host is not in the inventory (no local address matches): name it with --from NAME"
            )
        from_host = h.name
    catalog, site, selection = selection_opts.resolve(sources=[from_host], scanner=from_host)
    check_site_hosts(site, opts["max_hosts"])
    cfg = CheckConfig(
        catalog=catalog,
        site=site,
        selection=selection,
        host=selection.scanner or from_host,  # the site's unique name (node1@cluster)
        engine=engine,
        output=build_output(opts),
        expect=expect,
        only=only,
        progress=opts["progress"] if opts["progress"] is not None else sys.stderr.isatty(),
        argv=["portmesh", *sys.argv[1:]],
        loop=opts["loop"],
        workers=opts["workers"],
        emit=emit,
    )
    return run_check(cfg)
