"""Target and port-spec parsing (pure, apart from resolving hostnames once).

Port specs are parsed by scanner.core.ports (nmap's -p syntax). Targets follow nmap too: IPv4/IPv6 literals, CIDR blocks, IPv4 octet ranges
(198.18.0.1-20, 198.18.0-1.*), hostnames (resolved once), and files of them (-iL).
Address ranges of either family: first-last (2001:2::1-2001:2::20, 198.18.0.1-198.18.1.9) or a
range of the last IPv6 group (2001:2::1-20, hex like the address). A /0 block (0.0.0.0/0,
::/0) is refused outright: it is always a mistake, never a target.
"""

from __future__ import annotations

import ipaddress
import itertools
import socket
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from scanner.core.flows import Flow
from scanner.errors import InputError


@dataclass(frozen=True, slots=True)
class Target:
    """A target as the user typed it, expanded lazily."""

    text: str
    name: str | None  # the hostname when the user typed one, kept in the records
    addrs: tuple[str, ...] | None = None  # resolved addresses (hostname / literal)
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    octets: tuple[tuple[int, ...], ...] | None = None
    span: tuple[int, int, int] | None = None  # (IP version, first, last) of an address range

    def count(self) -> int:
        if self.addrs is not None:
            return len(self.addrs)
        if self.span is not None:
            return self.span[2] - self.span[1] + 1
        if self.network is not None:
            return _net_hosts_count(self.network)
        assert self.octets is not None
        n = 1
        for o in self.octets:
            n *= len(o)
        return n

    def versions(self) -> set[int]:
        """The IP versions (4, 6) of the addresses this target expands to."""
        if self.addrs is not None:
            return {6 if ":" in a else 4 for a in self.addrs}
        if self.network is not None:
            return {self.network.version}
        if self.span is not None:
            return {self.span[0]}
        return {4}

    def __iter__(self) -> Iterator[str]:
        if self.addrs is not None:
            yield from self.addrs
        elif self.network is not None:
            net = self.network
            if _net_hosts_count(net) == net.num_addresses:
                for a in net:
                    yield str(a)
            else:
                for a in net.hosts():
                    yield str(a)
        elif self.span is not None:
            version, first, last = self.span
            cls = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
            for i in range(first, last + 1):
                yield str(cls(i))
        else:
            assert self.octets is not None
            for combo in itertools.product(*self.octets):
                yield ".".join(map(str, combo))


def _net_hosts_count(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> int:
    # like nmap, a CIDR block includes its network and broadcast addresses only for /31, /32
    # (and /127, /128); ipaddress.hosts() excludes them otherwise.
    if net.num_addresses <= 2:
        return net.num_addresses
    if net.version == 4:
        return net.num_addresses - 2
    return net.num_addresses - 1


_ORDINAL = ("first", "second", "third", "fourth")


def _octet(tok: str, index: int) -> tuple[int, ...]:
    """One octet spec (``5``, ``1-20``, ``*``, ``1,3``); ValueError saying which octet and why."""
    where = f"the {_ORDINAL[index]} octet {tok!r}"
    vals: list[int] = []
    for part in tok.split(","):
        try:
            if part == "*":
                lo, hi = 0, 255
            elif "-" in part:
                a, _, b = part.partition("-")
                lo = int(a) if a else 0
                hi = int(b) if b else 255
            else:
                lo = hi = int(part)
        except ValueError:
            raise ValueError(f"{where}: {part!r} is not a number or range") from None
        if lo > 255 or hi > 255:
            raise ValueError(f"{where}: {max(lo, hi)} is above 255")
        if lo > hi:
            raise ValueError(f"{where}: range {part!r} runs backwards")
        vals.extend(range(lo, hi + 1))
    return tuple(dict.fromkeys(vals))


def _address_range(t: str, tok: str) -> tuple[int, int, int]:
    """first-last (both full addresses of one family), or an IPv6 address whose last group is
    a range (2001:2::1-20) -> (version, first, last)."""
    a, _, b = t.partition("-")
    try:
        first = ipaddress.ip_address(a.strip())
    except ValueError:
        raise InputError(f"bad target {tok!r}: {a!r} is not an address") from None
    b = b.strip()
    try:
        last = ipaddress.ip_address(b)
    except ValueError:
        # 2001:2::1-20: the last 16-bit group runs to b (hex, as in the address)
        if (
            first.version != 6
            or not b
            or len(b) > 4
            or not all(c in "0123456789abcdefABCDEF" for c in b)
        ):
            raise InputError(
                f"bad target {tok!r}: {b!r} is neither an address nor a last group"
            ) from None
        last = ipaddress.IPv6Address((int(first) & ~0xFFFF) | int(b, 16))
    if first.version != last.version:
        raise InputError(f"bad target {tok!r}: the range mixes IPv4 and IPv6")
    if int(last) < int(first):
        raise InputError(f"bad target {tok!r}: the range ends before it starts")
    return first.version, int(first), int(last)


def _looks_like_octets(tok: str) -> bool:
    parts = tok.split(".")
    return len(parts) == 4 and all(p and set(p) <= set("0123456789-,*") for p in parts)


def parse_target(tok: str, resolve: bool = True) -> Target:
    """Parse one target token. Raises InputError naming the token."""
    t = tok.strip()
    if not t:
        raise InputError("empty target")
    if t.startswith("[") and t.endswith("]"):
        t = t[1:-1]
    try:
        if "/" in t:
            net = ipaddress.ip_network(t, strict=False)
            if net.prefixlen == 0:
                raise InputError(
                    f"bad target {tok!r}: a /0 block is every address of the family; "
                    "name the networks to scan"
                )
            return Target(t, None, network=net)
        addr = ipaddress.ip_address(t)
        return Target(t, None, addrs=(str(addr),))
    except ValueError:
        if "-" in t and "/" not in t and (":" in t or t.count(".") == 6):
            return Target(t, None, span=_address_range(t, tok))
        if "/" in t or ":" in t:
            raise InputError(f"bad target {tok!r}: not an address or CIDR block") from None
    if _looks_like_octets(t):
        try:
            octs = tuple(_octet(p, i) for i, p in enumerate(t.split(".")))
        except ValueError as e:
            raise InputError(f"bad target {tok!r}: {e}") from None
        return Target(t, None, octets=octs)
    if not _valid_hostname(t):
        raise InputError(f"bad target {tok!r}: not an address, CIDR block, range or hostname")
    if not resolve:
        return Target(t, t, addrs=())
    try:
        infos = socket.getaddrinfo(t, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise InputError(f"cannot resolve target {tok!r}: {e}") from None
    # resolved once; the first address of each family, IPv4 first, like nmap's default of one
    addrs = sorted({info[4][0] for info in infos}, key=lambda a: (":" in a, a))
    return Target(t, t, addrs=(addrs[0],))


def _valid_hostname(t: str) -> bool:
    if len(t) > 253 or t.startswith("-") or t.endswith("."):
        t = t.rstrip(".")
        if not t or len(t) > 253 or t.startswith("-"):
            return False
    for label in t.split("."):
        if not label or len(label) > 63 or label.startswith("-") or label.endswith("-"):
            return False
        if not all(c.isalnum() or c in "-_" for c in label) or not label.isascii():
            return False
    return True


def read_target_file(path: str) -> list[str]:
    """One or more targets per line (whitespace separated); '#' starts a comment. '-' is stdin."""
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read target file {path!r}: {e}") from None
    toks: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        toks.extend(line.split())
    return toks


def parse_targets(tokens: Iterable[str], resolve: bool = True) -> list[Target]:
    targets = [parse_target(t, resolve=resolve) for t in tokens]
    if not targets:
        raise InputError("no targets given")
    return targets


def count_hosts(targets: list[Target]) -> int:
    """Addresses the targets expand to (arithmetically: a /64 is not enumerated)."""
    return sum(t.count() for t in targets)


def count_flows(
    targets: list[Target], ports: list[tuple[str, int]], extra_per_host: int = 0
) -> int:
    hosts = sum(t.count() for t in targets)
    return hosts * (len(ports) + extra_per_host)


def iter_flows(
    targets: list[Target],
    ports: list[tuple[str, int]],
    extra: Iterable[str] = (),
) -> Iterator[Flow]:
    """Flows in port-major order, so consecutive flows go to different hosts (interleaving).

    ``extra`` holds port-less protocols ("icmp", "ipip") probed once per host.
    Memory is O(1) in the number of flows: nothing is materialised except the port list.
    """
    extra = tuple(extra)
    for proto in extra:
        for t in targets:
            for a in t:
                yield Flow(a, None, proto, t.name)
    for proto, port in ports:
        for t in targets:
            name = t.name
            for a in t:
                yield Flow(a, port, proto, name)
