"""The probe interface.

A probe is given a flow and a timeout and returns an Outcome: a state (nmap's words), a reason
and the round-trip time. A timeout, a refusal or an ICMP unreachable is an outcome, never an
exception; a probe raises only on misuse. The engine owns retries, adaptive timeouts, rate and
concurrency limits; a probe sends one attempt.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from dataclasses import dataclass
from typing import Protocol

from scanner.core.flows import Flow


@dataclass(slots=True, unsafe_hash=True)
class Outcome:
    """One attempt's answer. Treated as immutable (shared constants stand for silence and the
    like), but not ``frozen``: a frozen __init__ costs ~4x, once per answer of a sweep."""

    state: str  # open | closed | filtered | open|filtered | error
    reason: str  # nmap --reason words where they exist: syn-ack, conn-refused, no-response, ...
    rtt_ms: float | None = None
    # True when the outcome is silence (a timeout): the engine may retry it.
    silent: bool = False
    extra: dict | None = None
    # True when the answer came only after the kernel sent the probe again (a TCP SYN
    # retransmission inside one attempt, when the attempt outlived the kernel's 1 s SYN
    # timer, e.g. on a busy host): the first packet was lost, and the engine counts the
    # loss as it counts an answer on a retry.
    resent: bool = False


# The clock of the RTTs the udp, icmp and ipip probes report: monotonic nanoseconds, read right
# before the send and at the packet's receipt. Not loop.time(): uvloop's is whole milliseconds
# and fixed for a whole loop iteration, so a loopback sweep measured 25-34 ms, and these RTTs
# feed the engine's adaptive timeouts.
#
# The receipt is the kernel's: each receiving socket has SO_TIMESTAMPNS on, and the time the
# packet then waited in the socket queue (the kernel's stamp against the wall clock, both read
# by the kernel's realtime clock) is subtracted from the monotonic clock at the read. So a busy
# or descheduled event loop does not lengthen the RTT, as the kernel's tcpi_rtt keeps it out of
# the connect probe's. Without a stamp (or after a wall-clock step) the read time serves.
clock_ns = time.monotonic_ns
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # asm-generic (x86, arm) value
_SOL_SOCKET = socket.SOL_SOCKET
_TIMESPEC = struct.Struct("qq")
_MAX_WAIT_NS = 60_000_000_000  # a longer wait is a wall-clock step, not a queue


def enable_rx_stamps(sock: socket.socket) -> None:
    """Ask the kernel to stamp every packet ``sock`` receives (SO_TIMESTAMPNS); best effort."""
    try:  # noqa: SIM105 - per UDP attempt: no context manager
        sock.setsockopt(_SOL_SOCKET, SO_TIMESTAMPNS, 1)
    except OSError:
        pass


def receipt_ns(anc: list[tuple[int, int, bytes]]) -> int:
    """clock_ns() of the kernel's receipt of the packet whose ancillary data is ``anc``."""
    now = clock_ns()
    for level, kind, data in anc:
        if kind == SO_TIMESTAMPNS and level == _SOL_SOCKET and len(data) >= 16:
            sec, nsec = _TIMESPEC.unpack_from(data)
            waited = time.time_ns() - (sec * 1_000_000_000 + nsec)
            if 0 < waited < _MAX_WAIT_NS:
                return now - waited
            break
    return now


def rtt_ms(t0_ns: int, t1_ns: int) -> float:
    """Milliseconds from a send at clock_ns() ``t0_ns`` to a receipt at ``t1_ns`` (receipt_ns),
    to the microsecond; a receipt before the send (a wall-clock step) counts as now."""
    if t1_ns < t0_ns:
        t1_ns = clock_ns()
    return round((t1_ns - t0_ns) / 1e6, 3)


NO_RESPONSE_FILTERED = Outcome("filtered", "no-response", None, True)
NO_RESPONSE_OPEN_FILTERED = Outcome("open|filtered", "no-response", None, True)


class Probe(Protocol):
    """What the engine needs from a probe module's prober object."""

    proto: str
    needs_raw: bool

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Open sockets and register receivers (called once, before the first probe)."""

    async def probe(self, flow: Flow, timeout: float) -> Outcome:
        """One attempt at one flow."""

    def close(self) -> None:
        """Release every socket and reader."""


@dataclass(frozen=True, slots=True)
class ProbeOptions:
    """Settings shared by every prober, built by the engine from the scan config."""

    secret: bytes | None = None  # the scan secret: confirms our responder (see scanner.core.tags)
    vxlan_vni: int = 4096  # Calico's default VNI
    # per-port UDP payload kind override: {port: "vxlan" | "wireguard" | "memberlist" | "tag" | "empty"}
    udp_payloads: dict[int, str] | None = None
    source: str | None = None  # local address to bind, when set
    shard: tuple[int, int] = (0, 1)  # (index, count) of this shard process: splits source ports


_LOCAL: dict[str, bool] = {}


def local_address(addr: str) -> bool:
    """Is ``addr`` an address of this host (in this network namespace)? Binding a datagram
    socket to it succeeds only then. Asked only when an ICMP error names a sender other than
    the destination (rare); cached per process."""
    known = _LOCAL.get(addr)
    if known is not None:
        return known
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    try:
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.bind((addr, 0))
        ok = True
    except OSError:
        ok = False
    if len(_LOCAL) > 1024:
        _LOCAL.clear()
    _LOCAL[addr] = ok
    return ok


# a socket connected to itself (the kernel picked the destination port as its own source port:
# a local destination, in the ephemeral range, where nothing is bound) is made again this many
# times before it is reported (closed/self-connect)
SELF_CONNECT_TRIES = 3
SELF_CONNECT = Outcome("closed", "self-connect")


def self_connected(sock: socket.socket) -> bool:
    """Is this connected socket its own peer? TCP "succeeds" by simultaneous open with itself
    and a UDP datagram comes back to the sender: neither is a listener (the kernel never picks
    a bound port), so neither is an open port."""
    try:
        return sock.getsockname()[:2] == sock.getpeername()[:2]
    except OSError:
        return False
