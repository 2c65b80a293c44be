"""The text report: per requirement, each fault as one line, then a compact host x host matrix.

Readable at 300 hosts: findings are grouped (see findings.py), host lists are compressed
(node[1-40,42]), each requirement shows at most MAX_FINDINGS lines, and the matrix shows only
hosts involved in a failure, at most MATRIX_MAX of them, with a legend.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator

from scanner.report.aggregate import (
    LOCAL_PROHIBITED,
    STRIDE,
    Aggregate,
    Cell,
    PortSet,
    Requirement,
    Run,
    compress_names,
    duplicate_warning,
    natural_key,
    port_label,
)
from scanner.report.findings import (
    BOTH,
    EGRESS,
    INGRESS,
    ONE_WAY,
    Finding,
    failing_keys,
    iter_findings,
)
from scanner.report.reader import ReadStats

MAX_FINDINGS = 15
MATRIX_MAX = 40
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def render_text(agg: Aggregate, stats: ReadStats | None = None) -> Iterator[str]:
    """The report as lines (without newlines)."""
    runs = list(agg.runs.values())
    nres = sum(r.results for r in runs)
    ntal = sum(r.tallied for r in runs)
    npairs = sum(r.pairs for r in runs)
    head = (
        f"portmesh report: {len(runs)} run{'s' if len(runs) != 1 else ''}, "
        f"{nres} result{'s' if nres != 1 else ''} "
        + (f"+ {ntal} tallied " if ntal else "")
        + f"({agg.passes} pass, {agg.failures} fail, {agg.unknowns} unknown)"
    )
    if npairs:
        oneway = sum(r.pair_verdicts.get("one-way", 0) for r in runs)
        failed = sum(r.pair_verdicts.get("fail", 0) for r in runs)
        head += f", {npairs} pair records ({failed} failed, {oneway} one-way)"
    yield head
    for note in stats.notes() if stats else []:
        yield f"note: {note}"
    for run in runs:
        yield ""
        yield from render_run(run)


def render_run(run: Run, header: bool = True) -> Iterator[str]:
    """One run's part of the report; ``header=False`` leaves out its "run ID: command" line
    (the mesh prints these lines under its own totals line)."""
    names = run.names
    what = shlex.join(run.argv) if run.argv else "?"
    if header:
        yield (
            f"run {run.scan_id}: {what}"
            + (f", started {run.started}" if run.started else "")
            + f", {len(names)} hosts, {run.results} result{'s' if run.results != 1 else ''}"
            + (f" + {run.tallied} passing flows tallied" if run.tallied else "")
        )
    dup = duplicate_warning(run)
    if dup:
        yield f"  warning: {dup}"
    if run.summary and run.planned is not None:
        counted = (run.summary.get("results") or 0) + (run.summary.get("tallied") or 0)
        if counted != run.planned:
            yield f"  warning: planned {run.planned} flows, summary counts {counted}"
    if run.summary is None and run.results:
        yield "  warning: no summary record: the run was cut short or the input is partial"
    yield from _unreachable_lines(run)

    failed: list[Requirement] = []
    passed: list[str] = []
    found = sorted(iter_findings(run), key=lambda t: not t[1])  # failing first, stable
    # requirements undecided only because agents never ran: one line, the lines above say why
    lost = [
        req
        for req, fails, unknowns in found
        if not fails and unknowns and all(_unreachable_only(f.reasons(req)) for f in unknowns)
    ]
    if lost:
        n = sum(len(failing_keys(req, "unknown")) for req in lost)
        yield (
            f"UNKNOWN {len(lost)} requirement{'s' if len(lost) != 1 else ''}, {n} directions: "
            "their source's agent was unreachable (above): "
            + _cut(", ".join(sorted((r.key for r in lost), key=natural_key)), 200)
        )
    skip = {id(r) for r in lost}
    for req, fails, unknowns in found:
        if id(req) in skip:
            continue
        total = len(req.cells)
        nf = len(failing_keys(req, "fail"))
        nu = len(failing_keys(req, "unknown"))
        label = port_label(req.proto, req.ports)
        label = "" if label == req.key else f"  {label}"
        if fails:
            failed.append(req)
            yield f"FAIL {req.key}{label}  {nf} of {total} directions fail" + (
                f", {nu} unknown" if nu else ""
            )
        else:
            yield f"UNKNOWN {req.key}{label}  {nu} of {total} directions undecided"
        lines = [_fail_line(run, req, f) for f in fails]
        lines += [_unknown_line(run, req, f) for f in unknowns]
        for line in lines[:MAX_FINDINGS]:
            yield f"  {line}"
        if len(lines) > MAX_FINDINGS:
            yield f"  ... {len(lines) - MAX_FINDINGS} more findings (see --format html)"
    for key in sorted(run.reqs, key=natural_key):
        req = run.reqs[key]
        if not (req.nfail or req.nunknown):
            passed.append(key)
    if passed:
        yield f"pass: {len(passed)} requirement{'s' if len(passed) != 1 else ''}: " + _cut(
            ", ".join(passed), 300
        )
    if failed:
        yield ""
        yield from _matrix(run, failed)


_UNREACHABLE = "error: agent unreachable"
# an address in an agent's failure ("Connection closed by 198.18.0.2 port 22"), so that the same
# failure on many hosts is one line
_ADDR = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b|\b[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}\b")


def _unreachable_only(reasons: dict[str, int]) -> bool:
    return bool(reasons) and all(r.startswith(_UNREACHABLE) for r in reasons)


def _unreachable_lines(run: Run) -> Iterator[str]:
    """One line per distinct failure of the agents (with how many hosts), then one hint."""
    if not run.unreachable:
        return
    groups: dict[str, list[str]] = {}
    for name, reason in run.unreachable.items():
        generic = _ADDR.sub("{address}", reason or "no reason given")
        generic = re.sub(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])", "{name}", generic)
        groups.setdefault(generic, []).append(name)
    for generic, names in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        if len(names) == 1:
            yield f"  unreachable: {names[0]} ({run.unreachable[names[0]] or 'no reason given'})"
        else:
            yield f"  unreachable: {len(names)} hosts ({compress_names(names)}): {generic}"
    text = " ".join(run.unreachable.values()).lower()
    if "status 255" in text or "ssh" in text:
        yield (
            "  hint: the exec channel failed before the agent ran: try the --exec template by "
            "hand for one host (e.g. ssh -o BatchMode=yes USER@ADDRESS true); check the user, "
            "keys and known_hosts in your ssh config (BatchMode=yes never asks for a password)"
        )
    else:
        yield (
            "  hint: run the --exec template by hand for one host to see why its agent did not "
            "run; --agent-cmd or --bundle when portmesh is not installed there (docs/mesh.md)"
        )


def _cut(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 4] + " ..."


def _verb(reasons: dict[str, int]) -> tuple[str, str]:
    """(present, participle) for how the packets were stopped, from the fail reasons."""
    words = " ".join(reasons).lower()
    if reasons and all(r.startswith("closed") for r in reasons):
        return "rejects", "rejected"  # an RST came back
    if any(w in words for w in ("unreach", "prohibit", "reject", "refused", "reset")):
        return "rejects", "rejected"
    if any(w in words for w in ("no-response", "timeout", "filtered")):
        return "drops", "dropped"
    return "blocks", "blocked"


def _why(reasons: dict[str, int]) -> str:
    if not reasons:
        return ""
    top = sorted(reasons.items(), key=lambda kv: -kv[1])
    return ", ".join(r for r, _ in top[:2]) + (", ..." if len(top) > 2 else "")


def _ports_text(req: Requirement, blocked: PortSet, closed: PortSet) -> str:
    text = port_label(req.proto, blocked) if blocked else ""
    if closed:
        c = port_label(req.proto, closed) + " closed (nothing listening)"
        text = f"{text}; {c}" if text else c
    return text or port_label(req.proto, req.ports)


def _fail_line(run: Run, req: Requirement, f: Finding) -> str:
    names = run.names
    blocked, closed = f.ports(req)
    if closed and not blocked:  # check --expect listening: nothing listens, nothing blocked
        return _nothing_listening_line(run, req, f, closed)
    ports = _ports_text(req, blocked, closed)
    reasons = f.reasons(req)
    present, participle = _verb(reasons)
    why = _why(reasons)
    host = names[f.host]
    peers = compress_names(names[i] for i in f.peers)
    if reasons and all(r.endswith(LOCAL_PROHIBITED) for r in reasons):
        # the source's own output rules refused the send (EPERM): nothing left it
        participle = (
            "refused by each source's own output rules"
            if f.kind == INGRESS
            else f"refused by {host}'s own output rules"
        )
        if f.kind == INGRESS:
            return f"{host}: {ports} {participle} ({len(f.peers)} sources: {peers}; {why})"
    if f.kind == INGRESS:
        if f.every:
            return (
                f"{host} {present} {ports} from every peer ({len(f.peers)} sources: {peers}; {why})"
            )
        return (
            f"{host}: {ports} {participle} from {peers} "
            f"({len(f.peers)} of {f.required} sources; {why})"
        )
    if f.kind == EGRESS:
        if f.every:
            return f"{host} cannot reach {ports} on any peer ({len(f.peers)} destinations: {peers}; {why})"
        return (
            f"{host} -> {peers}: {ports} {participle} "
            f"({len(f.peers)} of {f.required} destinations; {why})"
        )
    b = names[f.peers[0]]
    if f.kind == ONE_WAY:
        return f"one-way: {host} -> {b} {ports} {participle}, {b} -> {host} fine ({why})"
    if f.kind == BOTH:
        return f"{host} <-> {b}: {ports} {participle} both ways ({why})"
    rev = "" if f.reverse is None else f", {b} -> {host} {f.reverse}"
    return f"{host} -> {b}: {ports} {participle}{rev} ({why})"


def _nothing_listening_line(run: Run, req: Requirement, f: Finding, closed: PortSet) -> str:
    """The packets got through and were answered with a reset: no service, not a firewall."""
    names = run.names
    label = port_label(req.proto, closed)
    host = names[f.host]
    peers = compress_names(names[i] for i in f.peers)
    if f.kind == INGRESS:
        seen = (
            f"every peer ({len(f.peers)} sources: {peers})"
            if f.every
            else (f"{peers} ({len(f.peers)} of {f.required} sources)")
        )
        return f"{host}: nothing listening on {label} (closed, seen from {seen})"
    if f.kind == EGRESS:
        return (
            f"{host} -> {peers}: nothing listening on {label} "
            f"(closed at {len(f.peers)} of {f.required} destinations)"
        )
    b = names[f.peers[0]]
    if f.kind == BOTH:
        return f"{host} <-> {b}: nothing listening on {label} either way (closed)"
    return f"{host} -> {b}: nothing listening on {label} at {b} (closed)"


def _unknown_line(run: Run, req: Requirement, f: Finding) -> str:
    names = run.names
    ports = PortSet()
    for k in f.cells:
        c = req.cells[k]
        if isinstance(c, Cell):
            ports.update(c.unknown_ports)
    label = port_label(req.proto, ports) if ports else port_label(req.proto, req.ports)
    reasons: dict[str, int] = {}
    for r, n in f.reasons(req).items():  # the unreachable lines above give the agents' errors
        r = _UNREACHABLE if r.startswith(_UNREACHABLE) else r
        reasons[r] = reasons.get(r, 0) + n
    why = _why(reasons)
    host = names[f.host]
    peers = "every peer" if f.every else compress_names(names[i] for i in f.peers)
    if f.kind == INGRESS:
        return f"unknown: {label} to {host} from {peers} ({why})"
    if f.kind == EGRESS:
        return f"unknown: {label} from {host} to {peers} ({why})"
    return f"unknown: {host} -> {names[f.peers[0]]} {label} ({why})"


def _matrix(run: Run, failed: list[Requirement]) -> Iterator[str]:
    """One matrix for all failed requirements: a letter per requirement, a digit when several."""
    letters = {req.key: LETTERS[i] if i < len(LETTERS) else "#" for i, req in enumerate(failed)}
    # per direction: the failing requirement keys; and which directions were required at all
    fails: dict[int, list[str]] = {}
    involvement: dict[int, int] = {}
    for req in failed:
        for k in failing_keys(req, "fail"):
            fails.setdefault(k, []).append(req.key)
            s, d = divmod(k, STRIDE)
            involvement[s] = involvement.get(s, 0) + 1
            involvement[d] = involvement.get(d, 0) + 1
    hosts = sorted(involvement, key=lambda i: (-involvement[i], natural_key(run.names[i])))
    hidden = len(hosts) - MATRIX_MAX
    hosts = sorted(hosts[:MATRIX_MAX], key=lambda i: natural_key(run.names[i]))
    yield (
        "failure matrix (rows: source, columns: destination; "
        ". pass, letter: the failing requirement, digit: that many failing, "
        "? unknown, blank: not required, - self)"
    )
    for req in failed:
        label = port_label(req.proto, req.ports)
        yield f"  {letters[req.key]} = {req.key}" + ("" if label == req.key else f" {label}")
    width = max(len(run.names[i]) for i in hosts)
    n = len(hosts)
    if n >= 10:
        yield " " * (width + 7) + "".join(
            str((j + 1) // 10 % 10) if j >= 9 else " " for j in range(n)
        )
    yield " " * (width + 7) + "".join(str((j + 1) % 10) for j in range(n))
    for i, s in enumerate(hosts):
        row = []
        for d in hosts:
            if s == d:
                row.append("-")
                continue
            k = s * STRIDE + d
            f = fails.get(k)
            if f:
                row.append(letters[f[0]] if len(f) == 1 else (str(len(f)) if len(f) < 10 else "*"))
                continue
            states = {req.cell_state(k) for req in failed} - {None}
            row.append("" if not states else ("?" if "unknown" in states else "."))
            if not states:
                row[-1] = " "
        yield f"{i + 1:>4}  {run.names[s]:<{width}} " + "".join(row)
    if hidden > 0:
        yield f"  (+{hidden} more hosts involved in failures not shown: see --format html)"
