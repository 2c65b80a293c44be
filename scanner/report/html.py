"""The HTML report: one self-contained page (inline CSS and JS, the data embedded as JSON).

No network fetch of any kind, so it opens air-gapped and can be mailed around. Per requirement
a heatmap of sources x destinations; each cell's ``data-state`` is one of CELL_STATES. The
script builds the cells from the embedded data; hover or click a cell for the flows behind it.
"""

from __future__ import annotations

import html
import ipaddress
import shlex
import time
from importlib import resources
from typing import Any

import orjson

from scanner import __version__
from scanner.report.aggregate import (
    STRIDE,
    Aggregate,
    Cell,
    Requirement,
    Run,
    format_ranges,
    natural_key,
    port_label,
)
from scanner.report.findings import iter_findings
from scanner.report.reader import ReadStats
from scanner.report.text import _fail_line, _unknown_line

# cell state letter (in the embedded state strings) -> data-state value
CELL_STATES = {"p": "pass", "f": "fail", "o": "one-way", "u": "unknown", ".": "none"}


def _state_letter(req: Requirement, key: int) -> str:
    c = req.cells.get(key)
    if c is None:
        return "."
    if isinstance(c, int):
        return "p"
    st = c.state
    if st == "fail":
        s, d = divmod(key, STRIDE)
        return "o" if req.cell_state(d * STRIDE + s) == "pass" else "f"
    return "p" if st == "pass" else "u"


def _cell_detail(c: Cell, samples: bool = True) -> dict[str, Any]:
    d: dict[str, Any] = {"pass": c.npass, "fail": c.nfail, "unknown": c.nunknown}
    if c.fail_ports:
        d["blocked"] = format_ranges(c.fail_ports.ranges())
    if c.closed_ports:
        d["closed"] = format_ranges(c.closed_ports.ranges())
    if c.unknown_ports:
        d["undecided"] = format_ranges(c.unknown_ports.ranges())
    d["reasons"] = c.reasons
    if samples:
        d["samples"] = c.samples
    return d


# Size bounds of the page at 1,000+ hosts (each a count of embedded items, not bytes):
SAMPLE_CELLS = 2_000  # cells per run whose sample flows are embedded (the rest: counts, ports)
FINDINGS_SHOWN = 30  # finding lines per requirement (the text report has them all)
GROUP_MAX = 100  # hosts per group: a group x group block is drawn as a table on drill-down


def rle(states: str) -> str:
    """Run-length encoding of a state string: 'ppppf..' -> 'p4f.2' (a letter, then its count
    when above 1). A 1,000-host matrix that mostly passes is a few KB instead of 1 MB."""
    out: list[str] = []
    i, n = 0, len(states)
    while i < n:
        ch = states[i]
        j = i + 1
        while j < n and states[j] == ch:
            j += 1
        out.append(ch if j - i == 1 else f"{ch}{j - i}")
        i = j
    return "".join(out)


def _subnet(addr: str | None) -> str:
    if not addr:
        return ""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return ""
    bits = 24 if ip.version == 4 else 64
    return str(ipaddress.ip_network(f"{ip}/{bits}", strict=False))


def host_groups(run: Run) -> list[dict[str, Any]]:
    """Hosts grouped by role, then subnet, in chunks of at most GROUP_MAX.

    The results carry no roles, so a host's role is what the plan asked of it: the set of
    requirements it is a destination of (control-plane hosts answer etcd and the API server,
    workers do not). A group's label names the requirements that set it apart, its subnet
    (/24, IPv6 /64) and, for a chunk, its place.
    """
    n = len(run.names)
    sig: list[set[str]] = [set() for _ in range(n)]
    for req in run.reqs.values():
        for k in req.cells:
            sig[k % STRIDE].add(req.key)
    common = set.intersection(*sig) if sig else set()
    buckets: dict[tuple[frozenset[str], str], list[int]] = {}
    for i in range(n):
        key = (frozenset(sig[i] - common), _subnet(run.addrs.get(i)))
        buckets.setdefault(key, []).append(i)
    many_roles = len({k[0] for k in buckets}) > 1
    groups = []
    for (role, subnet), members in sorted(
        buckets.items(), key=lambda kv: (-len(kv[0][0]), sorted(kv[0][0]), kv[0][1])
    ):
        members.sort(key=lambda i: natural_key(run.names[i]))
        if not many_roles:
            label = ""
        elif role:
            keys = sorted(role, key=natural_key)
            label = "dst of " + ", ".join(keys[:2]) + (f" +{len(keys) - 2}" if len(keys) > 2 else "")
        else:
            label = "no extra role"
        label = " · ".join(x for x in (label, subnet) if x) or "hosts"
        chunks = [members[i : i + GROUP_MAX] for i in range(0, len(members), GROUP_MAX)]
        for ci, chunk in enumerate(chunks):
            name = label if len(chunks) == 1 else f"{label} [{ci + 1}/{len(chunks)}]"
            groups.append({"label": name, "hosts": chunk})
    return groups


def _req_data(
    run: Run, req: Requirement, findings: list[str], rank: dict[int, int], budget: list[int]
) -> dict[str, Any]:
    srcs: set[int] = set()
    dsts: set[int] = set()
    for k in req.cells:
        s, d = divmod(k, STRIDE)
        srcs.add(s)
        dsts.add(d)
    order = sorted(srcs | dsts, key=lambda i: rank[i])  # group by group, natural within
    rows = [i for i in order if i in srcs]
    cols = [i for i in order if i in dsts]
    states = "".join(_state_letter(req, s * STRIDE + d) for s in rows for d in cols)
    # detail objects, deduplicated: past the sample budget most failing cells of a structured
    # fault (one port, one reason) share one object
    table: list[dict[str, Any]] = []
    index: dict[bytes, int] = {}
    details: dict[str, int] = {}
    for k, c in sorted((k, c) for k, c in req.cells.items() if isinstance(c, Cell)):
        s, d = divmod(k, STRIDE)
        if budget[0] > 0:
            budget[0] -= 1
            details[f"{s},{d}"] = len(table)
            table.append(_cell_detail(c))
            continue
        det = _cell_detail(c, samples=False)
        key = orjson.dumps(det, option=orjson.OPT_SORT_KEYS)
        i = index.get(key)
        if i is None:
            i = index[key] = len(table)
            table.append(det)
        details[f"{s},{d}"] = i
    shown = findings[:FINDINGS_SHOWN]
    if len(findings) > FINDINGS_SHOWN:
        shown.append(
            f"... and {len(findings) - FINDINGS_SHOWN} more findings "
            f"(portmesh report --format text lists them all)"
        )
    return {
        "key": req.key,
        "label": port_label(req.proto, req.ports),
        "proto": req.proto,
        "pass": req.npass,
        "fail": req.nfail,
        "unknown": req.nunknown,
        "rows": rows,
        "cols": cols,
        "rle": rle(states),
        "details": details,
        "dt": table,
        "findings": shown,
    }


def report_data(agg: Aggregate, stats: ReadStats | None = None) -> dict[str, Any]:
    runs = []
    for run in agg.runs.values():
        lines: dict[str, list[str]] = {}
        for req, fails, unknowns in iter_findings(run):
            lines[req.key] = [_fail_line(run, req, f) for f in fails] + [
                _unknown_line(run, req, f) for f in unknowns
            ]
        reqs = sorted(
            run.reqs.values(), key=lambda r: (not r.nfail, not r.nunknown, natural_key(r.key))
        )
        groups = host_groups(run)
        rank: dict[int, int] = {}
        group_of = [0] * len(run.names)
        for gi, g in enumerate(groups):
            for h in g["hosts"]:
                rank[h] = len(rank)
                group_of[h] = gi
        budget = [SAMPLE_CELLS]
        runs.append(
            {
                "scan_id": run.scan_id,
                "argv": run.argv,
                # as a shell would need it typed: --exec 'ip netns exec pm-{name}' stays one word
                "command": shlex.join(str(a) for a in run.argv) if run.argv else "",
                "started": run.started,
                "results": run.results,
                "hosts": run.names,
                "addrs": [run.addrs.get(i) for i in range(len(run.names))],
                "groups": [g["label"] for g in groups],
                "group_of": group_of,
                "sample_cells": SAMPLE_CELLS,
                "unreachable": run.unreachable,
                "reqs": [_req_data(run, r, lines.get(r.key, []), rank, budget) for r in reqs],
            }
        )
    return {
        "version": __version__,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "totals": {"pass": agg.passes, "fail": agg.failures, "unknown": agg.unknowns},
        "notes": stats.notes() if stats else [],
        "states": CELL_STATES,
        "runs": runs,
    }


def _json_for_script(data: Any) -> str:
    # Inside <script type="application/json"> only "</" (end tag) and "<!--" can break out;
    # "\u003c" is the same character to JSON.parse.
    return orjson.dumps(data).decode().replace("<", "\\u003c")


def render_html(agg: Aggregate, stats: ReadStats | None = None, title: str | None = None) -> str:
    template = resources.files("scanner.report").joinpath("template.html").read_text("utf-8")
    # one substitution per marker, in template order: neither value is scanned for the other
    head, _, rest = template.partition("__TITLE__")
    mid, _, tail = rest.partition("__DATA__")
    data = _json_for_script(report_data(agg, stats))
    return head + html.escape(title or "portmesh report") + mid + data + tail
