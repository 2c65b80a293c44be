"""The mesh agent: ``portmesh agent``, NDJSON control over stdin/stdout (protocol version 3).

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
flows). Passing results travel in blocks (``wire.PassBlocks``: a header with their indexes and
what the coordinator folds, then the lines without ``i``); with ``--emit failures`` they are
tallied instead. The agent plans its own slice - ``plan()`` with ``sources={name}`` over the site and
catalog the coordinator sends - so the coordinator never materialises or ships a flow.

The responder runs as a child process (``python -m scanner.mesh.agent --responder``): it gets a
core of its own instead of competing with the prober's event loop, and it cannot be inherited
by anything the prober forks. It ends with the agent: its stdin is the agent's pipe
(``exit_on_stdin_close``), it gets SIGTERM from the kernel when the agent dies
(PR_SET_PDEATHSIG), and the agent terminates it on ``stop``, on SIGTERM and when its own stdin
closes - which is what a dead coordinator or a dropped ssh session looks like.

This module is the protocol state machine and the process; ``wire.py`` holds what crosses the
channel (the site as JSON, the field checks, the output channel) and ``probing.py`` the probe
message's job (the plan slice, the held/unsure verdicts).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from typing import Any

import orjson

import scanner
from scanner import __version__
from scanner.mesh.transport import ndjson_records
from scanner.mesh.wire import (  # noqa: F401 - site_from_wire/site_to_wire: the coordinator's and tests' names
    Channel,
    ProtocolError,
    _ports_in,
    _want,
    site_from_wire,
    site_to_wire,
)

PROTOCOL_VERSION = 3  # 2: --emit failures tallies in columns (wire.TallyGroups); 3: passing
# results in blocks (wire.PassBlocks)
STOP_DRAIN = 300.0  # on stop, wait this long for in-flight probes before exiting anyway
MAX_LINE = 64 << 20  # a control line longer than this is refused (a 1,000-host site is ~0.5 MB)


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
        # Loaded here, not at the top: the probe path (catalog, engine, plan) adds 65-110 ms to
        # importing this module (measured with importlib, 3 runs), which every agent's start
        # and its responder child (python -m scanner.mesh.agent --responder) would pay.
        from scanner.mesh.probing import probe_job

        job = probe_job(msg, self.name, self.secret, self.tmp, self.out)
        self.probed = True
        t = threading.Thread(target=job, name="probe", daemon=True)
        self.probe_thread = t
        t.start()

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
        shutil.rmtree(self.tmp, ignore_errors=True)


def _die_with_parent() -> None:
    """In the responder child: SIGTERM when the agent dies, whatever way it dies (Linux)."""
    try:
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
    # Here, not at the top: the responder server costs 71-78 ms of import (3 runs) that the
    # agent itself, which only starts the child, does not need.
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
