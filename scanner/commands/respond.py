"""`portmesh respond`: temporary responders on this host's ports (see scanner.responder.server)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import click

from scanner.core.ports import parse_ports
from scanner.core.tags import load_secret, new_secret
from scanner.errors import InputError
from scanner.plan.selection import SelectionOptions, selection_options


def as_option(text: str) -> Callable:
    """--as NAME (respond, watch): which inventory host this is."""
    return click.option("--as", "as_host", metavar="NAME", help=text)


def bind_option(f: Callable) -> Callable:
    """--bind ADDR (respond, watch): the address the responder binds (check_bind checks it)."""
    return click.option(
        "--bind", default="0.0.0.0", show_default=True, metavar="ADDR",
        help="Address the responder binds.",
    )(f)  # fmt: skip


def secret_options(what: str, mounted: bool = False) -> Callable:
    """--secret / --secret-file (respond, watch); resolve_secret reads them."""

    def deco(f: Callable) -> Callable:
        f = click.option(
            "--secret-file", metavar="FILE",
            help=f"Read the {what.split(' (')[0]} from FILE (first line"
            + ("; a mounted Secret" if mounted else "") + ").",
        )(f)  # fmt: skip
        return click.option(
            "--secret", metavar="S",
            help=f"The {what}; prefer --secret-file: other users can read a command line.",
        )(f)  # fmt: skip

    return deco


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-p",
    "--ports",
    "ports",
    metavar="PORTS",
    help="Ports to answer on, nmap syntax: 2379-2380,U:4789 (instead of --inventory/--as).",
)
@as_option("This host's inventory name: answer on every port the plan probes it on.")
@selection_options
@bind_option
@secret_options("scan secret (as given to scan/check)")
@click.option(
    "--ttl",
    type=float,
    default=None,
    metavar="SECONDS",
    help="Exit after SECONDS (default: 300).",
)
@click.option(
    "--parent-channel",
    is_flag=True,
    help="Also exit when stdin reaches end of file (the parent that started it went away).",
)
@click.option(
    "--witness",
    is_flag=True,
    help="Also capture tagged probes (ICMP, IP-in-IP, kernel-owned UDP) with an AF_PACKET socket.",
)
def command(
    ports: str | None,
    as_host: str | None,
    selection_opts: SelectionOptions,
    bind: str,
    secret: str | None,
    secret_file: str | None,
    ttl: float | None,
    parent_channel: bool,
    witness: bool,
) -> int:
    """Answer probes on this host's ports until the TTL runs out or a signal arrives.

    TCP: on accept, a token derived from the secret, then close. UDP: a 20-byte reply only to
    datagrams tagged with the secret, never more bytes than received. Prints one NDJSON
    {"type":"ready"} line once bound (with what could not be bound and by which process it is
    held), and {"type":"exit"} when it ends. Without --secret a fresh secret is made and shown
    in the ready line.
    """
    # lazy: the library loads after option parsing, so `portmesh respond --help` and bad options
    # cost ~0.06 s CPU instead of ~0.17 s with these imports at the top (measured, median of 10)
    from scanner.responder.server import DEFAULT_TTL, ResponderConfig, run_responder

    tcp, udp = resolve_ports(ports, as_host, selection_opts)
    sec, generated = resolve_secret(secret, secret_file)
    cfg = ResponderConfig(
        tcp_ports=tcp,
        udp_ports=udp,
        secret=sec,
        bind=check_bind(bind),
        ttl=check_ttl(DEFAULT_TTL if ttl is None else ttl),
        exit_on_stdin_close=parent_channel,
        witness=witness,
        name=as_host,
        show_secret=generated,
    )
    return run_responder(cfg)


def resolve_ports(
    ports: str | None, as_name: str | None, opts: SelectionOptions
) -> tuple[list[int], list[int]]:
    has_inventory = bool(opts.inventories or opts.hosts)
    if ports and (as_name or has_inventory):
        raise InputError("give either -p PORTS or --inventory FILE --as NAME, not both")
    if ports:
        pairs = parse_ports(ports)
        return [p for pr, p in pairs if pr == "tcp"], [p for pr, p in pairs if pr == "udp"]
    if not as_name or not has_inventory:
        raise InputError("no ports: give -p PORTS, or --inventory FILE with --as NAME")
    return ports_for_host(opts, as_name)


def ports_for_host(opts: SelectionOptions, name: str) -> tuple[list[int], list[int]]:
    """The TCP and UDP ports the plan probes host ``name`` on (from any source)."""
    # lazy: as in command() above (`portmesh respond --help` stays light)
    from scanner.plan.planner import legs

    catalog, site, selection = opts.resolve()
    found = site.match(name)
    if len(found) > 1:
        names = ", ".join(h.name for h in found)
        raise InputError(f"--as: {name!r} is {len(found)} hosts ({names}): name one of them")
    if not found:
        names = ", ".join(h.name for h in site.hosts()[:20])
        raise InputError(f"--as: no host named {name!r} in {site.source or 'the site'} ({names})")
    host = found[0]
    tcp: set[int] = set()
    udp: set[int] = set()
    # per leg, not per flow: a 100-host plan over the full NodePort range is 27 M flows
    for leg in legs(catalog, site, selection):
        if not (leg.applies and leg.srcs and leg.dsts and leg.ports):
            continue
        into = {"tcp": tcp, "udp": udp}.get(leg.req.proto)
        if into is None:
            continue
        for dname, daddr in leg.dsts:
            if daddr == host.address and any(sn != dname and sa != daddr for sn, sa in leg.srcs):
                into.update(p for p in leg.ports if p is not None)
    return sorted(tcp), sorted(udp)


def resolve_secret(secret: str | None, secret_file: str | None) -> tuple[bytes, bool]:
    if secret is not None and secret_file is not None:
        raise InputError("give --secret or --secret-file, not both")
    try:
        got = load_secret(secret, secret_file)
    except OSError as e:
        raise InputError(f"--secret-file: cannot read {secret_file}: {e.strerror or e}") from None
    if got is None:
        return new_secret(), True
    if not got:
        raise InputError("the secret is empty" + (f" ({secret_file})" if secret_file else ""))
    return got, False


def check_bind(bind: str) -> str:
    try:
        return str(ipaddress.ip_address(bind))
    except ValueError:
        raise InputError(f"--bind: {bind!r} is not an IPv4 or IPv6 address") from None


def check_ttl(ttl: float) -> float:
    # lazy: `portmesh lab up` checks --ttl with this; the responder server (~55 ms) loads later
    from scanner.responder.server import MAX_TTL

    if not (ttl > 0) or ttl > MAX_TTL:
        raise InputError(f"--ttl: {ttl:g} is not within 0-{MAX_TTL:g} seconds (exclusive of 0)")
    return ttl
