"""`portmesh mesh`: an agent on every host, every host probes every peer, pairs joined."""

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

# engine options a mesh does not take: agents probe from their own host with one event loop
MESH_EXCLUDES = ("source", "workers")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@selection_options
@click.option(
    "--exec",
    "exec_template",
    default=None,
    metavar="TEMPLATE",
    help="How a command reaches a host; placeholders {name} {address} {user} {cluster} "
    "(default: ssh -o BatchMode=yes [{user}@]{address}; in a lab: `portmesh lab status`).",
)
@click.option(
    "--agent-cmd",
    default=None,
    metavar="CMD",
    help="The agent command run after the exec template on every host (default: this "
    "Python's `-m scanner agent` through a local template such as `ip netns exec`, "
    "else `portmesh agent`).",
)
@click.option(
    "--bundle",
    default=None,
    metavar="DIR",
    help="Air-gapped hosts: copy the wheels in DIR over the exec channel and run from them.",
)
@click.option(
    "--bundle-python",
    default="python3",
    show_default=True,
    metavar="PYTHON",
    help="The Python (3.10+) on the hosts that runs a --bundle.",
)
@click.option(
    "--ttl",
    type=float,
    default=None,
    metavar="SECONDS",
    help="Responders' own time limit (default 3600; they end with their agent anyway).",
)
@click.option(
    "--hello-timeout",
    type=float,
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    help="Time for an agent to start and answer (exec, login, interpreter start).",
)
@click.option(
    "--forks",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    metavar="N",
    help="Agents being started (exec, login, bundle copy) at once.",
)
@engine_options(exclude=MESH_EXCLUDES)
@output_options
@emit_option
def command(
    selection_opts: SelectionOptions,
    exec_template: str | None,
    agent_cmd: str | None,
    bundle: str | None,
    bundle_python: str,
    ttl: float | None,
    hello_timeout: float,
    forks: int,
    emit: str,
    **opts,
) -> int:
    """Probe every planned flow from every host while every host responds; join both ends.

    One NDJSON result per flow (from every source), one pair record per host pair and
    requirement planned in both directions (pass, fail, one-way, unknown), then a summary.
    --concurrency and --rate are totals, divided among the agents. Each run makes its own
    secret; --secret / --secret-file use a given one instead, so that responders already
    running with it (`portmesh lab up`, `portmesh respond`) answer the agents' probes too.
    Exit 0 all pass, 1 any failure or unreachable host, 2 bad input, 130 interrupted.
    """
    # lazy: the library loads after option parsing, so `portmesh mesh --help` and bad options
    # cost ~0.06 s CPU instead of ~0.24 s with these imports at the top (measured, median of 10)
    from scanner.mesh import transport
    from scanner.mesh.coordinator import DEFAULT_TTL, MeshConfig, run_mesh

    # not offered: agents probe from their own host with one loop
    opts.update(dict.fromkeys(MESH_EXCLUDES))
    engine = build_engine_config(opts)
    if exec_template is not None:
        transport.check_template(exec_template)
    if bundle is None and agent_cmd is not None:
        transport.check_template(agent_cmd)
    ttl = DEFAULT_TTL if ttl is None else ttl
    if not 0 < ttl <= 7 * 86400:
        raise InputError(f"--ttl: {ttl:g} is not within (0, 604800] seconds")
    if not hello_timeout > 0:
        raise InputError("--hello-timeout must be > 0")
    catalog, site, selection = selection_opts.resolve()
    check_site_hosts(site, opts["max_hosts"])
    if bundle is not None:
        transport.bundle_payload(bundle)  # fail early, before any host is contacted
    cfg = MeshConfig(
        catalog=catalog,
        site=site,
        selection=selection,
        exec_template=exec_template,
        agent_cmd=agent_cmd,
        bundle=bundle,
        bundle_python=bundle_python,
        engine=engine,
        output=build_output(opts),
        argv=["portmesh", *sys.argv[1:]],
        ttl=ttl,
        hello_timeout=hello_timeout,
        forks=forks,
        loop=opts["loop"],
        only=parse_only(opts["only"]),
        progress=opts["progress"] if opts["progress"] is not None else sys.stderr.isatty(),
        emit=emit,
    )
    return run_mesh(cfg)
