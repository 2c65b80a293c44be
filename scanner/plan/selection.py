"""What to plan: the selection options shared by ``plan``, ``check`` and ``mesh``.

``Selection`` is the planner's input beside the catalog and the site; ``selection_options`` is
the click decorator that adds the shared flags, and ``SelectionOptions.resolve()`` turns them
into ``(catalog, site, selection)``::

    @click.command()
    @selection_options
    def command(selection_opts: SelectionOptions, ...) -> None:
        catalog, site, selection = selection_opts.resolve(sources=..., scanner=...)

Flags win over variables: ``--cni`` and ``--with`` / ``--without`` override every cluster's
ClusterConfig in the planner, with the source "flag --cni" / "flag --with" / "flag --without".
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click

from scanner.errors import InputError

if TYPE_CHECKING:
    from scanner.catalog import Catalog
    from scanner.core.model import Site


@dataclass(frozen=True)
class Selection:
    """Planner options.

    cni: --cni, overrides every cluster's CNI.
    with_features / without_features: --with / --without, override every cluster's features.
    nodeport_sample: None probes the full NodePort range per pair; K probes K ports spread
        evenly over it plus both ends (the same ports for every pair).
    sources: keep only flows whose src_host is in it (``check --from NAME``); None keeps all.
    scanner: the host name the "scanner" source stands for (the host running the check); None
        leaves such flows with src=None, src_host="scanner".
    """

    cni: str | None = None
    with_features: frozenset[str] = frozenset()
    without_features: frozenset[str] = frozenset()
    nodeport_sample: int | None = None
    sources: frozenset[str] | None = None
    scanner: str | None = None

    def validate(self, catalog: Catalog) -> Selection:
        """Raise InputError for unknown features/CNIs or contradictory flags; return self."""
        known = catalog.features()
        for flag, names in (("--with", self.with_features), ("--without", self.without_features)):
            for f in sorted(names):
                if f not in known:
                    raise InputError(f"{flag}: unknown feature {f!r} (known: {', '.join(known)})")
        both = sorted(self.with_features & self.without_features)
        if both:
            raise InputError(f"--with and --without both name {both[0]!r}")
        if self.cni is not None and self.cni not in catalog.cnis():
            raise InputError(
                f"--cni: unknown CNI {self.cni!r} (known: {', '.join(catalog.cnis())})"
            )
        if self.nodeport_sample is not None and self.nodeport_sample < 0:
            raise InputError(f"--nodeport-sample: {self.nodeport_sample} is below 0")
        return self


def split_words(values: Iterable[str] | None) -> list[str]:
    """``--with a,b --with c`` -> [a, b, c] (lower-cased, blanks dropped, order kept, no repeats)."""
    out: list[str] = []
    for v in values or ():
        for w in str(v).split(","):
            w = w.strip().lower()
            if w and w not in out:
                out.append(w)
    return out


@dataclass(frozen=True)
class SelectionOptions:
    """The raw shared flags, as typed."""

    inventories: tuple[str, ...] = ()
    vars_files: tuple[str, ...] = ()
    hosts: str | None = None
    role: str = "node"
    cni: str | None = None
    with_features: tuple[str, ...] = ()
    without_features: tuple[str, ...] = ()
    catalog_files: tuple[str, ...] = ()
    nodeport_sample: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def resolve(
        self, sources: Iterable[str] | None = None, scanner: str | None = None
    ) -> tuple[Catalog, Site, Selection]:
        """Load the catalog and the site and build the validated Selection."""
        # lazy: the catalog and the inventory readers (PyYAML) load only when a command runs, not
        # for `portmesh check/plan/mesh/respond/lab --help` (these import this module for
        # selection_options): `check --help` costs ~0.10 s CPU, ~0.21 s with these at the top
        # (measured, median of 10)
        from scanner.catalog import load_catalog
        from scanner.plan.inventory import load_site

        catalog = load_catalog(self.catalog_files)
        selection = self.selection(catalog, sources=sources, scanner=scanner)
        hosts = split_hosts(self.hosts)
        if not hosts and not self.inventories:
            raise InputError("no hosts: give --inventory FILE or --hosts a,b,c")
        site = load_site(
            inventories=self.inventories, vars_files=self.vars_files, hosts=hosts, role=self.role
        )
        if sources is not None or scanner:
            selection = _canonical(selection, site)
        return catalog, site, selection

    def selection(
        self, catalog: Catalog, sources: Iterable[str] | None = None, scanner: str | None = None
    ) -> Selection:
        cni = self.cni.strip().lower() if self.cni and self.cni.strip() else None
        return Selection(
            cni=cni,
            with_features=frozenset(split_words(self.with_features)),
            without_features=frozenset(split_words(self.without_features)),
            nodeport_sample=self.nodeport_sample,
            sources=None if sources is None else frozenset(sources),
            scanner=scanner,
        ).validate(catalog)


def resolve_host(site: Site, key: str, option: str = "--from") -> str:
    """A host named on the command line (``check --from``, ``watch --as``) -> the site's unique
    host name: its name, ``NAME@CLUSTER``, its address, or an inventory name only one cluster
    uses. One clear InputError otherwise (``node1`` of two clusters, a name the site lacks)."""
    where = site.source or "the site"
    hosts = site.match(key)
    if len(hosts) == 1:
        return hosts[0].name
    if len(hosts) > 1:
        names = ", ".join(h.name for h in hosts)
        raise InputError(
            f"{option}: {key!r} is {len(hosts)} hosts of {where} ({names}): name one of them"
            " or give its address"
        )
    raise InputError(
        f"{option}: no host named {key!r} in {where}, nor with that address (give a host's "
        "name, NAME@CLUSTER or its inventory address)"
    )


def _canonical(selection: Selection, site: Site) -> Selection:
    """``--from`` names -> the site's unique host names (``resolve_host``). A scanner name
    outside the site stays as it is, unless it is also a source (check --from: planning from a
    name the site lacks would check nothing, silently)."""
    def one(key: str, outside_ok: bool) -> str:
        if key == "scanner":
            return key
        if outside_ok and not site.match(key):
            return key
        return resolve_host(site, key)

    scanner = selection.scanner
    sources0 = selection.sources or frozenset()
    canon_scanner = one(scanner, scanner not in sources0) if scanner else None
    sources = selection.sources
    if sources is not None:
        sources = frozenset(
            canon_scanner if (k == scanner and canon_scanner) else one(k, False) for k in sources
        )
    return dataclasses.replace(selection, sources=sources, scanner=canon_scanner)


def split_hosts(value: str | Sequence[str] | None) -> list[str]:
    if not value:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [h.strip() for item in items for h in item.split(",") if h.strip()]


def selection_options(
    f: Callable[..., Any] | None = None, *, exclude: tuple[str, ...] = ()
) -> Callable[..., Any]:
    """Add the shared selection flags; the command receives them as ``selection_opts``.
    ``selection_options(exclude=("inventory", "hosts", "role"))`` leaves some out (by
    parameter name): `lab up` plans its own inventory with the rest."""
    if f is None:
        return lambda g: _selection_options(g, exclude)
    return _selection_options(f, exclude)


def _selection_options(f: Callable[..., Any], exclude: tuple[str, ...]) -> Callable[..., Any]:
    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        def take(name: str) -> Any:  # an excluded name may be the command's own parameter
            return None if name in exclude else kwargs.pop(name, None)

        opts = SelectionOptions(
            inventories=tuple(take("inventory") or ()),
            vars_files=tuple(take("vars_files") or ()),
            hosts=",".join(take("hosts") or ()) or None,
            role=take("role") or "node",
            cni=take("cni"),
            with_features=tuple(take("with_features") or ()),
            without_features=tuple(take("without_features") or ()),
            catalog_files=tuple(take("catalog_files") or ()),
            nodeport_sample=take("nodeport_sample"),
        )
        return f(*args, selection_opts=opts, **kwargs)

    options = [
        click.option(
            "--inventory",
            "-i",
            "inventory",
            multiple=True,
            metavar="FILE|DIR",
            help=(
                "Kubespray/Kubean inventory: INI, YAML, ansible-inventory --list JSON, Kubean"
                " ConfigMaps/Cluster file, a site file, or an inventory folder (read with its"
                " group_vars/ and host_vars/); repeatable."
            ),
        ),
        click.option(
            "--vars",
            "vars_files",
            multiple=True,
            metavar="FILE|DIR",
            help=(
                "Variables above the inventory's: a YAML/JSON vars file, a vars ConfigMap, or a"
                " group_vars/ folder (applied by group); repeatable, later wins."
            ),
        ),
        click.option(
            "--hosts",
            "hosts",
            multiple=True,
            metavar="A,B,C",
            help="Plain host list (names or addresses) instead of an inventory.",
        ),
        click.option(
            "--role",
            default="node",
            show_default=True,
            metavar="ROLE",
            help="Role of the --hosts hosts (node, control_plane, worker, etcd, ...).",
        ),
        click.option("--cni", metavar="NAME", help="CNI of every cluster (overrides the vars)."),
        click.option(
            "--with",
            "with_features",
            multiple=True,
            metavar="FEATURE,...",
            help="Turn features on (vxlan, ipip, bgp, typha, wireguard, metallb, kube-vip, ...).",
        ),
        click.option(
            "--without",
            "without_features",
            multiple=True,
            metavar="FEATURE,...",
            help="Turn features off.",
        ),
        click.option(
            "--catalog",
            "catalog_files",
            multiple=True,
            metavar="FILE",
            help="Extra catalog file (same format; same id overrides); repeatable.",
        ),
        click.option(
            "--nodeport-sample",
            type=click.IntRange(min=0),
            default=None,
            metavar="K",
            help="Probe K NodePorts per pair spread over the range, plus both ends (default: all).",
        ),
    ]
    for opt in reversed(options):
        probe = opt(lambda: None)
        if any(p.name in exclude for p in getattr(probe, "__click_params__", [])):
            continue
        wrapper = opt(wrapper)
    return wrapper


def selection_argv(opts: SelectionOptions) -> list[str]:
    """The flags that give ``opts`` again (without inventories/hosts), for a child command."""
    argv: list[str] = []
    for flag, values in (("--vars", opts.vars_files), ("--catalog", opts.catalog_files),
                         ("--with", opts.with_features), ("--without", opts.without_features)):  # fmt: skip
        for v in values:
            argv += [flag, v]
    if opts.cni:
        argv += ["--cni", opts.cni]
    if opts.nodeport_sample is not None:
        argv += ["--nodeport-sample", str(opts.nodeport_sample)]
    return argv
