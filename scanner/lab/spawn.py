"""The lab's responders, one per host, forked from one process that imported and planned once.

``ip netns exec HOST python -m scanner respond --as HOST`` per host costs an interpreter start,
the imports and a plan for every host: ~0.5 s of CPU each, 50 s for a 100-host lab on two
cores. Here the parent imports the responder and works out every host's ports in one pass
over the plan's legs, then forks one child per host; the child leaves the parent's session,
enters the host's network namespace (setns on /run/netns/HOST, what ``ip netns exec`` does
for the network) and runs the same ``run_responder`` as ``portmesh respond``. Each child
writes its NDJSON (the ready line first) to its log file.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from scanner.plan.planner import legs
from scanner.responder.server import ResponderConfig, run_responder

CLONE_NEWNET = 0x40000000


def enter_netns(ns: str) -> None:
    """Move this (single-threaded) process into the named network namespace."""
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {ns}: {os.strerror(err)}")
    finally:
        os.close(fd)


def host_ports(catalog: Any, site: Any, selection: Any) -> dict[str, tuple[list[int], list[int]]]:
    """host name -> (tcp, udp) ports the plan probes it on, from the legs in one pass (the same
    rule as ``respond --as``: a destination with a source other than itself)."""
    out: dict[str, tuple[set[int], set[int]]] = {}
    for leg in legs(catalog, site, selection):
        if not (leg.applies and leg.srcs and leg.dsts and leg.ports):
            continue
        k = {"tcp": 0, "udp": 1}.get(leg.req.proto)
        if k is None:
            continue
        for dname, daddr in leg.dsts:
            if any(sn != dname and sa != daddr for sn, sa in leg.srcs):
                out.setdefault(dname, (set(), set()))[k].update(
                    p for p in leg.ports if p is not None
                )
    return {n: (sorted(t), sorted(u)) for n, (t, u) in out.items()}


def spawn(
    hosts: list[tuple[str, str]],
    ports: dict[str, tuple[list[int], list[int]]],
    secret: bytes,
    ttl: float,
    logs: dict[str, Path],
) -> dict[str, int]:
    """Fork one detached responder per (host name, namespace); host name -> pid."""
    for name, _ in hosts:
        logs[name].write_bytes(b"")  # before the fork: the parent reads them at once
    sys.stdout.flush()
    sys.stderr.flush()
    pids: dict[str, int] = {}
    for name, ns in hosts:
        tcp, udp = ports.get(name, ([], []))
        pid = os.fork()
        if pid == 0:  # the responder
            code = 1
            try:
                os.setsid()  # detached: survives the terminal, ends by TTL or lab down
                log = os.open(logs[name], os.O_WRONLY | os.O_APPEND)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.dup2(log, 1)
                os.dup2(log, 2)
                enter_netns(ns)
                # "::": both families (the lab hosts are dual stack)
                cfg = ResponderConfig(
                    tcp_ports=tcp, udp_ports=udp, secret=secret, ttl=ttl, bind="::"
                )
                cfg.name = name
                code = run_responder(cfg)
            except BaseException:  # noqa: BLE001 - a child must never unwind into the parent
                traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        pids[name] = pid
    return pids


def start_time(pid: int) -> str | None:
    """The process's start time (/proc/PID/stat field 22): a pid and this name one process."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
