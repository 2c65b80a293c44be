"""The mesh agent: ``portmesh agent``, NDJSON control over stdin/stdout (protocol version 1).

The coordinator starts one agent per host over its exec channel (ssh, ``ip netns exec``...) and
talks to it with one JSON object per line; the agent opens no port for control. The protocol,
in order (docs/mesh.md has the full field list):

    coordinator -> agent                         agent -> coordinator
    hello   {version, secret, name, roles}        hello {version, agent, python, pid}
    respond {tcp, udp, ttl, witness}              ready (the responder's own ready record)
                                                  witness ... (tagged probes seen arriving)
    probe   {scan_id, site, catalog, selection,   probing {planned}, result ..., done {summary}
             engine, expect}
    stop    {}                                    exit (the responder's exit record), then EOF

``hello`` comes first and once; ``respond`` and ``probe`` at most once each, after ``hello``;
``stop`` at any time. Anything else - a line that is not JSON, not an object, an unknown type,
a missing or mistyped field, a message out of order - is answered with
``{"type":"error","reason":...}`` and otherwise ignored: the agent never dies of its input.

Result lines are exactly the runner's result records (with ``req`` and ``verdict``, as in
``check``), plus ``i``: the flow's index in the agent's own plan, so a coordinator that loses
the agent knows which flows are still owed a result (it keeps a sliding window, not a set of
flows). The agent plans its own slice - ``plan()`` with ``sources={name}`` over the site and
catalog the coordinator sends - so the coordinator never materialises or ships a flow.

The responder runs as a child process (``python -m scanner.mesh.agent --responder``): it gets a
core of its own instead of competing with the prober's event loop, and it cannot be inherited
by anything the prober forks. It ends with the agent: its stdin is the agent's pipe
(``exit_on_stdin_close``), it gets SIGTERM from the kernel when the agent dies
(PR_SET_PDEATHSIG), and the agent terminates it on ``stop``, on SIGTERM and when its own stdin
closes - which is what a dead coordinator or a dropped ssh session looks like.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import orjson

from scanner.engine.output import NdjsonOutput

PROTOCOL_VERSION = 1
# TCP flows per (destination, requirement) that connect and read our responder's token; the
# rest go as raw SYNs when the agent may open raw sockets (issue 16: a NodePort sweep at the
# speed of the SYN sweep, the responder confirmed on a sample). See docs/mesh.md.
TOKEN_SAMPLE = 16
STOP_DRAIN = 300.0  # on stop, wait this long for in-flight probes before exiting anyway
MAX_LINE = 64 << 20  # a control line longer than this is refused (a 1,000-host site is ~0.5 MB)
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


class ProtocolError(Exception):
    """A control message that is malformed or out of order (answered with an error record)."""


# ---- the site on the wire -------------------------------------------------------------------


def _tuplify(v: Any) -> Any:
    return tuple(_tuplify(x) for x in v) if isinstance(v, list) else v


def _listify(v: Any) -> Any:
    return [_listify(x) for x in v] if isinstance(v, (tuple, list)) else v


def _setting_out(s: Any) -> Any:
    return None if s is None else [_listify(s.value), s.source]


def _host_out(h: Any) -> dict[str, Any]:
    return {
        "name": h.name,
        "address": h.address,
        "roles": sorted(h.roles),
        "cluster": h.cluster,
        "user": h.user,
        "address6": h.address6,
    }


def site_to_wire(site: Any) -> dict[str, Any]:
    """A resolved Site as plain JSON data (the agent does not re-read inventories or vars)."""
    clusters = []
    for c in site.clusters:
        cfg = c.config
        clusters.append(
            {
                "name": c.name,
                "kind": c.kind,
                "hosts": [_host_out(h) for h in c.hosts],
                "vips": dict(c.vips),
                "config": {
                    "cni": _setting_out(cfg.cni),
                    "features": {k: _setting_out(v) for k, v in cfg.features.items()},
                    "nodeport_range": _setting_out(cfg.nodeport_range),
                    "apiserver_port": _setting_out(cfg.apiserver_port),
                    "registry": _setting_out(cfg.registry),
                    "minio": _setting_out(cfg.minio),
                    "unresolved": dict(cfg.unresolved),
                    "families": _setting_out(cfg.families),
                    "vxlan6": _setting_out(cfg.vxlan6),
                    "endpoints": [
                        [e.name, e.host, e.port, list(e.vars), e.source] for e in cfg.endpoints
                    ],
                },
            }
        )
    return {
        "clusters": clusters,
        "bootstrap": None if site.bootstrap is None else _host_out(site.bootstrap),
        "vips": dict(site.vips),
        "source": site.source,
    }


def _want(d: Any, key: str, kinds: tuple[type, ...], where: str) -> Any:
    if not isinstance(d, dict):
        raise ProtocolError(f"{where}: expected an object")
    if key not in d:
        raise ProtocolError(f"{where}: field {key!r} is missing")
    v = d[key]
    if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
        raise ProtocolError(f"{where}: field {key!r} has the wrong type ({type(v).__name__})")
    return v


def _str_map(v: Any, where: str) -> dict[str, str]:
    if not isinstance(v, dict) or not all(
        isinstance(k, str) and isinstance(x, str) for k, x in v.items()
    ):
        raise ProtocolError(f"{where}: expected an object of strings")
    return dict(v)


def _setting_in(v: Any, where: str) -> Any:
    from scanner.core.model import Setting

    if v is None:
        return None
    if not isinstance(v, list) or len(v) != 2 or not isinstance(v[1], str):
        raise ProtocolError(f"{where}: expected [value, source]")
    return Setting(_tuplify(v[0]), v[1])


def _host_in(d: Any, where: str) -> Any:
    from scanner.core.model import Host

    roles = _want(d, "roles", (list,), where)
    if not all(isinstance(r, str) for r in roles):
        raise ProtocolError(f"{where}: field 'roles': expected strings")
    return Host(
        _want(d, "name", (str,), where),
        _want(d, "address", (str,), where),
        frozenset(roles),
        _want(d, "cluster", (str, type(None)), where),
        _want(d, "user", (str, type(None)), where),
        d.get("address6") if isinstance(d.get("address6"), str) else None,
    )


def _endpoints_in(v: Any, where: str) -> tuple[Any, ...]:
    """[[name, host, port, [vars], source], ...] -> Endpoints (scanner/plan/endpoints.py)."""
    from scanner.core.model import Endpoint

    if not isinstance(v, list):
        raise ProtocolError(f"{where}: expected a list")
    out = []
    for i, e in enumerate(v):
        if (
            not isinstance(e, list)
            or len(e) != 5
            or not all(isinstance(x, str) for x in (e[0], e[1], e[4]))
            or isinstance(e[2], bool)
            or not isinstance(e[2], int)
            or not 1 <= e[2] <= 65535
            or not isinstance(e[3], list)
            or not all(isinstance(x, str) for x in e[3])
        ):
            raise ProtocolError(f"{where}[{i}]: expected [name, host, port, [vars], source]")
        out.append(Endpoint(e[0], e[1], e[2], tuple(e[3]), e[4]))
    return tuple(out)


def site_from_wire(d: Any) -> Any:
    """The inverse of site_to_wire; ProtocolError naming the field on anything malformed."""
    from scanner.core.model import Cluster, ClusterConfig, Site

    clusters = []
    for i, c in enumerate(_want(d, "clusters", (list,), "site")):
        w = f"site: clusters[{i}]"
        hosts = tuple(
            _host_in(h, f"{w}.hosts[{j}]") for j, h in enumerate(_want(c, "hosts", (list,), w))
        )
        cfg = _want(c, "config", (dict,), w)
        cw = f"{w}.config"
        feats = _want(cfg, "features", (dict,), cw)
        cni = _setting_in(_want(cfg, "cni", (list,), cw), f"{cw}.cni")
        config = ClusterConfig(
            cni=cni,
            features={str(k): _setting_in(v, f"{cw}.features.{k}") for k, v in feats.items()},
            nodeport_range=_setting_in(_want(cfg, "nodeport_range", (list,), cw), cw),
            apiserver_port=_setting_in(_want(cfg, "apiserver_port", (list,), cw), cw),
            registry=_setting_in(cfg.get("registry"), f"{cw}.registry"),
            minio=_setting_in(cfg.get("minio"), f"{cw}.minio"),
            unresolved=_str_map(cfg.get("unresolved", {}), f"{cw}.unresolved"),
            **{
                k: _setting_in(cfg[k], f"{cw}.{k}")
                for k in ("families", "vxlan6")
                if cfg.get(k) is not None
            },
            endpoints=_endpoints_in(cfg.get("endpoints", []), f"{cw}.endpoints"),
        )
        if any(v is None for v in config.features.values()):
            raise ProtocolError(f"{cw}.features: a feature without a setting")
        clusters.append(
            Cluster(
                _want(c, "name", (str,), w),
                _want(c, "kind", (str,), w),
                hosts,
                _str_map(c.get("vips", {}), f"{w}.vips"),
                config,
            )
        )
    boot = d.get("bootstrap")
    return Site(
        tuple(clusters),
        None if boot is None else _host_in(boot, "site: bootstrap"),
        _str_map(d.get("vips", {}), "site: vips"),
        str(d.get("source") or ""),
    )


def _ports_in(v: Any, where: str) -> list[int]:
    """ "2379-2380,30000" -> ports (strictly: digits, commas, dashes; 1-65535)."""
    if not isinstance(v, str):
        raise ProtocolError(f"{where}: expected a port list string")
    out: list[int] = []
    for tok in v.split(","):
        tok = tok.strip()
        if not tok:
            continue
        lo_s, _, hi_s = tok.partition("-")
        if not lo_s.isdigit() or (hi_s and not hi_s.isdigit()):
            raise ProtocolError(f"{where}: bad port {tok!r}")
        lo, hi = int(lo_s), int(hi_s or lo_s)
        if not 1 <= lo <= hi <= 65535:
            raise ProtocolError(f"{where}: port {tok!r} is not within 1-65535")
        out.extend(range(lo, hi + 1))
    return out


# ---- the output channel ---------------------------------------------------------------------


class Channel(NdjsonOutput):
    """stdout, shared by the control loop and the probing thread (whole lines, under a lock).

    The runner's start record goes out as ``probing``, its summary as ``done``; ``stopping``
    tells the engine (through ``dead``) to launch nothing new.
    """

    def __init__(self, fd: int = 1) -> None:
        super().__init__(None, stdout=True, fd=fd)
        self._lock = threading.RLock()
        self.stopping = False
        self.tallies: list[list[Any]] = []  # --emit failures: sent inside ``done``

    @property
    def dead(self) -> bool:  # type: ignore[override]
        return self.stopping or self.stdout_closed

    def record(self, rec: dict[str, Any]) -> None:
        t = rec.get("type")
        if t == "start":
            rec = {"type": "probing", "scan_id": rec.get("scan_id"), "planned": rec.get("planned")}
        elif t == "tally":
            # one record per (destination, requirement), all inside ``done``: the coordinator
            # counts them together with the done or not at all (an agent that dies before it
            # says done owes every flow it did not send)
            self.tallies.append(
                [rec["host"], rec["dst"], rec["req"], rec["proto"], rec["flows"], rec["states"],
                 rec.get("ports"), rec.get("src"), rec.get("af")]
            )  # fmt: skip
            return
        elif t == "summary":
            rec = {**rec, "type": "done"}
            if self.tallies:
                rec["tallies"] = self.tallies
        with self._lock:
            super().record(rec)

    def send(self, rec: dict[str, Any]) -> None:
        """One control record, written through at once."""
        with self._lock:
            super().record(rec)
            super().flush()

    def write(self, data: bytes) -> None:
        with self._lock:
            super().write(data)

    def flush(self) -> None:
        with self._lock:
            super().flush()


# ---- the agent ------------------------------------------------------------------------------


class Agent:
    """The protocol state machine; I/O through ``out`` and the hooks it starts."""

    def __init__(self, out: Channel, loop: asyncio.AbstractEventLoop) -> None:
        self.out = out
        self.loop = loop
        self.state = "new"  # new -> hello; respond / probe once each; stopped
        self.name: str | None = None
        self.secret: bytes | None = None
        self.responded = False
        self.probed = False
        self.responder: asyncio.subprocess.Process | None = None
        self.probe_thread: threading.Thread | None = None
        self.done = loop.create_future()
        self.tmp = tempfile.mkdtemp(prefix="portmesh-agent-")

    # -- lines in ------------------------------------------------------------------------------

    def line(self, raw: bytes) -> None:
        """One control line; never raises."""
        if not raw.strip():
            return
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            self.error(f"not JSON: {str(e).splitlines()[0][:120]}")
            return
        if not isinstance(msg, dict):
            self.error(f"not a JSON object but {type(msg).__name__}")
            return
        t = msg.get("type")
        handler = (
            {
                "hello": self.on_hello,
                "respond": self.on_respond,
                "probe": self.on_probe,
                "stop": self.on_stop,
            }.get(t)
            if isinstance(t, str)
            else None
        )
        if handler is None:
            self.error(f"unknown message type {t!r} (hello, respond, probe, stop)", t)
            return
        try:
            handler(msg)
        except ProtocolError as e:
            self.error(str(e), t)
        except Exception as e:  # noqa: BLE001 - the agent must answer, not die
            self.error(f"{t}: {type(e).__name__}: {e}", t)

    def error(self, reason: str, about: Any = None) -> None:
        rec: dict[str, Any] = {"type": "error", "reason": reason}
        if isinstance(about, str):
            rec["message"] = about
        self.out.send(rec)

    # -- messages ------------------------------------------------------------------------------

    def on_hello(self, msg: dict[str, Any]) -> None:
        if self.state != "new":
            raise ProtocolError("out of order: hello was already received")
        version = _want(msg, "version", (int,), "hello")
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"hello: protocol version {version} is not supported (this agent speaks "
                f"{PROTOCOL_VERSION}); install the coordinator's portmesh version on this host"
            )
        secret = _want(msg, "secret", (str,), "hello")
        name = _want(msg, "name", (str,), "hello")
        if not secret or not name:
            raise ProtocolError("hello: secret and name must not be empty")
        roles = msg.get("roles", [])
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise ProtocolError("hello: field 'roles' must be a list of strings")
        import scanner
        from scanner import __version__

        self.secret, self.name, self.state = secret.encode(), name, "hello"
        self.out.send(
            {
                "type": "hello",
                "version": PROTOCOL_VERSION,
                "agent": f"portmesh {__version__}",
                "python": ".".join(map(str, sys.version_info[:3])),
                "name": name,
                "pid": os.getpid(),
                "module": os.path.dirname(os.path.abspath(scanner.__file__)),
            }
        )

    def _after_hello(self, what: str) -> None:
        if self.state == "new":
            raise ProtocolError(f"out of order: {what} before hello")
        if self.state == "stopped":
            raise ProtocolError(f"out of order: {what} after stop")

    def on_respond(self, msg: dict[str, Any]) -> None:
        self._after_hello("respond")
        if self.responded:
            raise ProtocolError("out of order: respond was already received")
        tcp = _ports_in(msg.get("tcp", ""), "respond: tcp")
        udp = _ports_in(msg.get("udp", ""), "respond: udp")
        ttl = msg.get("ttl", 300)
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl <= 7 * 86400:
            raise ProtocolError("respond: field 'ttl' must be seconds in (0, 604800]")
        witness = bool(msg.get("witness", True))
        bind = msg.get("bind")  # one address (agents sharing a machine), else all
        if bind is not None:
            try:
                ipaddress.ip_address(bind)
            except (TypeError, ValueError):
                raise ProtocolError("respond: field 'bind' must be an IP address") from None
        addr = msg.get("addr")
        if addr is not None:
            try:
                addr = str(ipaddress.ip_address(addr))
            except (ValueError, TypeError):
                addr = None  # a name the inventory did not resolve: the wildcard only
        self.responded = True
        cfg = {"tcp": tcp, "udp": udp, "ttl": ttl, "witness": witness, "name": self.name,
               "bind": bind, "also": [addr] if addr else []}  # fmt: skip
        self.loop.create_task(self._run_responder(cfg))

    async def _run_responder(self, cfg: dict[str, Any]) -> None:
        env = dict(os.environ)
        env["PORTMESH_SECRET"] = (self.secret or b"").decode()
        # the child imports scanner from wherever this agent did (a bundle's temp dir too)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "scanner.mesh.agent",
                "--responder",
                orjson.dumps(cfg).decode(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                preexec_fn=_die_with_parent,
                limit=MAX_LINE,
            )
        except OSError as e:
            self.error(f"respond: cannot start the responder: {e}", "respond")
            return
        self.responder = proc
        assert proc.stdout is not None
        from scanner.mesh.transport import ndjson_records

        async for rec, _line in ndjson_records(proc.stdout):
            if rec.get("type") in ("ready", "witness", "exit"):
                self.out.send(rec)
        code = await proc.wait()
        if self.state != "stopped" and code != 0:
            self.error(f"the responder exited with status {code}", "respond")

    def on_probe(self, msg: dict[str, Any]) -> None:
        self._after_hello("probe")
        if self.probed:
            raise ProtocolError("out of order: probe was already received")
        job = self._probe_job(msg)
        self.probed = True
        t = threading.Thread(target=job, name="probe", daemon=True)
        self.probe_thread = t
        t.start()

    def _probe_job(self, msg: dict[str, Any]) -> Callable[[], None]:
        """Validate a probe message into a function that runs it (in a thread)."""
        from scanner.catalog import load_catalog
        from scanner.engine.engine import EngineConfig
        from scanner.errors import ScannerError
        from scanner.plan.selection import Selection
        from scanner.probes.base import ProbeOptions

        scan_id = _want(msg, "scan_id", (str,), "probe")
        site = site_from_wire(_want(msg, "site", (dict,), "probe"))
        files = []
        cat = msg.get("catalog") or {}
        for i, f in enumerate(_want(cat, "files", (list,), "probe: catalog")):
            text = _want(f, "text", (str,), f"probe: catalog.files[{i}]")
            name = os.path.basename(_want(f, "name", (str,), f"probe: catalog.files[{i}]"))
            path = os.path.join(self.tmp, f"{i}-{name or 'catalog.toml'}")
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
        try:
            catalog = load_catalog(files)
            selection = Selection(
                cni=cni,
                with_features=words["with"],
                without_features=words["without"],
                nodeport_sample=sample,
                sources=frozenset({self.name or ""}),
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
                secret=self.secret,
                vxlan_vni=eng.get("vxlan_vni", 4096),
                udp_payloads={int(k): v for k, v in payloads.items()} or None,
            ),
        )
        if msg.get("from_own_address"):  # agents sharing a machine: probe from our address
            own = next((h for h in site.hosts() if h.name == self.name), None)
            if own is None:
                raise ProtocolError(f"probe: from_own_address: {self.name!r} is not in the site")
            engine = dataclasses.replace(
                engine, probe_options=dataclasses.replace(engine.probe_options, source=own.address)
            )
        loop_kind = eng.get("loop", "uvloop")
        out = self.out

        def job() -> None:
            try:
                probe_slice(
                    catalog, site, selection, engine, out, scan_id, expect, loop_kind, unbound,
                    emit, unsure,
                )  # fmt: skip
            except Exception as e:  # noqa: BLE001 - reported, never raised into the thread
                out.send({"type": "error", "reason": f"probe failed: {type(e).__name__}: {e}"})

        return job

    def on_stop(self, msg: dict[str, Any]) -> None:
        if self.state == "stopped":
            return
        self.state = "stopped"
        self.loop.create_task(self.shutdown("stop"))

    async def shutdown(self, why: str) -> None:
        """Stop probing, end the responder (its exit record goes out), then finish."""
        self.out.stopping = True
        t = self.probe_thread
        if t is not None and why == "stop":
            # in-flight probes finish (at most max_timeout); unlaunched flows are reported
            await self.loop.run_in_executor(None, t.join, STOP_DRAIN)
        await self.end_responder(grace=2.0 if why == "stop" else 0.5)
        if not self.done.done():
            self.done.set_result(why)

    async def end_responder(self, grace: float) -> None:
        proc = self.responder
        if proc is None or proc.returncode is not None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(Exception):
                proc.stdin.close()  # the parent channel: the responder exits and says so
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        # let the reader task forward the exit record
        await asyncio.sleep(0)

    def cleanup(self) -> None:
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)


def _unbound_in(v: Any) -> dict[tuple[str, str], frozenset[int]]:
    """The probe message's ``unbound``: {address: {"tcp": ranges, "udp": ranges}}."""
    if not isinstance(v, dict):
        raise ProtocolError("probe: unbound must be an object")
    out: dict[tuple[str, str], frozenset[int]] = {}
    for addr, protos in v.items():
        if not isinstance(protos, dict):
            raise ProtocolError("probe: unbound values must be objects")
        for proto in ("tcp", "udp"):
            ports = _ports_in(protos.get(proto, ""), f"probe: unbound.{proto}")
            if ports:
                out[(str(addr), proto)] = frozenset(ports)
    return out


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
) -> None:
    """Plan this host's flows and run them; every result carries its plan index ``i``.

    ``unbound``: (destination address, proto) -> the ports its responder could not bind; a
    result there gets ``held_verdict`` and a ``verdict_reason``; ``unsure`` likewise, the ports
    where nothing tells who holds them (``unsure_verdict``)."""
    from scanner.core.results import Result
    from scanner.core.verdicts import verdict
    from scanner.engine.check import route_sources
    from scanner.engine.runner import RunSpec, run
    from scanner.plan.planner import count_plan, legs, plan

    inflight: dict[Any, int] = {}  # flow -> plan index, for the flows the engine holds
    held = unbound or {}
    doubt = unsure or {}
    # src: the address packets leave from (as check records it), not only the inventory's
    # (unless the probes are bound to a source: agents sharing a machine probe from their own)
    real = (
        {}
        if engine.probe_options.source
        else route_sources(
            {a for leg in legs(catalog, site, selection) if leg.count() for _, a in leg.dsts if a}
        )
    )

    def flows() -> Iterator[Any]:
        for i, f in enumerate(plan(catalog, site, selection)):
            inflight[f] = i
            yield f

    def annotate(r: Result) -> None:
        f = r.flow
        r.verdict = verdict(f.proto, r.state, expect, True)
        i = inflight.pop(f, None)
        extra = dict(r.extra) if r.extra else {}
        src = real.get(f.dst)
        if src is not None and src != f.src:
            extra["src"] = src
        if held and f.port is not None:
            ports = held.get((f.dst, f.proto))
            if ports is not None and f.port in ports:
                hv = held_verdict(r.state, expect)
                if hv is not None:
                    r.verdict, extra["verdict_reason"] = hv
        if doubt and f.port is not None:
            ports = doubt.get((f.dst, f.proto))
            if ports is not None and f.port in ports:
                uv = unsure_verdict(r.state, expect)
                if uv is not None:
                    r.verdict, extra["verdict_reason"] = uv
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
        )
    )


def _die_with_parent() -> None:
    """In the responder child: SIGTERM when the agent dies, whatever way it dies (Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


async def _serve(stdin_fd: int, out: Channel) -> str:
    loop = asyncio.get_running_loop()
    agent = Agent(out, loop)
    buf = bytearray()
    skipping = False  # inside an over-long line: drop bytes until its newline

    def on_readable() -> None:
        nonlocal buf, skipping
        try:
            chunk = os.read(stdin_fd, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            loop.remove_reader(stdin_fd)
            if buf.strip() and not skipping:
                agent.line(bytes(buf))
            buf.clear()
            # the coordinator is gone (or closed the channel): nothing can read what we say
            loop.create_task(agent.shutdown("eof"))
            return
        buf += chunk
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            if skipping:
                skipping = False
                continue
            if len(line) > MAX_LINE:
                agent.error(f"a control line longer than {MAX_LINE} bytes was dropped")
                continue
            agent.line(line)
        if len(buf) > MAX_LINE:
            agent.error(f"a control line longer than {MAX_LINE} bytes was dropped")
            buf.clear()
            skipping = True

    os.set_blocking(stdin_fd, False)
    loop.add_reader(stdin_fd, on_readable)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, lambda: loop.create_task(agent.shutdown("signal")))
    try:
        return await agent.done
    finally:
        with contextlib.suppress(Exception):
            loop.remove_reader(stdin_fd)
        agent.cleanup()


def run_agent(stdin_fd: int = 0, stdout_fd: int = 1) -> int:
    """The body of ``portmesh agent``: serve the control channel until stop or EOF."""
    out = Channel(stdout_fd)
    why = asyncio.run(_serve(stdin_fd, out))
    out.flush()
    # a probe thread still running (EOF mid-probe) must not hold the process: nobody reads it
    sys.stderr.flush()
    os._exit(0 if why in ("stop", "eof") else 1)


# ---- the responder child --------------------------------------------------------------------


def _responder_main(arg: str) -> int:
    from scanner.responder.server import ResponderConfig, run_responder

    cfg = orjson.loads(arg)
    secret = os.environ.pop("PORTMESH_SECRET", "").encode()
    if not secret:
        sys.stderr.write("portmesh agent: the responder got no secret\n")
        return 2
    return run_responder(
        ResponderConfig(
            tcp_ports=list(cfg["tcp"]),
            udp_ports=list(cfg["udp"]),
            secret=secret,
            ttl=float(cfg["ttl"]),
            exit_on_stdin_close=True,
            witness=bool(cfg["witness"]),
            name=cfg.get("name"),
            # one address when agents share a machine; else both families (dual-stack plans
            # probe IPv6 too; IPv4 alone on a host without IPv6)
            bind=cfg.get("bind") or "::",
            also=[str(a) for a in cfg.get("also") or ()],
        )
    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--responder":
        sys.exit(_responder_main(sys.argv[2]))
    sys.stderr.write("usage: python -m scanner.mesh.agent --responder CONFIG (internal)\n")
    sys.exit(2)
