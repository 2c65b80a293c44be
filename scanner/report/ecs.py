"""Result records re-emitted as Elastic Common Schema (ECS) events, one NDJSON line each.

ECS field names are dotted paths into nested objects (``destination.port`` is
``{"destination": {"port": ...}}``). The mapping is documented in docs/report.md; ECS_FIELDS
below is the same table as data, and the tests check every emitted event against it.
Only ``result`` records become events; start / summary / host / pair records are skipped.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import IO, Any

import orjson

from scanner import __version__
from scanner.report.aggregate import derive_verdict

ECS_VERSION = "8.11.0"
OUTCOME = {"pass": "success", "fail": "failure", "unknown": "unknown"}
# portmesh proto -> (network.transport, network.iana_number) for IPv4; ICMP over IPv6 differs.
TRANSPORT = {
    "tcp": ("tcp", "6"),
    "udp": ("udp", "17"),
    "icmp": ("icmp", "1"),
    "ipip": ("ipv4", "4"),
}

# ECS field -> (type, portmesh source). The documented mapping, as data.
ECS_FIELDS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "@timestamp": (str, "ts"),
    "ecs.version": (str, f"constant {ECS_VERSION}"),
    "event.kind": (str, 'constant "event"'),
    "event.category": (list, 'constant ["network"]'),
    "event.type": (list, 'constant ["connection"]'),
    "event.outcome": (
        str,
        "verdict (derived for a plain scan): pass->success, fail->failure, unknown->unknown",
    ),
    "event.action": (str, '"port-probe"'),
    "event.reason": (str, "reason"),
    "event.duration": (int, "rtt_ms x 1e6 (nanoseconds), absent when rtt_ms is null"),
    "event.module": (str, 'constant "portmesh"'),
    "event.dataset": (str, 'constant "portmesh.result"'),
    "source.ip": (str, "src (absent when not recorded)"),
    "source.address": (str, "src_host, else src"),
    "destination.ip": (str, "dst (when it is an IP literal)"),
    "destination.address": (str, "host (the host name), else dst"),
    "destination.port": (int, "port (absent for icmp / ipip)"),
    "network.transport": (str, "proto: tcp, udp, icmp (ipv6-icmp over IPv6), ipip -> ipv4"),
    "network.iana_number": (str, "IANA protocol number of proto: 6, 17, 1 (58), 4"),
    "network.type": (str, "ipv4 / ipv6, from dst (af when dst is a name)"),
    "rule.id": (str, "req (proto/port for a plain scan)"),
    "rule.name": (str, "req, else proto/port"),
    "rule.ruleset": (str, 'constant "portmesh-catalog" (plain scan: "portmesh-scan")'),
    "observer.vendor": (str, 'constant "portmesh"'),
    "observer.product": (str, 'constant "portmesh"'),
    "observer.type": (str, 'constant "scanner"'),
    "observer.version": (str, "portmesh version"),
    "agent.type": (str, 'constant "portmesh"'),
    "agent.version": (str, "portmesh version"),
    "agent.name": (str, "src_host, when recorded (the host that probed)"),
    "labels.scan_id": (str, "scan_id"),
    "labels.state": (str, "state (open, closed, filtered, open|filtered, error)"),
    "labels.verdict": (str, "verdict, as in the input or derived"),
    "labels.proto": (str, "proto as portmesh names it"),
    "labels.attempts": (str, "attempts (labels are keywords: a string)"),
}
REQUIRED = (
    "@timestamp",
    "ecs.version",
    "event.kind",
    "event.category",
    "event.type",
    "event.outcome",
    "event.action",
    "event.module",
    "event.dataset",
    "destination.address",
    "network.transport",
    "rule.id",
    "rule.name",
    "observer.vendor",
    "agent.type",
    "labels.scan_id",
    "labels.state",
    "labels.verdict",
)


def _ip_version(s: str | None) -> int | None:
    if not s:
        return None
    try:
        return ipaddress.ip_address(s).version
    except ValueError:
        return None


_AF_VERSION = {"ipv4": 4, "ipv6": 6}


def to_ecs(rec: dict[str, Any]) -> dict[str, Any]:
    """One result record -> one ECS event (nested objects)."""
    proto = rec["proto"]
    port = rec.get("port")
    verdict = derive_verdict(rec)
    dst, src = rec.get("dst"), rec.get("src")
    # the family: from dst, or, for a destination probed by name, the record's af
    ver = _ip_version(dst) or _AF_VERSION.get(rec.get("af"))  # type: ignore[arg-type]
    transport, iana = TRANSPORT.get(proto, (proto, None))
    if proto == "icmp" and ver == 6:
        transport, iana = "ipv6-icmp", "58"
    req = rec.get("req")
    name = req or (f"{proto}/{port}" if port is not None else proto)

    event: dict[str, Any] = {
        "kind": "event",
        "category": ["network"],
        "type": ["connection"],
        "outcome": OUTCOME[verdict],
        "action": "port-probe",
        "module": "portmesh",
        "dataset": "portmesh.watch" if rec.get("type") == "watch" else "portmesh.result",
    }
    if rec.get("reason"):
        event["reason"] = str(rec["reason"])
    rtt = rec.get("rtt_ms")
    if isinstance(rtt, (int, float)):
        event["duration"] = int(round(rtt * 1_000_000))

    out: dict[str, Any] = {
        "@timestamp": rec.get("ts"),
        "ecs": {"version": ECS_VERSION},
        "event": event,
    }
    source: dict[str, Any] = {}
    if _ip_version(src):
        source["ip"] = src
    if rec.get("src_host") or src:
        source["address"] = rec.get("src_host") or src
    if source:
        out["source"] = source
    destination: dict[str, Any] = {"address": rec.get("host") or dst}
    if _ip_version(dst):
        destination["ip"] = dst
    if port is not None:
        destination["port"] = port
    out["destination"] = destination
    network: dict[str, Any] = {"transport": transport}
    if iana:
        network["iana_number"] = iana
    if ver:
        network["type"] = f"ipv{ver}"
    out["network"] = network
    out["rule"] = {
        "id": name,
        "name": name,
        "ruleset": "portmesh-catalog" if req else "portmesh-scan",
    }
    out["observer"] = {
        "vendor": "portmesh",
        "product": "portmesh",
        "type": "scanner",
        "version": __version__,
    }
    agent: dict[str, Any] = {"type": "portmesh", "version": __version__}
    if rec.get("src_host"):
        agent["name"] = rec["src_host"]
    out["agent"] = agent
    labels = {
        "scan_id": str(rec.get("scan_id") or "-"),
        "state": str(rec.get("state")),
        "verdict": verdict,
        "proto": proto,
    }
    if rec.get("attempts") is not None:
        labels["attempts"] = str(rec["attempts"])
    out["labels"] = labels
    return out


def flatten(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested ECS object -> {dotted path: value} (for validation; '@timestamp' stays as is)."""
    out: dict[str, Any] = {}
    for k, v in doc.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, path + "."))
        else:
            out[path] = v
    return out


def write_ecs(records: Iterable[dict[str, Any]], out: IO[bytes], batch: int = 512) -> int:
    """Convert every result record, streaming; returns the number of failures seen."""
    failures = 0
    buf: list[bytes] = []
    dumps = orjson.dumps
    for rec in records:
        t = rec["type"]
        if t in ("result", "watch"):  # a watch record is a state change shaped like a result
            ev = to_ecs(rec)
            if ev["event"]["outcome"] == "failure":
                failures += 1
            buf.append(dumps(ev, option=orjson.OPT_APPEND_NEWLINE))
            if len(buf) >= batch:
                out.write(b"".join(buf))
                buf.clear()
        elif t == "pair" and rec.get("verdict") in ("fail", "one-way"):
            failures += 1
    if buf:
        out.write(b"".join(buf))
    return failures
