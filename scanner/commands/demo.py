"""`portmesh demo`: the built-in demonstration (see scanner.lab.demo)."""

from __future__ import annotations

import click

from scanner.lab.addressing import check_name


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-o",
    "--output",
    default=None,
    metavar="FILE",
    help="Also write the NDJSON results to FILE (as -o does for scan and mesh).",
)
@click.option(
    "--name",
    default="pmdemo",
    show_default=True,
    metavar="NAME",
    help="The lab's name; an existing lab of that name is left alone (the demo refuses).",
)
@click.option("--loopback", is_flag=True, help="Run the loopback demo even as root.")
@click.option(
    "--keep",
    is_flag=True,
    help="Leave the lab up afterwards (remove with `portmesh lab down --name NAME`).",
)
def command(output: str | None, name: str, loopback: bool, keep: bool) -> int:
    """A 4-host cluster with injected firewall faults, checked from every host.

    As root: network namespaces and nftables. Otherwise: loopback, TCP and UDP only.
    The story and the report go to stderr; the NDJSON to stdout when it is a file or a pipe
    (not to a terminal), and with -o FILE also to FILE.
    """
    # lazy: the library loads after option parsing, so `portmesh demo --help` and bad options
    # cost ~0.05 s CPU instead of ~0.26 s with these imports at the top (measured, median of 10)
    from scanner.lab.demo import DemoConfig, run_demo

    check_name("lab", name)
    return run_demo(DemoConfig(output=output, force_loopback=loopback, keep=keep, name=name))
