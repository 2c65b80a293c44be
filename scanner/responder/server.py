"""Temporary responders: make the far side answer before the cluster is installed.

TCP: one listening socket per port; on accept the responder sends ``tags.tcp_token(secret,
port)`` (16 bytes) and closes, so a prober holding the secret reports ``open``/``responder``
rather than ``open``/``syn-ack`` (another service answered).

UDP: one socket per port; a datagram that carries a valid probe tag (``tags.find_tag``) gets
``tags.reply_for(secret, nonce)`` back (20 bytes, never more than the datagram that asked, since
a valid tag alone is 20 bytes). Untagged, truncated or garbage datagrams get nothing: the
responder cannot be used for reflection or amplification. Replies leave from the address the
probe was sent to (IP_PKTINFO), so a multi-homed host answers a connected prober correctly.

Lifecycle: everything is bound first, then ONE line is printed on stdout::

    {"type":"ready","bound":{"tcp":"2379-2380,30000-32767","udp":"4789"},
     "failed":[{"proto":"tcp","port":22,"error":"address in use","pid":812,"process":"sshd",
                "local":["0.0.0.0"]}],
     "addr":"0.0.0.0","pid":4711,"ttl":300}

A port that is already in use is answered by its real service, which is fine for the firewall
question: it is listed under ``failed`` with the owning process when /proc tells, and the
addresses the holding sockets are bound to (``local``, from /proc/net). With ``also`` (the mesh
gives the host's inventory address), a port held only on other addresses (a service on
127.0.0.1) is bound on those addresses instead and listed under ``bound_on``, not ``failed``. The responder
exits when its TTL runs out (default ``DEFAULT_TTL`` = 300 s), on SIGTERM or SIGINT, or - only
with ``exit_on_stdin_close`` (``--parent-channel``) - when its stdin reaches end of file; it then
closes every socket and prints ``{"type":"exit","reason":...,"stats":{...}}``. A standalone
responder ignores stdin, so ``</dev/null`` or a closed terminal do not stop it. It opens no
control port.

The NodePort range alone is 2,768 TCP sockets: RLIMIT_NOFILE is raised to its hard limit first
(scanner.core.privileges.raise_nofile); ``FD_RESERVE`` descriptors stay free (accepts, the
witness, stdio), and ports beyond the budget are not tried but reported as failed ("too many
open files", no ``local``): the responder keeps serving the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from scanner.core import tags
from scanner.core.ports import ports_text as ranges_text  # one implementation, re-exported
from scanner.core.privileges import raise_nofile
from scanner.responder.holders import Failure, annotate_owners, holder_secret, name_responder
from scanner.responder.witness import Witness

DEFAULT_TTL = 300.0  # seconds: long enough for a mesh of a few hundred hosts, short if forgotten
MAX_TTL = 7 * 24 * 3600.0
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Linux value; Python does not export it
_PKTINFO = struct.Struct("@i4s4s")  # struct in_pktinfo: ifindex, spec_dst, addr
_PKTINFO6 = struct.Struct("@16sI")  # struct in6_pktinfo: addr, ifindex
_UDP_BATCH = 64  # datagrams drained per readiness callback, so one busy port cannot starve others
_ACCEPT_BATCH = 64


@dataclass
class ResponderConfig:
    tcp_ports: list[int]
    udp_ports: list[int]
    secret: bytes
    bind: str = "0.0.0.0"
    ttl: float = DEFAULT_TTL
    exit_on_stdin_close: bool = False
    witness: bool = (
        False  # also capture tagged probes with an AF_PACKET socket (scanner.responder.witness)
    )
    name: str | None = None  # the inventory host name, echoed in the ready record
    show_secret: bool = False  # put the secret in the ready record (it was generated here)
    use_uvloop: bool = True
    # addresses of this host the probes are sent to (the mesh: the inventory address). A port
    # whose wildcard bind fails because a socket bound elsewhere holds it (a service on
    # 127.0.0.1) is bound on these instead, so our responder still answers where probes arrive
    also: list[str] = field(default_factory=list)


@dataclass
class Stats:
    tcp_accepted: int = 0
    udp_replied: int = 0
    udp_ignored: int = 0  # untagged, truncated, garbage, or a tag for another secret
    witnessed: int = 0


@dataclass
class Responder:
    """Bound responder sockets on one event loop. ``start`` binds, ``close`` releases all."""

    tcp_ports: list[int]
    udp_ports: list[int]
    secret: bytes
    bind: str = "0.0.0.0"
    stats: Stats = field(default_factory=Stats)
    bound_tcp: list[int] = field(default_factory=list)
    bound_udp: list[int] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    also: list[str] = field(default_factory=list)  # ResponderConfig.also
    # address -> {"tcp": [...], "udp": [...]}: ports bound on that address only (``also``)
    bound_on: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    # called with (proto, source address, port) for every accepted connection and every tagged
    # datagram: `portmesh watch` counts incoming probes per source with it
    on_hit: Callable[[str, str, int], None] | None = None
    # "same" / "other": the portmesh responder holding some of our ports uses our secret or
    # another (holders.holder_secret); None when no such holder answered
    holder_secret: str | None = None
    _socks: list[socket.socket] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Bind every port and register the readers (synchronous: binding does not block)."""
        self._loop = loop or asyncio.get_running_loop()
        room = _fd_room(raise_nofile())
        addr = ipaddress.ip_address(self.bind)
        family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
        pktinfo = family == socket.AF_INET and addr.is_unspecified
        if self.bind == "::":
            # both families: a socket set per family (IPV6_V6ONLY), so each answers UDP from
            # the address the probe was sent to (IP_PKTINFO / IPV6_PKTINFO); on a host without
            # IPv6 the IPv4 set alone serves
            binds = [(socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")]
            family, pktinfo = socket.AF_INET, True
        else:
            binds = [(family, self.bind)]

        def budget(proto: str, port: int) -> bool:
            # stop short of the limit: an accept, the witness's socket, a later import (which
            # opens a file) all need a descriptor - running out there would end the responder
            nonlocal room
            if room < len(binds):
                self.failed.append(Failure(proto, port, "too many open files"))
                return False
            room -= len(binds)
            return True

        for port in dict.fromkeys(self.tcp_ports):
            if not budget("tcp", port):
                continue
            ok = False
            for fam, where in binds:
                s = self._open(fam, socket.SOCK_STREAM, "tcp", port, where, len(binds) > 1)
                if s is None:
                    if fam == socket.AF_INET:
                        break  # held on IPv4: handled as before (also-addresses), not half-bound
                    continue
                token = tags.tcp_token(self.secret, port)
                self._loop.add_reader(s.fileno(), self._on_accept, s, token, port)
                ok = True
            if ok:
                self.bound_tcp.append(port)
        for port in dict.fromkeys(self.udp_ports):
            if not budget("udp", port):
                continue
            ok = False
            for fam, where in binds:
                s = self._open(fam, socket.SOCK_DGRAM, "udp", port, where, len(binds) > 1)
                if s is None:
                    if fam == socket.AF_INET:
                        break  # held on IPv4: handled as before (also-addresses), not half-bound
                    continue
                info = ipaddress.ip_address(where).is_unspecified
                if info and fam == socket.AF_INET:
                    s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
                elif info:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
                self._loop.add_reader(s.fileno(), self._on_datagram, s, info, port)
                ok = True
            if ok:
                self.bound_udp.append(port)
        if self.failed:
            annotate_owners(self.failed)
            self.holder_secret = holder_secret(self.failed, self.secret)
        if self.also and addr.is_unspecified:
            self._bind_elsewhere(family, pktinfo)

    def _bind_elsewhere(self, family: int, pktinfo: bool) -> None:
        """Bind held ports on the ``also`` addresses when every holder listens on another
        address: the probes to those addresses then reach our responder, and a reset there is
        a firewall's again (no held-port rule needed)."""
        keep: list[Failure] = []
        for f in self.failed:
            local = f.local
            if f.error != "address in use" or not local or f.proto not in ("tcp", "udp"):
                keep.append(f)
                continue
            taken = set(local)
            if taken & {"0.0.0.0", "::"}:
                keep.append(f)
                continue
            done = False
            for a in self.also:
                if a in taken or ipaddress.ip_address(a).version != (
                    6 if family == socket.AF_INET6 else 4
                ):
                    continue
                kind = socket.SOCK_STREAM if f.proto == "tcp" else socket.SOCK_DGRAM
                s = self._open(family, kind, f.proto, f.port, a, quiet=True)
                if s is None:
                    continue
                assert self._loop is not None
                if f.proto == "tcp":
                    token = tags.tcp_token(self.secret, f.port)
                    self._loop.add_reader(s.fileno(), self._on_accept, s, token, f.port)
                else:
                    self._loop.add_reader(s.fileno(), self._on_datagram, s, False, f.port)
                on = self.bound_on.setdefault(a, {"tcp": [], "udp": []})
                on[f.proto].append(f.port)
                done = True
            if not done:
                keep.append(f)
        self.failed = keep

    def _open(
        self,
        family: int,
        kind: int,
        proto: str,
        port: int,
        where: str | None = None,
        dual: bool = False,
        addr: str | None = None,
        quiet: bool = False,
    ) -> socket.socket | None:
        where = where or addr or self.bind
        try:
            s = socket.socket(family, kind)
        except OSError as e:
            if dual and family == socket.AF_INET6 and e.errno == errno.EAFNOSUPPORT:
                return None  # no IPv6 on this host: the IPv4 socket serves
            if not quiet:
                self.failed.append(Failure(proto, port, _errtext(e)))
            return None
        try:
            s.setblocking(False)
            if kind == socket.SOCK_STREAM:
                # lets a restarted responder rebind while old connections sit in TIME_WAIT
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and dual:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((where, port))
            if kind == socket.SOCK_STREAM:
                s.listen(128)
        except OSError as e:
            s.close()
            if not quiet:
                self.failed.append(Failure(proto, port, _errtext(e)))
            return None
        self._socks.append(s)
        return s

    def _on_accept(self, s: socket.socket, token: bytes, port: int) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, peer = s.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # ECONNABORTED, EMFILE...: the client retries; never let one accept end us
                return
            self.stats.tcp_accepted += 1
            if self.on_hit is not None:
                self.on_hit("tcp", peer[0], port)
            try:
                conn.setblocking(False)
                conn.send(token)  # 16 bytes into an empty send buffer: never blocks
                conn.shutdown(socket.SHUT_WR)
                # drain what the peer sent, so close() sends a FIN and not a RST that could
                # overtake the token
                with contextlib.suppress(OSError):
                    conn.recv(65536)
            except OSError:
                pass
            finally:
                conn.close()

    def _on_datagram(self, s: socket.socket, pktinfo: bool, port: int) -> None:
        secret = self.secret
        for _ in range(_UDP_BATCH):
            try:
                if pktinfo:
                    data, anc, _flags, peer = s.recvmsg(65535, socket.CMSG_SPACE(_PKTINFO6.size))
                else:
                    data, peer = s.recvfrom(65535)
                    anc = []
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # e.g. ECONNREFUSED queued from an earlier reply's ICMP error: keep serving
                continue
            nonce = tags.find_tag(data, secret) if len(data) >= tags.TAG_LEN else None
            if nonce is None:
                self.stats.udp_ignored += 1
                continue
            if self.on_hit is not None:
                self.on_hit("udp", peer[0], port)
            reply = tags.reply_for(secret, nonce)
            if len(reply) > len(data):  # cannot happen with a valid tag; the rule is absolute
                self.stats.udp_ignored += 1
                continue
            try:
                if anc:
                    cmsg = _reply_pktinfo(anc)
                    s.sendmsg([reply], cmsg, 0, peer)
                else:
                    s.sendto(reply, peer)
                self.stats.udp_replied += 1
            except OSError:
                self.stats.udp_ignored += 1

    def close(self) -> None:
        loop = self._loop
        for s in self._socks:
            if loop is not None and not loop.is_closed():
                with contextlib.suppress(Exception):
                    loop.remove_reader(s.fileno())
            s.close()
        self._socks.clear()

    def ready_record(self, **extra: Any) -> dict[str, Any]:
        return {
            "type": "ready",
            "bound": {"tcp": ranges_text(self.bound_tcp), "udp": ranges_text(self.bound_udp)},
            "failed": [f.as_dict() for f in self.failed],
            "addr": self.bind,
            **(
                {
                    "bound_on": {
                        a: {p: ranges_text(v) for p, v in on.items()}
                        for a, on in self.bound_on.items()
                    }
                }
                if self.bound_on
                else {}
            ),
            "pid": os.getpid(),
            **({"holder_secret": self.holder_secret} if self.holder_secret else {}),
            **extra,
        }


FD_RESERVE = 64  # descriptors kept free for accepts, the witness, stdio and imports


def _fd_room(soft: int) -> int:
    """How many more sockets the responder may bind, keeping ``FD_RESERVE`` free."""
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 16
    return soft - in_use - FD_RESERVE


def _reply_pktinfo(anc: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]]:
    for level, kind, data in anc:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= _PKTINFO.size:
            _ifindex, _spec, dst = _PKTINFO.unpack(data[: _PKTINFO.size])
            # answer from the address the probe was sent to; let routing pick the interface
            return [(socket.IPPROTO_IP, IP_PKTINFO, _PKTINFO.pack(0, dst, b"\0\0\0\0"))]
        if (
            level == socket.IPPROTO_IPV6
            and kind == socket.IPV6_PKTINFO
            and len(data) >= _PKTINFO6.size
        ):
            dst6, _ifindex = _PKTINFO6.unpack(data[: _PKTINFO6.size])
            return [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, _PKTINFO6.pack(dst6, 0))]
    return []


def _errtext(e: OSError) -> str:
    if e.errno == errno.EADDRINUSE:
        return "address in use"
    if e.errno == errno.EMFILE or e.errno == errno.ENFILE:
        return "too many open files"
    if e.errno == errno.EACCES:
        return "permission denied"
    if e.errno == errno.EADDRNOTAVAIL:
        return "address not available"
    return e.strerror or str(e)


# ---- the process: run until TTL, signal or parent channel -----------------------------------


def _emit_to(stream: Any) -> Callable[[dict[str, Any]], None]:
    out = getattr(stream, "buffer", stream)

    def emit(rec: dict[str, Any]) -> None:
        try:
            out.write(orjson.dumps(rec) + b"\n")
            out.flush()
        except (BrokenPipeError, ValueError):
            pass  # the reader went away; keep serving until TTL or signal

    return emit


async def serve(cfg: ResponderConfig, emit: Callable[[dict[str, Any]], None]) -> str:
    """Bind, print ready, serve until TTL / signal / parent channel end; return the reason."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[str] = loop.create_future()

    def finish(reason: str) -> None:
        if not done.done():
            done.set_result(reason)

    r = Responder(
        list(cfg.tcp_ports), list(cfg.udp_ports), cfg.secret, cfg.bind, also=list(cfg.also)
    )
    witness = None
    handlers: list[int] = []
    stdin_fd: int | None = None
    try:
        r.start(loop)
        if cfg.witness:
            kernel_owned = [
                f.port for f in r.failed if f.proto == "udp" and f.error == "address in use"
            ]
            witness = Witness(cfg.secret, lambda rec: (_count(r), emit(rec)), kernel_owned)
            werr = witness.start(loop)
            if werr:
                r.failed.append(Failure("witness", 0, werr))
                witness = None
        for sig, name in ((signal.SIGTERM, "sigterm"), (signal.SIGINT, "sigint")):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, finish, name)
                handlers.append(sig)
        if cfg.exit_on_stdin_close:
            stdin_fd = _watch_stdin(loop, finish)
        loop.call_later(cfg.ttl, finish, "ttl")
        extra: dict[str, Any] = {"ttl": cfg.ttl, "witness": witness is not None}
        if cfg.name is not None:
            extra["host"] = cfg.name
        if cfg.show_secret:
            extra["secret"] = cfg.secret.decode()
        emit(r.ready_record(**extra))
        reason = await done
    finally:
        for sig in handlers:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        if stdin_fd is not None:
            with contextlib.suppress(Exception):
                loop.remove_reader(stdin_fd)
        if witness is not None:
            witness.close()
        r.close()
    emit(
        {
            "type": "exit",
            "reason": reason,
            "pid": os.getpid(),
            "stats": {
                "tcp_accepted": r.stats.tcp_accepted,
                "udp_replied": r.stats.udp_replied,
                "udp_ignored": r.stats.udp_ignored,
                "witnessed": r.stats.witnessed,
            },
        }
    )
    return reason


def _count(r: Responder) -> None:
    r.stats.witnessed += 1


def _watch_stdin(loop: asyncio.AbstractEventLoop, finish: Callable[[str], None]) -> int | None:
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, ValueError, OSError):
        finish("stdin-closed")
        return None
    os.set_blocking(fd, False)

    def on_read() -> None:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            finish("stdin-closed")

    try:
        loop.add_reader(fd, on_read)
    except (PermissionError, ValueError, OSError):
        # a regular file (or /dev/null) cannot be polled: it is at its end already, or will be
        finish("stdin-closed")
        return None
    return fd


def run_responder(cfg: ResponderConfig, stream: Any = None) -> int:
    """Run a responder process to completion (the body of ``portmesh respond``)."""
    emit = _emit_to(stream if stream is not None else sys.stdout)
    if threading.current_thread() is threading.main_thread() and stream is None:
        name_responder()  # a responder process: its holders' peers can tell it (holders.py)
    if cfg.use_uvloop:
        try:
            # lazy: uvloop is optional and wanted only here; the mesh agent and the watch import
            # this module for Responder alone and run their own loop
            import uvloop

            runner = uvloop.run  # type: ignore[attr-defined]
        except (ImportError, AttributeError):
            runner = asyncio.run
    else:
        runner = asyncio.run
    # SIGINT is handled in the loop; until the loop runs, the default handler would raise
    # KeyboardInterrupt, which the CLI turns into exit 130
    reason = runner(serve(cfg, emit))
    return 0 if reason in ("ttl", "sigterm", "sigint", "stdin-closed") else 1


def wait_ready(readline: Callable[[], bytes | str], timeout: float = 10.0) -> dict[str, Any]:
    """Read lines until the ready record (for callers that start a responder as a process)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = readline()
        if not line:
            break
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("type") == "ready":
            return rec
    raise TimeoutError("the responder did not report ready")
