"""The flow: one (source, destination, protocol, port) that must be probed.

Planning produces flows, the engine consumes them; nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

PROTOS = ("tcp", "udp", "icmp", "ipip")

# A requirement checked over IPv6 is named apart from its IPv4 twin, under this suffix, in
# every human summary (check, mesh, report): "calico.vxlan over IPv6".
IPV6_SUFFIX = " over IPv6"


def req_label(req: str, af: str | None) -> str:
    """The requirement as the summaries name it: ``req``, plus " over IPv6" for that family."""
    return req + IPV6_SUFFIX if af == "ipv6" else req


@dataclass(slots=True, unsafe_hash=True)
class Flow:
    """One probe target. Treated as immutable (``dataclasses.replace`` for a changed copy), but
    not ``frozen``: a frozen dataclass's __init__ sets each field through object.__setattr__,
    ~1 us per flow against ~0.2 us (issue 16: the plan makes one per flow of a sweep).

    dst: the address to probe (IPv4 or IPv6 literal); in plans, a host name for an endpoint
        outside the inventory (a registry's name), resolved by the engine when probing.
    port: the port, or None for icmp/ipip.
    proto: one of PROTOS.
    host: the destination's name (hostname as typed, inventory name, or a VIP name); None if the
        user typed an address.
    src / src_host: the source address and inventory name, when the flow comes from a plan.
    req: the catalog requirement id that asks for this flow (plan/check/mesh only).
    fam: for a host-name destination, the address family the plan reaches it over ("ipv4" /
        "ipv6"): the engine resolves the name in that family, and a name that does not
        resolve still says the family it would have used. None: an address, or the resolver's
        choice (a name typed to ``scan``).
    """

    dst: str
    port: int | None
    proto: str = "tcp"
    host: str | None = None
    src: str | None = None
    src_host: str | None = None
    req: str | None = None
    fam: str | None = None

    @property
    def af(self) -> str:
        """The address family the flow goes over: "ipv4" or "ipv6" (from the destination, or
        the plan's family for a host name)."""
        if ":" in self.dst:
            return "ipv6"
        return self.fam or "ipv4"
