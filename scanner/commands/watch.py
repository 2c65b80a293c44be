"""`portmesh watch`: the continuous port mesh after install, with Prometheus metrics.

portmesh watch -i INVENTORY [--vars FILE] [--as NAME] --secret-file FILE --metrics HOST:PORT
portmesh watch manifests [--image IMAGE] [--namespace NS]   the DaemonSet, RBAC, PrometheusRule
portmesh watch rules                                          the Prometheus alert rules
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from scanner.commands.respond import (
    as_option,
    bind_option,
    check_bind,
    resolve_secret,
    secret_options,
)
from scanner.engine.output import NdjsonOutput
from scanner.errors import InputError
from scanner.plan.inventory import local_host
from scanner.plan.selection import SelectionOptions, resolve_host, selection_options
from scanner.watch import agent, manifests


def parse_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise InputError(f"--metrics: {value!r} is not HOST:PORT (e.g. 0.0.0.0:9470)")
    return check_bind(host), int(port)


# The watch tuning options: (flag, parameter, type, default, help). Every agent must be given
# the same --round, --rate, --neighbours and --chunk: the schedule is computed from them (the
# round's length from the rate), not negotiated.
TUNING = (
    ("--round", "round_seconds", click.FloatRange(min=0.5), agent.DEFAULT_ROUND,
     "Seconds per round (every agent must use the same)."),
    ("--rate", "rate", click.FloatRange(min=0.1), agent.DEFAULT_RATE,
     "Probe budget: probes per second from this node (every agent must use the same)."),
    ("--neighbours", "neighbours", click.IntRange(min=1), agent.DEFAULT_NEIGHBOURS,
     "Peers visited per round (every agent must use the same)."),
    ("--chunk", "chunk", click.IntRange(min=1), agent.DEFAULT_CHUNK,
     "Ports of a long range (NodePorts) per visit (every agent must use the same)."),
    ("--timeout", "timeout", click.FloatRange(min=0.01, max=60), 1.0, "Probe timeout, seconds."),
)  # fmt: skip


def tuning_options(f: Callable) -> Callable:
    for flag, name, kind, default, text in reversed(TUNING):
        f = click.option(flag, name, type=kind, default=default, show_default=True, help=text)(f)
    return f


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@selection_options
@as_option("This node: its name, NAME@CLUSTER or its address (default: from local addresses).")
@secret_options("secret every agent shares", mounted=True)
@click.option(
    "--metrics",
    "metrics",
    metavar="HOST:PORT",
    help="Serve /metrics here (Prometheus text format).",
)
@tuning_options
@bind_option
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=None,
    help="Stop after N rounds (default: run until SIGTERM).",
)
@click.option(
    "-o", "--output", "output", metavar="FILE", help="Also write the NDJSON events to FILE."
)
@click.pass_context
def command(
    ctx: click.Context,
    selection_opts: SelectionOptions,
    as_host: str | None,
    secret: str | None,
    secret_file: str | None,
    metrics: str | None,
    bind: str,
    rounds: int | None,
    output: str | None,
    **tuning: Any,  # TUNING's parameters, handed to WatchConfig as they are
) -> int:
    """Keep checking this node's flows of the plan; serve Prometheus metrics; NDJSON events on
    every state change (stdout). Every agent must be given the same inventory, secret, --round,
    --rate, --neighbours, --chunk and plan options (--vars, --cni, --with, --without, --catalog,
    --nodeport-sample): the schedule is computed from them, not negotiated."""
    if ctx.invoked_subcommand is not None:
        return 0

    if secret is None and secret_file is None:
        raise InputError("watch agents must share a secret: give --secret-file FILE (or --secret)")
    sec, _ = resolve_secret(secret, secret_file)
    hostport = parse_hostport(metrics) if metrics else None
    catalog, site, selection = selection_opts.resolve()
    if as_host is None:
        h = local_host(site)
        if h is None:
            raise InputError(
                "this host is not in the inventory (no local address matches): name it with --as NAME"
            )
        as_host = h.name
    else:
        # the resolver of check --from: a name, NAME@CLUSTER or the host's address
        as_host = resolve_host(site, as_host, "--as")
    cfg = agent.WatchConfig(
        catalog=catalog,
        site=site,
        selection=selection,
        me=as_host,
        secret=sec,
        metrics=hostport,
        bind=check_bind(bind),
        output=NdjsonOutput(output),
        rounds=rounds,
        **tuning,
    )
    return agent.run_watch(cfg)


@command.command("rules", context_settings={"help_option_names": ["-h", "--help"]})
def rules() -> None:
    """Print the Prometheus alert rules (a rule file for rule_files:)."""
    sys.stdout.write(manifests.rules_text())


@command.command("manifests", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--image",
    default="portmesh:latest",
    show_default=True,
    help="Container image with portmesh installed.",
)
@click.option("--namespace", default="portmesh", show_default=True)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=9470,
    show_default=True,
    help="/metrics port on each node.",
)
def manifests_cmd(image: str, namespace: str, port: int) -> None:
    """Print the DaemonSet (hostNetwork), its minimal RBAC and a PrometheusRule."""
    sys.stdout.write(manifests.manifests_text(image=image, namespace=namespace, port=port))
