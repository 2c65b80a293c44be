"""`portmesh demo`: the built-in demonstration (see scanner.lab.demo)."""

from __future__ import annotations

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-o",
    "--output",
    default=None,
    metavar="FILE",
    help="Write the NDJSON results to FILE instead of stdout.",
)
@click.option("--loopback", is_flag=True, help="Run the loopback demo even as root.")
@click.option(
    "--keep",
    is_flag=True,
    help="Leave the lab up afterwards (remove with `portmesh lab down --name pmdemo`).",
)
def command(output: str | None, loopback: bool, keep: bool) -> int:
    """A 4-host cluster with injected firewall faults, checked from every host.

    As root: network namespaces and nftables. Otherwise: loopback, TCP and UDP only.
    The human report goes to stderr, NDJSON to stdout (or -o FILE).
    """
    from scanner.lab.demo import DemoConfig, run_demo

    return run_demo(DemoConfig(output=output, force_loopback=loopback, keep=keep))
