"""The one place that answers "what may this process do": raw sockets, namespaces, file descriptors.

Probes declare what they need (``needs_raw``); the engine asks here once and reports the flows
it cannot probe as ``state: error, reason: needs-cap-net-raw`` instead of crashing.
"""

from __future__ import annotations

import functools
import os
import resource
import socket

CAP_NET_BIND_SERVICE = 10
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
CAP_SYS_ADMIN = 21  # setns / unshare of network namespaces


def _effective_caps() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def has_cap(cap: int) -> bool:
    return bool(_effective_caps() & (1 << cap))


@functools.lru_cache(maxsize=1)
def can_raw() -> bool:
    """True when this process may open raw IP sockets (CAP_NET_RAW). Asked by trying, once."""
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    except (PermissionError, OSError):
        return False
    s.close()
    return True


@functools.lru_cache(maxsize=1)
def can_ping_dgram() -> bool:
    """True when the unprivileged ICMP datagram socket is allowed (net.ipv4.ping_group_range)."""
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
    except (PermissionError, OSError):
        return False
    s.close()
    return True


def can_admin_net() -> bool:
    """True when this process may create network namespaces and nftables rules.

    Asked of the capability, not the uid: root without CAP_NET_ADMIN (a container, setpriv)
    cannot build a lab.
    """
    return has_cap(CAP_NET_ADMIN) and has_cap(CAP_SYS_ADMIN)


# Descriptors kept back for stdout/stderr, the event loop, raw receivers, files and the mesh.
FD_RESERVE = 64


@functools.lru_cache(maxsize=1)
def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def fd_budget() -> int:
    """How many sockets the engine may hold open at once after raising the limit."""
    soft = raise_nofile()
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 16
    return max(8, soft - in_use - FD_RESERVE)
