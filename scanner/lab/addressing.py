"""Where a lab lives (pure): its names, its /24 out of 198.18.0.0/15 and the paired IPv6 /64
out of 2001:2::/48 (RFC 2544 / RFC 5180 benchmarking space), and the root end of its host link.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re

from scanner.errors import InputError

LAB_NET = ipaddress.ip_network("198.18.0.0/15")
HOST_LINK_OCTET = 254
IFNAMSIZ = 15  # Linux interface names: at most 15 characters
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")


def check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InputError(
            f"bad {kind} name {name!r}: use 1-32 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def subnet_index(name: str) -> int:
    """The preferred /24 index (0..511) inside 198.18.0.0/15 for a lab name (deterministic)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") % 512


def subnet_for(index: int) -> ipaddress.IPv4Network:
    base = int(LAB_NET.network_address) + (index << 8)
    return ipaddress.IPv4Network((base, 24))


LAB_NET6 = ipaddress.ip_network("2001:2::/48")  # RFC 5180: IPv6 benchmarking


def subnet6_for(subnet: ipaddress.IPv4Network) -> ipaddress.IPv6Network:
    """The lab's IPv6 /64, paired with its IPv4 /24: 2001:2:0:<index>::/64, hosts at ::1, ::2
    ... like .1, .2 ..., the host link at ::fe like .254."""
    index = (int(subnet.network_address) - int(LAB_NET.network_address)) >> 8
    return ipaddress.IPv6Network((int(LAB_NET6.network_address) | (index << 64), 64))


def canon6(addr: str) -> str:
    try:
        return str(ipaddress.IPv6Address(addr))
    except ValueError:
        return addr


def root_ifname(name: str) -> str:
    """The root-namespace end of the host link: readable when it fits, else a hash of the name."""
    plain = f"{name}-root"
    if len(plain) <= IFNAMSIZ:
        return plain
    return "pmr" + hashlib.sha256(name.encode()).hexdigest()[:12]
