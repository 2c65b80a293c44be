"""`portmesh plan`: list the flows an inventory must allow (or count or explain them)."""

from __future__ import annotations

import sys

import click

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
    from scanner.engine.output import NdjsonOutput
    from scanner.errors import InputError
    from scanner.plan.planner import count_plan, explain, plan, plan_meta
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
            out.write(b"REQ  CLUSTER  IN  FLOWS  WHY\n")
            _batched(out, recs, _explain_rows)
    else:
        from scanner.plan.planner import flow_record

        flows = (flow_record(f) for f in plan(catalog, site, selection))
        if fmt == "ndjson":
            out.write(_ndjson([meta]))
            _batched(out, flows, _ndjson)
        else:
            sys.stderr.write(_meta_line(meta))
            out.write(b"SRC_HOST  SRC  ->  HOST  DST  PROTO/PORT  REQ\n")
            _batched(out, flows, _flow_rows)
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
    import orjson

    dumps, opt = orjson.dumps, orjson.OPT_APPEND_NEWLINE
    return b"".join(dumps(r, option=opt) for r in records)


def _flow_rows(records) -> bytes:
    lines = []
    for r in records:
        port = f"{r['proto']}/{r['port']}" if r["port"] is not None else r["proto"]
        lines.append(
            f"{r['src_host']}  {r['src'] or '-'}  ->  {r['host']}  {r['dst']}  {port}  {r['req']}\n"
        )
    return "".join(lines).encode()


def _explain_rows(records) -> bytes:
    return "".join(
        f"{r['req']}  {r['cluster']}  {'yes' if r['included'] else 'no'}  {r['flows']}  {r['why']}\n"
        for r in records
    ).encode()


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
