"""A port the responder could not bind (Failure), and who holds it: the holding sockets'
addresses and process, best effort, from /proc (this network namespace).
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from scanner.core import tags

# the command name (/proc/PID/comm) a responder process gives itself (``name_responder``), so
# another responder that finds the port held can tell a portmesh responder (which answers our
# tagged datagrams) from another holder (which may ignore them)
RESPONDER_COMM = "pm-responder"


def name_responder() -> None:
    """Set this process's command name to RESPONDER_COMM (prctl PR_SET_NAME), best effort.
    Only for a process that is a responder (``run_responder``), from its main thread."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(15, RESPONDER_COMM.encode(), 0, 0, 0)


@dataclass
class Failure:
    proto: str
    port: int
    error: str
    pid: int | None = None
    process: str | None = None
    # the local addresses the holding socket(s) are bound to ("0.0.0.0", "::", "127.0.0.1"...),
    # from /proc/net; None when nothing was found (out of descriptors, or /proc did not tell).
    # The mesh needs it: a holder bound to the wildcard or the probed address answers a probe
    # itself (a reset can only be a firewall's), one bound elsewhere leaves the reset to the kernel
    local: list[str] | None = None
    # the holder is a kernel socket (no process owns it: a VXLAN/WireGuard device's UDP port),
    # which ignores a datagram that is not its protocol: silence there is no firewall's
    kernel: bool = False

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"proto": self.proto, "port": self.port, "error": self.error}
        if self.pid is not None:
            d["pid"] = self.pid
        if self.process is not None:
            d["process"] = self.process
        if self.local is not None:
            d["local"] = self.local
        if self.kernel:
            d["kernel"] = True
        return d


def _proc_addr(text: str) -> str:
    """A /proc/net/{tcp,udp}[6] local address field (hex, host byte order per 32-bit word)."""
    raw = bytes.fromhex(text)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    addr = ipaddress.ip_address(words)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def _holders(proto: str, ports: set[int]) -> dict[int, tuple[int, list[str]]]:
    """port -> (socket inode, local addresses) of the listening TCP / bound UDP sockets on it,
    from /proc/net (this network namespace). A kernel socket (a VXLAN device's UDP port) has
    an inode too, but no process's descriptor points at it."""
    out: dict[int, tuple[int, list[str]]] = {}
    for path in (f"/proc/net/{proto}", f"/proc/net/{proto}6"):
        try:
            with open(path, encoding="ascii") as fh:
                next(fh, None)
                for line in fh:
                    f = line.split()
                    if len(f) < 10:
                        continue
                    host, _, port_hex = f[1].rpartition(":")
                    port = int(port_hex, 16)
                    if port not in ports or (proto == "tcp" and f[3] != "0A"):
                        continue
                    inode, addrs = out.get(port, (0, []))
                    addr = _proc_addr(host)
                    if addr not in addrs:
                        addrs.append(addr)
                    out[port] = (inode or int(f[9]), addrs)
        except (OSError, ValueError, IndexError):
            continue
    return out


def annotate_owners(failed: list[Failure]) -> None:
    """Fill in who holds each port that was "address in use": the holding sockets' local
    addresses, and the process (pid, command name) when /proc tells."""
    want: dict[tuple[str, int], int] = {}
    local: dict[tuple[str, int], list[str]] = {}
    for proto in ("tcp", "udp"):
        ports = {f.port for f in failed if f.proto == proto and f.error == "address in use"}
        if ports:
            for port, (inode, addrs) in _holders(proto, ports).items():
                local[(proto, port)] = addrs
                if inode:
                    want[(proto, port)] = inode
    for f in failed:
        f.local = local.get((f.proto, f.port))
    if not want:
        return
    by_inode = {f"socket:[{ino}]": key for key, ino in want.items()}
    owners: dict[tuple[str, int], tuple[int, str | None]] = {}
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return
    for pid in pids:
        if len(owners) == len(want):
            break
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            key = by_inode.get(target)
            if key is not None and key not in owners:
                try:
                    with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as fh:
                        comm: str | None = fh.read().strip()
                except OSError:
                    comm = None
                owners[key] = (int(pid), comm)
    for f in failed:
        o = owners.get((f.proto, f.port))
        if o is not None:
            f.pid, f.process = o
        elif f.local is not None and f.proto == "udp":
            # every process's descriptors were read and none is this socket: the kernel's own
            # (a VXLAN/WireGuard device's port)
            f.kernel = True


ASK_PORTS = 4  # held TCP ports asked at most (a firewall may refuse some of them)
ASK_TIMEOUT = 0.3  # seconds per port


def holder_secret(failed: list[Failure], secret: bytes) -> str | None:
    """Does the portmesh responder holding our ports use our secret? Connect to a few TCP
    ports a RESPONDER_COMM process holds and read its token: "same" (ours), "other" (a token
    made with another secret: it ignores our tagged datagrams too), None (no such holder, or
    no token came: refused, silent)."""
    asked = 0
    for f in failed:
        if asked >= ASK_PORTS:
            break
        if f.proto != "tcp" or f.process != RESPONDER_COMM or not f.local:
            continue
        asked += 1
        where = f.local[0]
        if where in ("0.0.0.0", "::"):
            where = "127.0.0.1" if "0.0.0.0" in f.local else "::1"
        fam = socket.AF_INET6 if ":" in where else socket.AF_INET
        got = b""
        with contextlib.suppress(OSError), socket.socket(fam, socket.SOCK_STREAM) as s:
            s.settimeout(ASK_TIMEOUT)
            s.connect((where, f.port))
            end = time.monotonic() + ASK_TIMEOUT
            while len(got) < tags.TOKEN_LEN and time.monotonic() < end:
                chunk = s.recv(tags.TOKEN_LEN - len(got))
                if not chunk:
                    break
                got += chunk
        if len(got) == tags.TOKEN_LEN and got.startswith(tags.MAGIC):
            return "same" if got == tags.tcp_token(secret, f.port) else "other"
    return None
