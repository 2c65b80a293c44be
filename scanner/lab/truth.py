"""The ground truth a lab's faults imply (pure): what a correct prober reads for each flow.

Ground truth (``expected``), for a lab where every host runs responders (``mode="responder"``):
an unfaulted TCP or UDP flow is ``open`` (the responder answers), an ICMP echo is ``open``, an
IP-in-IP packet is ``closed`` (``proto-unreach``: it arrived, no tunnel answers) and passes.
A fault makes the flow fail, with the state the prober reads:

  tcp   drop -> filtered         reject -> closed (conn-refused)  reject-admin -> filtered
  udp   drop -> open|filtered    reject -> closed (port-unreach)  reject-admin -> filtered
  icmp  drop -> filtered         reject -> filtered (port-unreach) reject-admin -> filtered
  ipip  drop -> open|filtered                                      reject-admin -> filtered
  (direction out, udp/icmp/ipip: the send fails with EPERM -> filtered, reason local-prohibited;
   tcp by raw SYN (``tcp_method="syn"``) too: the raw send fails the same way)

Note the rejected TCP flow: ``closed`` alone would pass a pre-install check (the firewall let the
SYN through and nothing listens), but with a responder expected on that port, ``closed`` means
something other than our responder answered with a RST: the firewall. So in responder mode a
``closed`` TCP or UDP flow is a *fail* (as scanner.core.verdicts says with ``responder=True``).
In ``mode="bare"`` (nothing listens), unfaulted TCP and UDP flows are ``closed`` and pass, the
verdict of a faulted flow is what scanner.core.verdicts gives a correct prober (a dropped UDP flow is
``open|filtered`` -> ``unknown``; a ``reject`` cannot be told from a pass and is reported so).
``Expected.fault`` is the fault that hit the flow: the truth, whatever a prober can tell.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from scanner.core.flows import Flow
from scanner.core.verdicts import verdict
from scanner.lab.faults import ACTIONS, FAULT_PROTOS, MODES, Fault


class Expected:
    """The expected outcome of one flow. Unpacks as ``state, verdict = expected(...)``."""

    __slots__ = ("state", "verdict", "reason", "fault")

    def __init__(self, state: str, verdict: str, reason: str, fault: Fault | None = None) -> None:
        self.state = state
        self.verdict = verdict
        self.reason = reason
        self.fault = fault

    def __iter__(self) -> Iterator[str]:
        yield self.state
        yield self.verdict

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Expected):
            return (self.state, self.verdict, self.reason, self.fault) == (
                other.state,
                other.verdict,
                other.reason,
                other.fault,
            )
        if isinstance(other, tuple):
            return (self.state, self.verdict, self.reason)[: len(other)] == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.state, self.verdict, self.reason))

    def __repr__(self) -> str:
        why = f", fault={self.fault.describe()!r}" if self.fault else ""
        return f"Expected({self.state!r}, {self.verdict!r}, {self.reason!r}{why})"


# (proto, action) -> (state, reason) when the fault hits the packet at the destination (in)
_IN_FAULT = {
    ("tcp", "drop"): ("filtered", "no-response"),
    ("tcp", "reject"): ("closed", "conn-refused"),
    ("tcp", "reject-admin"): ("filtered", "admin-prohibited"),
    ("udp", "drop"): ("open|filtered", "no-response"),
    ("udp", "reject"): ("closed", "port-unreach"),
    ("udp", "reject-admin"): ("filtered", "admin-prohibited"),
    ("icmp", "drop"): ("filtered", "no-response"),
    ("icmp", "reject"): ("filtered", "port-unreach"),
    ("icmp", "reject-admin"): ("filtered", "admin-prohibited"),
    ("ipip", "drop"): ("open|filtered", "no-response"),
    ("ipip", "reject-admin"): ("filtered", "admin-prohibited"),
}

# the same fault in the source's output chain: TCP by connect() behaves as inbound (the kernel
# retries a dropped SYN, answers a rejected one locally); every other send fails with EPERM
_LOCAL = ("filtered", "local-prohibited")
_OUT_FAULT = {
    **{k: v for k, v in _IN_FAULT.items() if k[0] == "tcp"},
    **{(p, a): _LOCAL for p in ("udp", "icmp", "ipip") for a in ACTIONS},
}

_PASS = {
    "responder": {
        "tcp": ("open", "responder"),
        "udp": ("open", "responder"),
        "icmp": ("open", "echo-reply"),
        "ipip": ("closed", "proto-unreach"),
    },
    "bare": {
        "tcp": ("closed", "conn-refused"),
        "udp": ("closed", "port-unreach"),
        "icmp": ("open", "echo-reply"),
        "ipip": ("closed", "proto-unreach"),
    },
}


def _name_of(lab: Any, addr: str | None, name: str | None) -> str | None:
    """The lab host name of an address (a Lab or a name -> address mapping), else ``name``."""
    if lab is not None and addr is not None:
        if isinstance(lab, Mapping):
            found = next((n for n, a in lab.items() if a == addr), None)
        else:
            h = lab.by_addr(addr)
            found = h.name if h is not None else None
        if found is not None:
            return found
    return name


def hit(flow: Flow, faults: Iterable[Fault], lab: Any = None) -> Fault | None:
    """The fault that decides this flow's first packet, or None.

    The packet meets the source's output chain first, then the destination's input chain; in
    each, the first matching rule (file order) decides, as nftables does.
    """
    src = _name_of(lab, flow.src, flow.src_host)
    dst = _name_of(lab, flow.dst, flow.host)
    faults = list(faults)

    def match(f: Fault, direction: str, here: str | None, there: str | None) -> bool:
        return (
            f.direction == direction
            and here is not None
            and f.host == here
            and f.proto == flow.proto
            and (f.peer is None or f.peer == there)
            and f.matches_port(flow.port)
            and f.matches_family(flow.af)
        )

    for f in faults:
        if match(f, "out", src, dst):
            return f
    for f in faults:
        if match(f, "in", dst, src):
            return f
    return None


def expected(
    flow: Flow,
    faults: Iterable[Fault],
    lab: Any = None,
    mode: str = "responder",
    tcp_method: str = "connect",
) -> Expected:
    """The ground truth for one flow in a lab with these faults.

    ``lab`` maps addresses to lab host names (a Lab, or a name -> address mapping); without it
    the flow's ``src_host`` / ``host`` names are used. mode "responder": every lab host runs
    responders on the flow's port; "bare": nothing listens. ``tcp_method`` "syn": TCP goes by
    raw SYN, whose send an output-chain fault fails at once (as UDP's), where connect() sees
    the fault as the destination's.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    if flow.proto not in FAULT_PROTOS:
        raise ValueError(f"unknown protocol {flow.proto!r}")
    f = hit(flow, faults, lab)
    if f is None:
        state, reason = _PASS[mode][flow.proto]
        return Expected(state, "pass", reason)
    table = _IN_FAULT if f.direction == "in" else _OUT_FAULT
    state, reason = table[(flow.proto, f.action)]
    if f.direction == "out" and flow.proto == "tcp" and tcp_method == "syn":
        state, reason = _LOCAL
    if mode == "bare":
        v = verdict(flow.proto, state, "reachable", responder=False)
        if (state, reason) == _PASS["bare"][flow.proto]:
            # a reject looks exactly like "nothing listens" to a prober without responders
            reason += " (indistinguishable without a responder)"
        return Expected(state, v, reason, f)
    return Expected(state, "fail", reason, f)


def ground_truth(
    flows: Iterable[Flow], faults: Iterable[Fault], lab: Any = None, mode: str = "responder"
) -> Iterator[tuple[Flow, Expected]]:
    """(flow, expected) for every flow, lazily."""
    faults = list(faults)
    for fl in flows:
        yield fl, expected(fl, faults, lab, mode)
