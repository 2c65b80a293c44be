"""`portmesh check`: probe the planned flows whose source is this host; verdict per flow."""

from __future__ import annotations

import sys

import click

from scanner.commands.common import emit_option, engine_options, output_options
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
    from scanner.commands.common import build_engine_config, build_output, parse_only
    from scanner.engine.check import CheckConfig, run_check
    from scanner.errors import InputError

    engine = build_engine_config(opts)
    only = parse_only(opts["only"])
    if from_host is None:
        from scanner.plan.inventory import local_host

        _, site0, _ = selection_opts.resolve()
        h = local_host(site0)
        if h is None:
            raise InputError(
                "this host is not in the inventory (no local address matches): name it with --from NAME"
            )
        from_host = h.name
    catalog, site, selection = selection_opts.resolve(sources=[from_host], scanner=from_host)
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
