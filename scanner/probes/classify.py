"""One place that turns what the network said into an outcome: ICMP / ICMPv6 error types and
codes, the kernel's queued socket errors (IP_RECVERR / IPV6_RECVERR, ``sock_extended_err``),
and local errnos. Every probe (tcp, syn, udp, icmp, ipip) classifies through here, so the same
packet gets the same state and reason whichever probe saw it. Pure; table-tested.
"""

from __future__ import annotations

import errno
import socket
import struct

from scanner.probes.base import Outcome

ICMP_DEST_UNREACH = 3
ICMP_TIME_EXCEEDED = 11
ICMP6_DEST_UNREACH = 1
ICMP6_TIME_EXCEEDED = 3

# nmap --reason words for ICMPv4 destination unreachable codes (RFC 792, RFC 1122, RFC 1812).
UNREACH_REASONS: dict[int, str] = {
    0: "net-unreach",
    1: "host-unreach",
    2: "proto-unreach",
    3: "port-unreach",
    4: "needfrag",
    5: "source-route-failed",
    6: "net-unknown",
    7: "host-unknown",
    8: "host-isolated",
    9: "admin-prohibited",  # network administratively prohibited
    10: "admin-prohibited",  # host administratively prohibited
    11: "net-tos-unreach",
    12: "host-tos-unreach",
    13: "admin-prohibited",  # communication administratively prohibited (nft/iptables reject)
    14: "host-precedence-violation",
    15: "precedence-cutoff",
}

# ICMPv6 destination unreachable codes (RFC 4443).
UNREACH6_REASONS: dict[int, str] = {
    0: "net-unreach",  # no route to destination
    1: "admin-prohibited",
    2: "beyond-scope",
    3: "host-unreach",  # address unreachable
    4: "port-unreach",
    5: "admin-prohibited",  # source address failed ingress/egress policy
    6: "admin-prohibited",  # reject route to destination
}


def icmp_reason(icmp_type: int, code: int, v6: bool = False) -> str:
    """The nmap reason word for an ICMP error."""
    if v6:
        if icmp_type == ICMP6_DEST_UNREACH:
            return UNREACH6_REASONS.get(code, f"unreach-code-{code}")
        if icmp_type == ICMP6_TIME_EXCEEDED:
            return "time-exceeded"
        return f"icmp6-type-{icmp_type}"
    if icmp_type == ICMP_DEST_UNREACH:
        return UNREACH_REASONS.get(code, f"unreach-code-{code}")
    if icmp_type == ICMP_TIME_EXCEEDED:
        return "time-exceeded"
    return f"icmp-type-{icmp_type}"


# <linux/in.h>, <linux/in6.h>, <linux/errqueue.h>: not all exported by Python's socket module.
IP_RECVERR = 11
IPV6_RECVERR = 25
SOL_IPV6 = 41
SO_EE_ORIGIN_LOCAL = 1
SO_EE_ORIGIN_ICMP = 2
SO_EE_ORIGIN_ICMP6 = 3

_ERRNO_OUTCOMES: dict[int, Outcome] = {
    errno.ECONNREFUSED: Outcome("closed", "port-unreach"),
    errno.EHOSTUNREACH: Outcome("filtered", "host-unreach"),
    errno.ENETUNREACH: Outcome("filtered", "net-unreach"),
    # EACCES: an ICMP(v6) administratively prohibited read from the socket (IPv6 maps it so)
    errno.EACCES: Outcome("filtered", "admin-prohibited"),
    # EPERM: this host's own output chain dropped or rejected the send (netfilter NF_DROP);
    # nothing left the host, as TCP's connect() says with the same reason
    errno.EPERM: Outcome("filtered", "local-prohibited"),
}
_RETRYABLE = {errno.EAGAIN, errno.ENOBUFS, errno.EMFILE, errno.ENFILE, errno.ENOMEM}


def errno_outcome(err: OSError, rtt_ms: float | None = None) -> Outcome:
    """A local socket error as an outcome (never raised to the engine)."""
    o = _ERRNO_OUTCOMES.get(err.errno or 0)
    if o is not None:
        return Outcome(o.state, o.reason, rtt_ms)
    name = errno.errorcode.get(err.errno or 0, "oserror").lower()
    return Outcome("error", name, rtt_ms, silent=(err.errno in _RETRYABLE))


def classify_icmp(
    origin: int, icmp_type: int, code: int, ee_errno: int, rtt_ms: float | None
) -> Outcome:
    """The outcome for a queued socket error (pure; table-tested)."""
    if origin == SO_EE_ORIGIN_ICMP:
        if icmp_type == 3 and code == 3:
            return Outcome("closed", "port-unreach", rtt_ms)
        return Outcome("filtered", icmp_reason(icmp_type, code), rtt_ms)
    if origin == SO_EE_ORIGIN_ICMP6:
        if icmp_type == 1 and code == 4:
            return Outcome("closed", "port-unreach", rtt_ms)
        return Outcome("filtered", icmp_reason(icmp_type, code, v6=True), rtt_ms)
    return errno_outcome(OSError(ee_errno, ""), rtt_ms)


def tcp_icmp_outcome(
    icmp_type: int, code: int, v6: bool = False, rtt_ms: float | None = None
) -> Outcome:
    """The outcome of an ICMP error quoting a TCP SYN (connect probe and SYN probe alike).

    nmap's rule for TCP: any ICMP unreachable, port-unreachable included (what nft ``reject``
    and iptables ``REJECT`` send by default), means a filter answered, not the port: filtered,
    with the code's reason word. Only a RST is ``closed``.
    """
    return Outcome("filtered", icmp_reason(icmp_type, code, v6), rtt_ms)


def parse_extended_err(data: bytes) -> tuple[int, int, int, int, str | None]:
    """(ee_errno, ee_origin, ee_type, ee_code, offender address) from a sock_extended_err cmsg."""
    errno_, origin, typ, code, _pad, _info, _data = struct.unpack_from("=IBBBBII", data)
    offender = None
    rest = data[16:]
    if len(rest) >= 8:
        fam = struct.unpack_from("=H", rest)[0]
        if fam == socket.AF_INET:
            offender = socket.inet_ntop(socket.AF_INET, rest[4:8])
        elif fam == socket.AF_INET6 and len(rest) >= 24:
            offender = socket.inet_ntop(socket.AF_INET6, rest[8:24])
    return errno_, origin, typ, code, offender


def same_address(a: str, b: str) -> bool:
    """Two address strings name the same address (IPv6 has many spellings of one address)."""
    if a == b:
        return True
    if ":" not in a or ":" not in b:
        return False
    try:
        return socket.inet_pton(socket.AF_INET6, a) == socket.inet_pton(socket.AF_INET6, b)
    except OSError:
        return False


def attribute(out: Outcome, offender: str | None, dst: str, offender_is_local: bool) -> Outcome:
    """Say who sent the ICMP error behind ``out``: the destination itself (``out`` as it is),
    a router on the way (``icmp_from``), or this host (``icmp_from`` one of our own addresses:
    our own firewall's output chain rejected the packet before it left, e.g. nftables ``reject
    with icmpx admin-prohibited`` on output, over IPv4 and IPv6 alike). The last is
    ``filtered/local-prohibited``, the reason the SYN probe gives a local refusal, never the
    remote's ``admin-prohibited`` or ``closed``. ``offender_is_local``: the caller's answer to
    "is ``offender`` an address of this host" (see base.local_address); pure."""
    if not offender or same_address(offender, dst):
        return out
    extra = {"icmp_from": offender}
    if offender_is_local:
        return Outcome("filtered", "local-prohibited", out.rtt_ms, extra=extra)
    # a router's port-unreachable is a filter, not the port (nmap: filtered) - never closed
    return Outcome(
        "filtered" if out.state == "closed" else out.state, out.reason, out.rtt_ms, extra=extra
    )
