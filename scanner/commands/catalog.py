"""`portmesh catalog`: show the port catalog as a table, NDJSON or Markdown."""

from __future__ import annotations

import sys

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--cni", metavar="NAME", help="Only the entries for this CNI (calico, cilium, ...).")
@click.option(
    "--with",
    "with_features",
    multiple=True,
    metavar="FEATURE,...",
    help="Also the entries of these features (on top of the defaults).",
)
@click.option(
    "--catalog",
    "catalog_files",
    multiple=True,
    metavar="FILE",
    help="Extra catalog file (same format; same id overrides); repeatable.",
)
@click.option(
    "-i",
    "--inventory",
    "inventories",
    multiple=True,
    metavar="FILE|DIR",
    help="Resolve the ports with this inventory's variables (its first cluster).",
)
@click.option(
    "--vars",
    "vars_files",
    multiple=True,
    metavar="FILE|DIR",
    help="Resolve the ports with these variables (above the inventory's); repeatable.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "ndjson", "markdown"]),
    default=None,
    help="Output format (default: table on a terminal, ndjson otherwise).",
)
def command(
    cni: str | None,
    with_features: tuple[str, ...],
    catalog_files: tuple[str, ...],
    inventories: tuple[str, ...],
    vars_files: tuple[str, ...],
    fmt: str | None,
) -> None:
    """Show the port requirements (every row of the DCE 5.0 port document, as data).

    Without --cni/--with every entry is shown; with them, the entries that apply to a cluster
    with that CNI and those features (kubespray defaults otherwise: calico with VXLAN).
    PORTS are the effective ports: kubespray's defaults, or the variables of --inventory /
    --vars; VARIABLE names the kubespray variable a row's ports follow.
    """
    # lazy: the library loads after option parsing, so `portmesh catalog --help` and bad options
    # cost ~0.05 s CPU instead of ~0.14 s with these imports at the top (measured, median of 10)
    from scanner.catalog import load_catalog
    from scanner.engine.output import NdjsonOutput
    from scanner.plan.planner import effective_ports, requirements_for
    from scanner.plan.selection import SelectionOptions

    catalog = load_catalog(catalog_files)
    if cni or with_features:
        sel = SelectionOptions(cni=cni, with_features=with_features).selection(catalog)
        reqs = list(requirements_for(catalog, sel))
    else:
        reqs = list(catalog)
    eff = _effective(catalog, inventories, vars_files)
    rows = [(r, *effective_ports(r, eff)) for r in reqs]
    fmt = fmt or ("table" if sys.stdout.isatty() else "ndjson")
    out = {"table": render_table, "ndjson": render_ndjson, "markdown": render_markdown}[fmt](rows)
    writer = NdjsonOutput()  # a closed reader (| head) is not an error
    writer.write(out)
    writer.close()


def _effective(catalog, inventories: tuple[str, ...], vars_files: tuple[str, ...]):
    """The first cluster's effective configuration (kubespray's defaults without inputs)."""
    # lazy: as in command() above (`portmesh catalog --help` stays light)
    from scanner.core.model import Cluster, Host
    from scanner.plan.clusters import cluster_of
    from scanner.plan.inventory import load_site
    from scanner.plan.planner import effective
    from scanner.plan.selection import Selection
    from scanner.plan.sources import load_cli_vars

    if inventories:
        site = load_site(inventories, vars_files)
        cluster = site.clusters[0]
        if len(site.clusters) > 1:
            sys.stderr.write(f"portmesh catalog: ports of cluster {cluster.name}\n")
    else:
        per_host = {}
        if vars_files:
            per_host = {"-": load_cli_vars(list(vars_files)).layers(["k8s_cluster"])}
        cluster = Cluster("catalog", "standalone", ())
        if per_host:
            host = Host("-", "127.0.0.1", frozenset({"node"}))
            cluster = cluster_of("catalog", "standalone", (host,), per_host)
    return effective(cluster, Selection())


def _ports(row) -> str:
    return row[1] if row[1] is not None else "-"


def _var(row) -> str:
    return row[2] or "-"


def _src(r) -> str:
    s = ",".join(r.src_roles)
    return f"{s} (any cluster)" if r.src_scope == "site" else s


def _dst(r) -> str:
    return f"{r.dst_role} (else {r.dst_fallback})" if r.dst_fallback else r.dst_role


def render_ndjson(rows) -> bytes:
    """One record per requirement: ``ports`` effective, ``variable`` the kubespray variable it
    follows (null for fixed ports), ``ports_spec`` the catalog's own text with placeholders."""
    # lazy: orjson (~20 ms) is not needed by `portmesh catalog --help` nor by the table format
    import orjson

    out = []
    for row in rows:
        rec = row[0].record()
        rec["ports_spec"] = rec["ports"]
        rec["ports"] = row[1]
        rec["variable"] = row[2]
        out.append(orjson.dumps(rec, option=orjson.OPT_APPEND_NEWLINE))
    return b"".join(out)


def render_table(rows_in) -> bytes:
    head = ("ID", "PROTO", "PORTS", "VARIABLE", "OPENED BY", "USED BY", "CONDITION", "DESCRIPTION")
    rows = [
        (r.id, r.proto, _ports(x), _var(x), _dst(r), _src(r), r.condition.text(), r.description)
        for x in rows_in
        for r in (x[0],)
    ]
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head) - 1)]
    lines = []
    for row in [head, *rows]:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return ("\n".join(lines) + "\n").encode()


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(rows) -> bytes:
    lines = [
        "| id | proto | ports | variable | opened by | used by | condition | description | reference |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    notes = []
    for row in rows:
        r = row[0]
        desc = r.description
        if r.note:
            notes.append(f"- `{r.id}`: {_md(r.note)}")
            desc += f" [{len(notes)}]"
        cells = (
            f"`{r.id}`",
            r.proto,
            _ports(row),
            _var(row),
            _dst(r),
            _src(r),
            r.condition.text(),
            desc,
            r.reference,
        )
        lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"{i}. {n[2:]}" for i, n in enumerate(notes, 1)]
    return ("\n".join(lines) + "\n").encode()
