"""The agent's probing (``probe`` message): the message checked into a job, this host's slice
of the plan run through the runner, and the verdicts of flows to ports a destination's
responder could not bind.

Loaded by the agent on the probe message, not at its start (scanner/mesh/agent.py says why).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

from scanner.catalog import load_catalog
from scanner.core.results import Result
from scanner.core.verdicts import verdict
from scanner.engine.check import route_sources
from scanner.engine.engine import EngineConfig
from scanner.engine.runner import RunSpec, run
from scanner.errors import ScannerError
from scanner.mesh.wire import Channel, PassBlocks, ProtocolError, _unbound_in, _want, site_from_wire
from scanner.plan.planner import count_plan, legs, plan
from scanner.plan.selection import Selection
from scanner.probes.base import ProbeOptions

# TCP flows per (destination, requirement) that connect and read our responder's token; the
# rest go as raw SYNs when the agent may open raw sockets (issue 16: a NodePort sweep at the
# speed of the SYN sweep, the responder confirmed on a sample). See docs/mesh.md.
TOKEN_SAMPLE = 16
ENGINE_KEYS = {
    "concurrency": (int, type(None)),
    "rate": (int, float, type(None)),
    "max_per_host": (int, type(None)),
    "timeout": (int, float),
    "min_timeout": (int, float),
    "max_timeout": (int, float),
    "retries": (int,),
    "max_retries": (int,),
    "vxlan_vni": (int,),
    "loop": (str,),
}


def probe_job(
    msg: dict[str, Any], agent: str | None, secret: bytes | None, tmp: str, out: Channel
) -> Callable[[], None]:
    """Validate a probe message into a function that runs it (in a thread); ``agent``: this
    agent's host name (its plan slice: the flows from it)."""
    scan_id = _want(msg, "scan_id", (str,), "probe")
    site = site_from_wire(_want(msg, "site", (dict,), "probe"))
    files = []
    cat = msg.get("catalog") or {}
    for i, f in enumerate(_want(cat, "files", (list,), "probe: catalog")):
        text = _want(f, "text", (str,), f"probe: catalog.files[{i}]")
        name = os.path.basename(_want(f, "name", (str,), f"probe: catalog.files[{i}]"))
        path = os.path.join(tmp, f"{i}-{name or 'catalog.toml'}")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        files.append(path)
    sel = _want(msg, "selection", (dict,), "probe")
    sample = sel.get("nodeport_sample")
    if sample is not None and (isinstance(sample, bool) or not isinstance(sample, int)):
        raise ProtocolError("probe: selection.nodeport_sample must be an integer or null")
    words: dict[str, frozenset[str]] = {}
    for key in ("with", "without"):
        v = sel.get(key, [])
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ProtocolError(f"probe: selection.{key} must be a list of strings")
        words[key] = frozenset(v)
    cni = sel.get("cni")
    if cni is not None and not isinstance(cni, str):
        raise ProtocolError("probe: selection.cni must be a string or null")
    eng = _want(msg, "engine", (dict,), "probe")
    for k, v in eng.items():
        kinds = ENGINE_KEYS.get(k)
        if kinds is None and k != "udp_payloads":
            raise ProtocolError(f"probe: engine: unknown field {k!r}")
        if kinds is not None and (not isinstance(v, kinds) or isinstance(v, bool)):
            raise ProtocolError(f"probe: engine.{k} has the wrong type")
    payloads = eng.get("udp_payloads") or {}
    if not isinstance(payloads, dict) or not all(
        isinstance(k, str) and k.isdigit() and isinstance(v, str) for k, v in payloads.items()
    ):
        raise ProtocolError("probe: engine.udp_payloads must map port strings to kinds")
    expect = msg.get("expect", "reachable")
    if expect not in ("reachable", "listening"):
        raise ProtocolError("probe: expect must be reachable or listening")
    emit = msg.get("emit", "all")
    if emit not in ("all", "failures"):
        raise ProtocolError("probe: emit must be all or failures")
    unbound = _unbound_in(msg.get("unbound") or {})
    unsure = _unbound_in(msg.get("unsure") or {})
    silent = _silent_in(msg.get("silent") or {})
    try:
        catalog = load_catalog(files)
        selection = Selection(
            cni=cni,
            with_features=words["with"],
            without_features=words["without"],
            nodeport_sample=sample,
            sources=frozenset({agent or ""}),
            scanner=None,
        ).validate(catalog)
    except ScannerError as e:
        raise ProtocolError(f"probe: {e}") from None
    engine = EngineConfig(
        concurrency=eng.get("concurrency"),
        rate=eng.get("rate"),
        max_per_host=eng.get("max_per_host"),
        timeout=eng.get("timeout", 1.0),
        min_timeout=eng.get("min_timeout", 0.05),
        max_timeout=eng.get("max_timeout", 3.0),
        retries=eng.get("retries", 1),
        max_retries=eng.get("max_retries", 10),
        token_sample=TOKEN_SAMPLE,
        probe_options=ProbeOptions(
            secret=secret,
            vxlan_vni=eng.get("vxlan_vni", 4096),
            udp_payloads={int(k): v for k, v in payloads.items()} or None,
        ),
    )
    if msg.get("from_own_address"):  # agents sharing a machine: probe from our address
        own = next((h for h in site.hosts() if h.name == agent), None)
        if own is None:
            raise ProtocolError(f"probe: from_own_address: {agent!r} is not in the site")
        engine = dataclasses.replace(
            engine, probe_options=dataclasses.replace(engine.probe_options, source=own.address)
        )
    loop_kind = eng.get("loop", "uvloop")

    def job() -> None:
        try:
            probe_slice(
                catalog, site, selection, engine, out, scan_id, expect, loop_kind, unbound,
                emit, unsure, silent,
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001 - reported, never raised into the thread
            out.send({"type": "error", "reason": f"probe failed: {type(e).__name__}: {e}"})

    return job


HELD_PASS = (
    "the destination's responder could not bind this port (another socket holds it, e.g. a "
    "service on 127.0.0.1): the reset or port-unreachable came from the host itself, so the "
    "path is open"
)
UNSURE_UNKNOWN = (
    "the destination's responder could not bind this port and nothing tells what holds it "
    "(out of file descriptors, or no holder found): a reset cannot tell the host's own answer "
    "from a firewall's reject"
)
HELD_UNKNOWN = (
    "the destination's responder could not bind this port (another socket holds it): "
    "silence cannot tell a drop from a service that ignores the probe"
)


def silent_reason(holder: str) -> str:
    """The verdict_reason of UDP silence from a port held by ``holder`` (``silent_verdict``)."""
    if holder == "responder-secret-mismatch":  # scanner.mesh.launch.SECRET_MISMATCH
        return (
            "responder-secret-mismatch: the portmesh responder holding this port (started "
            "before the mesh) answers TCP with a token of another secret and ignores our "
            "datagrams: silence cannot tell a drop from it (give the mesh its --secret-file)"
        )
    what = (
        "a kernel socket (a VXLAN/WireGuard device)"
        if holder == "kernel"
        else f"another socket ({holder})"
    )
    return (
        f"held-by-{holder}: the destination's responder could not bind this port: {what} holds "
        "it and ignores a datagram that is not its protocol, so silence cannot tell a drop "
        "from it"
    )


def silent_verdict(state: str, holder: str) -> tuple[str, str] | None:
    """The verdict of a UDP flow to a port held on the probed address by a socket that is not
    a portmesh responder (scanner.mesh.launch.silent_holders): silence is unknown, never a
    fail; a reply still passes, an ICMP error (closed, filtered) still fails - with a socket
    on the port the host itself sends no port-unreachable."""
    if state == "open|filtered":
        return "unknown", silent_reason(holder)
    return None


def _silent_in(v: Any) -> dict[tuple[str, str], dict[int, str]]:
    """The probe message's ``silent``: {address: {port: holder}}."""
    if not isinstance(v, dict):
        raise ProtocolError("probe: silent must be an object")
    out: dict[tuple[str, str], dict[int, str]] = {}
    for addr, ports in v.items():
        if not isinstance(ports, dict):
            raise ProtocolError("probe: silent values must be objects")
        got: dict[int, str] = {}
        for port, holder in ports.items():
            if not (isinstance(port, str) and port.isdigit() and 0 < int(port) < 65536):
                raise ProtocolError("probe: silent ports must be port numbers")
            if not isinstance(holder, str):
                raise ProtocolError("probe: silent holders must be strings")
            got[int(port)] = holder[:64]
        out[(str(addr), "udp")] = got
    return out


def held_verdict(state: str, expect: str) -> tuple[str, str] | None:
    """The verdict (and why) of a TCP/UDP flow to a port the destination's responder could not
    bind, when it differs from ``verdict(..., responder=True)``; None when it does not.

    closed: with our responder there, a reset/port-unreachable would be a firewall's reject;
    without it, it is the host's own kernel answering - as before install (``reachable``) the
    path is open: pass. open|filtered (UDP silence): whatever holds the port may ignore our
    datagram: unknown, not fail. Everything else (open, filtered, error) is unchanged."""
    if state == "closed" and expect == "reachable":
        return "pass", HELD_PASS
    if state == "open|filtered":
        return "unknown", HELD_UNKNOWN
    return None


def unsure_verdict(state: str, expect: str) -> tuple[str, str] | None:
    """The verdict of a TCP/UDP flow to a port the destination's responder could not bind where
    nothing tells who holds it: a reset or silence there is unknown, never a pass (it could be
    a firewall's reject) nor a fail (it could be the host's own kernel). As ``held_verdict``
    otherwise."""
    if (state == "closed" and expect == "reachable") or state == "open|filtered":
        return "unknown", UNSURE_UNKNOWN
    return None


def probe_slice(
    catalog: Any,
    site: Any,
    selection: Any,
    engine: Any,
    out: Channel,
    scan_id: str,
    expect: str,
    loop_kind: str,
    unbound: dict[tuple[str, str], frozenset[int]] | None = None,
    emit: str = "all",
    unsure: dict[tuple[str, str], frozenset[int]] | None = None,
    silent: dict[tuple[str, str], dict[int, str]] | None = None,
) -> None:
    """Plan this host's flows and run them; every result carries its plan index ``i``.

    ``unbound``: (destination address, proto) -> the ports its responder could not bind; a
    result there gets ``held_verdict`` and a ``verdict_reason``; ``unsure`` likewise, the ports
    where nothing tells who holds them (``unsure_verdict``); ``silent``: (address, "udp") ->
    port -> holder, UDP ports held by a socket that ignores our datagram (``silent_verdict``)."""
    # id(flow) -> (plan index, flow), for the flows the engine holds (by identity: a hash of
    # the flow's fields per flow is a sweep's hot path; the flow is held so its id stays its own)
    inflight: dict[int, tuple[int, Any]] = {}
    held = unbound or {}
    doubt = unsure or {}
    quiet = silent or {}
    # src: the address packets leave from (as check records it), not only the inventory's
    # (unless the probes are bound to a source: agents sharing a machine probe from their own)
    real = (
        {}
        if engine.probe_options.source
        else route_sources(
            {a for leg in legs(catalog, site, selection) if leg.count() for _, a in leg.dsts if a}
        )
    )

    any_marked = bool(held or doubt or quiet)
    verdicts: dict[tuple[str, str], str] = {}

    def flows() -> Iterator[Any]:
        for i, f in enumerate(plan(catalog, site, selection)):
            inflight[id(f)] = (i, f)
            yield f

    def annotate(r: Result) -> None:
        f = r.flow
        v = verdicts.get((f.proto, r.state))
        if v is None:
            v = verdicts[(f.proto, r.state)] = verdict(f.proto, r.state, expect, True)
        r.verdict = v
        # a host name resolved by the engine: its result carries the planned flow
        got = inflight.pop(id(r.planned or f), None)
        i = None if got is None else got[0]
        extra = dict(r.extra) if r.extra else {}
        src = real.get(f.dst)
        if src is not None and src != f.src:
            extra["src"] = src
        if any_marked and f.port is not None:
            for marked, why in ((held, held_verdict), (doubt, unsure_verdict)):
                ports = marked.get((f.dst, f.proto)) if marked else None
                if ports is not None and f.port in ports:
                    v = why(r.state, expect)
                    if v is not None:
                        r.verdict, extra["verdict_reason"] = v
            holder = quiet.get((f.dst, f.proto), {}).get(f.port) if quiet else None
            if holder is not None:
                v = silent_verdict(r.state, holder)
                if v is not None:
                    r.verdict, extra["verdict_reason"] = v
        extra["i"] = i  # last: the coordinator cuts it off the forwarded line
        r.extra = extra

    run(
        RunSpec(
            flows=flows(),
            planned=count_plan(catalog, site, selection),
            engine=engine,
            argv=["portmesh", "agent"],
            output=out,
            annotate=annotate,
            scan_id=scan_id,
            loop=loop_kind,
            workers=1,  # a fork would inherit the control channel; one loop per agent
            emit=emit,
            passes=PassBlocks(scan_id) if emit == "all" else None,
        )
    )
