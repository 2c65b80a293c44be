"""The probe interface.

A probe is given a flow and a timeout and returns an Outcome: a state (nmap's words), a reason
and the round-trip time. A timeout, a refusal or an ICMP unreachable is an outcome, never an
exception; a probe raises only on misuse. The engine owns retries, adaptive timeouts, rate and
concurrency limits; a probe sends one attempt.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from scanner.core.flows import Flow


@dataclass(frozen=True, slots=True)
class Outcome:
    state: str  # open | closed | filtered | open|filtered | error
    reason: str  # nmap --reason words where they exist: syn-ack, conn-refused, no-response, ...
    rtt_ms: float | None = None
    # True when the outcome is silence (a timeout): the engine may retry it.
    silent: bool = False
    extra: dict | None = None


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
