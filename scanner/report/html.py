"""The HTML report: one self-contained page (inline CSS and JS, the data embedded as JSON).

No network fetch of any kind, so it opens air-gapped and can be mailed around. Per requirement
a heatmap of sources x destinations; each cell's ``data-state`` is one of CELL_STATES. The
script builds the cells from the embedded data; hover or click a cell for the flows behind it.
"""

from __future__ import annotations

import html
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


def _cell_detail(c: Cell) -> dict[str, Any]:
    d: dict[str, Any] = {"pass": c.npass, "fail": c.nfail, "unknown": c.nunknown}
    if c.fail_ports:
        d["blocked"] = format_ranges(c.fail_ports.ranges())
    if c.closed_ports:
        d["closed"] = format_ranges(c.closed_ports.ranges())
    if c.unknown_ports:
        d["undecided"] = format_ranges(c.unknown_ports.ranges())
    d["reasons"] = c.reasons
    d["samples"] = c.samples
    return d


def _req_data(run: Run, req: Requirement, findings: list[str]) -> dict[str, Any]:
    srcs: set[int] = set()
    dsts: set[int] = set()
    for k in req.cells:
        s, d = divmod(k, STRIDE)
        srcs.add(s)
        dsts.add(d)
    order = sorted(srcs | dsts, key=lambda i: natural_key(run.names[i]))
    rows = [i for i in order if i in srcs]
    cols = [i for i in order if i in dsts]
    states = "".join(_state_letter(req, s * STRIDE + d) for s in rows for d in cols)
    details = {
        f"{s},{d}": _cell_detail(c)
        for k, c in req.cells.items()
        if isinstance(c, Cell)
        for s, d in [divmod(k, STRIDE)]
    }
    return {
        "key": req.key,
        "label": port_label(req.proto, req.ports),
        "proto": req.proto,
        "pass": req.npass,
        "fail": req.nfail,
        "unknown": req.nunknown,
        "rows": rows,
        "cols": cols,
        "states": states,
        "details": details,
        "findings": findings,
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
                "unreachable": run.unreachable,
                "reqs": [_req_data(run, r, lines.get(r.key, [])) for r in reqs],
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
