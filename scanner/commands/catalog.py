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
    "--format",
    "fmt",
    type=click.Choice(["table", "ndjson", "markdown"]),
    default=None,
    help="Output format (default: table on a terminal, ndjson otherwise).",
)
def command(
    cni: str | None, with_features: tuple[str, ...], catalog_files: tuple[str, ...], fmt: str | None
) -> None:
    """Show the port requirements (every row of the DCE 5.0 port document, as data).

    Without --cni/--with every entry is shown; with them, the entries that apply to a cluster
    with that CNI and those features (kubespray defaults otherwise: calico with VXLAN).
    """
    from scanner.catalog import load_catalog
    from scanner.engine.output import NdjsonOutput
    from scanner.plan.planner import requirements_for
    from scanner.plan.selection import SelectionOptions

    catalog = load_catalog(catalog_files)
    if cni or with_features:
        sel = SelectionOptions(cni=cni, with_features=with_features).selection(catalog)
        reqs = list(requirements_for(catalog, sel))
    else:
        reqs = list(catalog)
    fmt = fmt or ("table" if sys.stdout.isatty() else "ndjson")
    out = {"table": render_table, "ndjson": render_ndjson, "markdown": render_markdown}[fmt](reqs)
    writer = NdjsonOutput()  # a closed reader (| head) is not an error
    writer.write(out)
    writer.close()


def _ports(r) -> str:
    return r.ports if r.ports is not None else "-"


def _src(r) -> str:
    s = ",".join(r.src_roles)
    return f"{s} (any cluster)" if r.src_scope == "site" else s


def _dst(r) -> str:
    return f"{r.dst_role} (else {r.dst_fallback})" if r.dst_fallback else r.dst_role


def render_ndjson(reqs) -> bytes:
    import orjson

    return b"".join(orjson.dumps(r.record(), option=orjson.OPT_APPEND_NEWLINE) for r in reqs)


def render_table(reqs) -> bytes:
    head = ("ID", "PROTO", "PORTS", "OPENED BY", "USED BY", "CONDITION", "DESCRIPTION")
    rows = [
        (r.id, r.proto, _ports(r), _dst(r), _src(r), r.condition.text(), r.description)
        for r in reqs
    ]
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head) - 1)]
    lines = []
    for row in [head, *rows]:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return ("\n".join(lines) + "\n").encode()


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(reqs) -> bytes:
    lines = [
        "| id | proto | ports | opened by | used by | condition | description | reference |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    notes = []
    for r in reqs:
        desc = r.description
        if r.note:
            notes.append(f"- `{r.id}`: {_md(r.note)}")
            desc += f" [{len(notes)}]"
        cells = (
            f"`{r.id}`",
            r.proto,
            _ports(r),
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
