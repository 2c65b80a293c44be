"""Options shared by the probing commands (scan, check, mesh, agent) and their validation."""

from __future__ import annotations

import ipaddress
import math
import sys
from collections.abc import Callable
from typing import Any

import click

from scanner.core.tags import load_secret
from scanner.errors import InputError


def engine_options(f: Callable | None = None, *, exclude: tuple[str, ...] = ()) -> Callable:
    """The engine options, as a decorator; ``engine_options(exclude=(...))`` leaves some out
    (by parameter name), so a command's --help lists only what it takes."""
    if f is None:
        return lambda g: _engine_options(g, exclude)
    return _engine_options(f, exclude)


def _engine_options(f: Callable, exclude: tuple[str, ...]) -> Callable:
    opts = [
        click.option(
            "--concurrency",
            type=int,
            default=None,
            metavar="N",
            help="In-flight probes (default: 1024, capped by the file-descriptor budget).",
        ),
        click.option(
            "--rate",
            type=float,
            default=None,
            metavar="PPS",
            help="Global probe rate limit in probes/s (default: unlimited).",
        ),
        click.option(
            "--max-per-host",
            type=int,
            default=None,
            metavar="N",
            help="In-flight probes per destination (default: no cap beyond --concurrency).",
        ),
        click.option(
            "--timeout",
            type=float,
            default=1.0,
            show_default=True,
            metavar="SECONDS",
            help="Timeout of the first probe to a host; later ones adapt to the measured RTT.",
        ),
        click.option(
            "--min-timeout", type=float, default=0.05, show_default=True, metavar="SECONDS"
        ),
        click.option(
            "--max-timeout", type=float, default=3.0, show_default=True, metavar="SECONDS"
        ),
        click.option(
            "--retries",
            type=int,
            default=1,
            show_default=True,
            metavar="N",
            help="Re-probes of silent flows (raised automatically when loss is seen).",
        ),
        click.option(
            "--max-retries",
            type=int,
            default=10,
            show_default=True,
            metavar="N",
            help="Ceiling for the automatic retries under observed loss.",
        ),
        click.option(
            "--secret", default=None, metavar="S", help="Scan secret shared with responders."
        ),
        click.option(
            "--secret-file", default=None, metavar="FILE", help="Read the scan secret from FILE."
        ),
        click.option(
            "--vxlan-vni",
            type=int,
            default=4096,
            show_default=True,
            metavar="VNI",
            help="VNI of VXLAN probes (Calico's default is 4096).",
        ),
        click.option(
            "--udp-payload",
            "udp_payload",
            multiple=True,
            metavar="PORT=KIND",
            help="UDP payload kind for a port: vxlan, wireguard, memberlist, tag, empty.",
        ),
        click.option(
            "--source",
            default=None,
            metavar="ADDR",
            help="Local address to probe from (must be an address of this host).",
        ),
        click.option(
            "--max-hosts",
            "max_hosts",
            type=int,
            default=MAX_HOSTS_DEFAULT,
            show_default=True,
            metavar="N",
            help="Refuse, before sending anything, a run that would probe more addresses.",
        ),
        click.option(
            "--method",
            "tcp_method",
            type=click.Choice(["auto", "connect", "syn"]),
            default="auto",
            show_default=True,
            help="TCP probe: connect(), raw half-open SYN (CAP_NET_RAW), or auto (syn when "
            "allowed and no --secret, as nmap picks -sS/-sT).",
        ),
        click.option(
            "--workers",
            type=int,
            default=None,
            metavar="N",
            help="Shard processes (default: one per core, at most 4, for plans of 1,000+ flows).",
        ),
        click.option(
            "--loop",
            type=click.Choice(["uvloop", "asyncio"]),
            default="uvloop",
            show_default=True,
            help="Event loop implementation.",
        ),
    ]
    for o in reversed(opts):
        probe = o(lambda: None)
        names = [p.name for p in getattr(probe, "__click_params__", [])]
        if any(n in exclude for n in names):
            continue
        f = o(f)
    return f


def output_options(f: Callable) -> Callable:
    opts = [
        click.option(
            "-o",
            "--output",
            "output",
            default=None,
            metavar="FILE",
            help="Also write NDJSON to FILE (at a terminal: only to FILE, the screen keeps "
            "the summary).",
        ),
        click.option(
            "--only",
            default=None,
            metavar="STATES",
            help="Print only results in these states (comma list; counts still cover everything).",
        ),
        click.option(
            "--progress/--no-progress",
            default=None,
            help="A live progress line on stderr (default: on when stderr is a terminal).",
        ),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


# A /16: a run that would probe more addresses stops before sending anything (--max-hosts).
MAX_HOSTS_DEFAULT = 65_536
MAX_HOSTS_CEILING = 1 << 32  # --max-hosts at most: every IPv4 address


def emit_option(f: Callable) -> Callable:
    """check and mesh: write every result, or only the flows that did not pass + tallies."""
    return click.option(
        "--emit",
        type=click.Choice(["all", "failures"]),
        default="all",
        show_default=True,
        help="all: one result line per flow. failures: a line per flow that did not pass, and "
        "one tally record per (source, destination, requirement) counting the rest "
        "(output and work grow with failures, not flows).",
    )(f)


PAYLOAD_KINDS = ("vxlan", "wireguard", "memberlist", "tag", "empty")
ONLY_WORDS = ("open", "closed", "filtered", "open|filtered", "error", "pass", "fail", "unknown")


def build_engine_config(opts: dict[str, Any]):
    # lazy: engine and probes load asyncio (~30 ms); scan/check/mesh import this module at
    # their top, and their `--help` and option errors do without the engine
    from scanner.engine.engine import EngineConfig
    from scanner.probes.base import ProbeOptions

    def positive(name: str, value: float | None, zero_ok: bool = False) -> None:
        if value is not None and not math.isfinite(value):
            raise InputError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
        if value is not None and (value < 0 or (value == 0 and not zero_ok)):
            raise InputError(
                f"--{name.replace('_', '-')} must be {'>= 0' if zero_ok else '> 0'}, got {value}"
            )

    positive("concurrency", opts["concurrency"])
    positive("rate", opts["rate"])
    positive("max_per_host", opts["max_per_host"])
    positive("timeout", opts["timeout"])
    positive("min_timeout", opts["min_timeout"])
    positive("max_timeout", opts["max_timeout"])
    positive("retries", opts["retries"], zero_ok=True)
    positive("max_retries", opts["max_retries"], zero_ok=True)
    positive("workers", opts["workers"])
    positive("max_hosts", opts.get("max_hosts"))
    if not 0 <= opts["vxlan_vni"] < 1 << 24:
        raise InputError(f"--vxlan-vni must be 0-16777215, got {opts['vxlan_vni']}")
    payloads: dict[int, str] = {}
    for item in opts["udp_payload"]:
        port_s, sep, kind = item.partition("=")
        if (
            not sep
            or not (port_s.isascii() and port_s.isdigit())
            or not 1 <= int(port_s) <= 65535
            or kind not in PAYLOAD_KINDS
        ):
            raise InputError(
                f"bad --udp-payload {item!r}: want PORT=KIND with KIND one of {', '.join(PAYLOAD_KINDS)}"
            )
        payloads[int(port_s)] = kind
    if opts["tcp_method"] == "syn" and (opts["secret"] or opts["secret_file"]):
        raise InputError(
            "--method syn cannot read a responder's token (it needs a full connection): "
            "use --method connect or auto with --secret"
        )
    if opts["secret"] is not None and opts["secret_file"] is not None:
        raise InputError("give --secret or --secret-file, not both")
    try:
        secret = load_secret(opts["secret"], opts["secret_file"])
    except OSError as e:
        raise InputError(f"cannot read secret file {opts['secret_file']!r}: {e.strerror}") from None
    if secret is not None and not secret.strip():
        # an empty secret would tag every probe with a key no responder holds: false UDP fails
        where = f" ({opts['secret_file']})" if opts["secret_file"] is not None else ""
        raise InputError(f"the secret is empty{where}: give a non-empty --secret or --secret-file")
    if opts["source"] is not None:
        check_source(opts["source"])
    return EngineConfig(
        concurrency=opts["concurrency"],
        rate=opts["rate"],
        max_per_host=opts["max_per_host"],
        timeout=opts["timeout"],
        min_timeout=min(opts["min_timeout"], opts["timeout"]),
        max_timeout=max(opts["max_timeout"], opts["timeout"]),
        retries=opts["retries"],
        tcp_method=opts["tcp_method"],
        max_retries=max(opts["max_retries"], opts["retries"]),
        probe_options=ProbeOptions(
            secret=secret,
            vxlan_vni=opts["vxlan_vni"],
            udp_payloads=payloads or None,
            source=opts["source"],
        ),
    )


def check_source(source: str, local: set[str] | None = None) -> None:
    """--source must be an address of this host: a raw SYN from any other address is a spoofed
    packet, and its answers would go to someone else. ``local`` replaces the interface
    addresses (tests)."""
    try:
        addr = ipaddress.ip_address(source.split("%")[0])
    except ValueError:
        raise InputError(f"bad --source {source!r}: not an IP address") from None
    if addr.is_unspecified or addr.is_multicast:
        raise InputError(f"bad --source {source!r}: not a unicast address")
    if addr.is_loopback:  # all of 127.0.0.0/8 is local (one route), and ::1
        return
    if local is None:
        # lazy: plan.inventory loads PyYAML and the catalog (~60 ms, measured), which a
        # `portmesh scan --source` run needs nowhere else
        from scanner.plan.inventory import local_addresses

        local = local_addresses()
    mine = set()
    for a in local:
        try:
            mine.add(ipaddress.ip_address(a.split("%")[0]))
        except ValueError:
            continue
    if addr not in mine:
        raise InputError(
            f"bad --source {source!r}: not an address of this host "
            "(probes would be spoofed; use one of `ip -brief addr`)"
        )


def check_max_hosts(count: int, limit: int | None) -> None:
    """Stop before sending anything when a run would probe more than ``limit`` addresses.

    ``limit`` is itself bounded (MAX_HOSTS_CEILING): an IPv6 range of 2^64 addresses could
    never finish, and its every flow would still owe a result line."""
    if limit is None:
        limit = MAX_HOSTS_DEFAULT
    if limit > MAX_HOSTS_CEILING:
        raise InputError(
            f"--max-hosts must be at most {MAX_HOSTS_CEILING:,} (every IPv4 address), got {limit}"
        )
    if count > limit:
        allow = (
            f"pass --max-hosts {count} to allow it"
            if count <= MAX_HOSTS_CEILING
            else f"a run probes at most {MAX_HOSTS_CEILING:,}"
        )
        raise InputError(
            f"refusing to probe {count:,} addresses (more than --max-hosts {limit:,}): "
            f"narrow the targets, or {allow}"
        )


def check_site_hosts(site: Any, limit: int | None) -> None:
    """check/mesh: the addresses a site's plan can reach (hosts of both families and VIPs)."""
    addrs: set[str] = set(site.vips.values())
    for c in site.clusters:
        addrs.update(c.vips.values())
    for h in site.hosts():
        addrs.add(h.address)
        if getattr(h, "address6", None):
            addrs.add(h.address6)
    check_max_hosts(len(addrs), limit)


def build_output(opts: dict[str, Any]):
    # lazy: engine.output loads orjson (~20 ms); see build_engine_config
    from scanner.engine.output import NdjsonOutput

    path = opts["output"]
    # -o FILE at a terminal: the lines go to the file, not over the summary on the screen (as
    # the demo does); to a pipe or a file stdout still gets every line too
    return NdjsonOutput(path, stdout=path is None or not sys.stdout.isatty())


def parse_only(value: str | None) -> frozenset[str] | None:
    if value is None:
        return None
    words = frozenset(w.strip() for w in value.split(",") if w.strip())
    bad = sorted(words - set(ONLY_WORDS))
    if bad or not words:
        raise InputError(f"bad --only {value!r}: use some of {', '.join(ONLY_WORDS)}")
    return words
