"""`portmesh plan`: list the flows an inventory must allow (or count or explain them)."""

from __future__ import annotations

import sys

import click

from scanner.errors import InputError
from scanner.plan.selection import SelectionOptions, selection_options

BATCH = 4096  # flows per write: one syscall per ~400 KB of NDJSON


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@selection_options
@click.option(
    "--from",
    "sources",
    multiple=True,
    metavar="NAME",
    help="Only the flows from these hosts (what `check --from NAME` would probe).",
)
@click.option("--count", is_flag=True, help="Print the number of flows, not the flows.")
@click.option(
    "--explain",
    "explain_",
    is_flag=True,
    help="Per requirement and cluster: in the plan or not, why.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["ndjson", "table"]),
    default=None,
    help="Output format (default: table on a terminal, ndjson otherwise).",
)
def command(
    selection_opts: SelectionOptions,
    sources: tuple[str, ...],
    count: bool,
    explain_: bool,
    fmt: str | None,
) -> None:
    """List the flows (source, destination, protocol, port, requirement) the site must allow.

    NDJSON: a first {"type":"plan"} record (catalog, site, NodePort mode, clusters), then one
    {"type":"flow"} record per flow; with --count the plan record carries "flows"; with
    --explain one {"type":"explain"} record per requirement and cluster.
    """
    # lazy: the library loads after option parsing, so `portmesh plan --help` and bad options
    # cost ~0.06 s CPU instead of ~0.13 s with these imports at the top (measured, median of 10)
    from scanner.engine.output import NdjsonOutput
    from scanner.plan.planner import count_plan, explain, flow_record, plan, plan_meta
    from scanner.plan.selection import split_hosts

    if count and explain_:
        raise InputError("give --count or --explain, not both")
    wanted = split_hosts(sources) or None
    catalog, site, selection = selection_opts.resolve(sources=wanted)
    fmt = fmt or ("table" if sys.stdout.isatty() else "ndjson")
    meta = {"type": "plan", **plan_meta(catalog, site, selection)}
    # os-level writes that turn a closed reader (| head) into "stop quietly", exit 0
    out = NdjsonOutput()
    if count:
        n = count_plan(catalog, site, selection)
        out.write(_ndjson([{**meta, "flows": n}]) if fmt == "ndjson" else f"{n}\n".encode())
    elif explain_:
        recs = explain(catalog, site, selection)
        if fmt == "ndjson":
            _batched(out, recs, _ndjson)
        else:
            out.write(_explain_table(list(recs)))  # requirements x clusters: a few hundred rows
    else:
        flows = (flow_record(f) for f in plan(catalog, site, selection))
        if fmt == "ndjson":
            out.write(_ndjson([meta]))
            _batched(out, flows, _ndjson)
        else:
            sys.stderr.write(_meta_line(meta))
            widths = _flow_widths(catalog, site, selection)
            out.write(_flow_rows([FLOW_HEAD], widths))
            _batched(out, flows, lambda rs: _flow_rows(map(_flow_cells, rs), widths))
    out.close()


def _batched(out, records, encode) -> None:
    batch = []
    for rec in records:
        batch.append(rec)
        if len(batch) >= BATCH:
            out.write(encode(batch))
            batch.clear()
            if out.dead:
                return
    if batch:
        out.write(encode(batch))


def _ndjson(records) -> bytes:
    # lazy: orjson (~20 ms) only for the NDJSON format, not for `portmesh plan --help`
    import orjson

    dumps, opt = orjson.dumps, orjson.OPT_APPEND_NEWLINE
    return b"".join(dumps(r, option=opt) for r in records)


FLOW_HEAD = ("SRC_HOST", "SRC", "->", "HOST", "DST", "PROTO/PORT", "REQ")


def _flow_cells(r) -> tuple[str, ...]:
    port = f"{r['proto']}/{r['port']}" if r["port"] is not None else r["proto"]
    return (r["src_host"], r["src"] or "-", "->", r["host"], r["dst"], port, r["req"])


def _flow_widths(catalog, site, selection) -> list[int]:
    """Column widths known before the first flow (flows stream; a plan may have billions):
    the longest host name, address and requirement id the site and catalog can produce."""
    names = {h.name for h in site.hosts()} | {"scanner", selection.scanner or ""}
    addrs = {h.address for h in site.hosts()} | {"-"}
    addrs |= {h.address6 for h in site.hosts() if h.address6}  # dual stack: IPv6 flows too
    for c in site.clusters:
        names |= {f"vip:{v}@{c.name}" for v in c.vips}
        addrs |= set(c.vips.values())
    names |= {f"vip:{v}" for v in site.vips}
    addrs |= set(site.vips.values())
    name_w = max(map(len, names))
    addr_w = max(map(len, addrs))
    return [
        max(name_w, len(FLOW_HEAD[0])),
        max(addr_w, len(FLOW_HEAD[1])),
        2,
        max(name_w, len(FLOW_HEAD[3])),
        max(addr_w, len(FLOW_HEAD[4])),
        len("tcp/65535") + 1,
    ]


def _flow_rows(rows, widths: list[int]) -> bytes:
    lines = []
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)]
        lines.append("  ".join([*cells, row[-1]]) + "\n")
    return "".join(lines).encode()


def _explain_table(records) -> bytes:
    head = ("REQ", "CLUSTER", "AF", "IN", "FLOWS", "WHY")
    rows = [
        (
            r["req"],
            r["cluster"],
            r.get("af", "ipv4"),
            "yes" if r["included"] else "no",
            str(r["flows"]),
            r["why"],
        )
        for r in records
    ]
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head) - 1)]
    lines = []
    for row in [head, *rows]:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)]
        lines.append("  ".join([*cells, row[-1]]).rstrip() + "\n")
    return "".join(lines).encode()


def _meta_line(meta) -> str:
    np = (
        "full range"
        if meta["nodeport"] == "full"
        else f"sample of {meta['nodeport_sample']} + ends"
    )
    clusters = "; ".join(
        f"{c['name']} ({c['kind']}, {c['hosts']} hosts, cni {c['cni']}, {'+'.join(c['features']) or 'no features'})"
        for c in meta["clusters"]
    )
    return f"# plan: {clusters}; NodePorts: {np}\n"
