"""Port specs in nmap's -p syntax, both ways (pure):
22,80,6443        single ports
30000-32767       a range; "-100" is 1-100, "60000-" is 60000-65535
-                 1-65535 (what "-p-" passes)
T:22,80,U:4789    protocol prefixes; a prefix applies until the next one
"""

from __future__ import annotations

from collections.abc import Iterable

from scanner.errors import InputError

PREFIXES = {"T": "tcp", "U": "udp"}


def parse_ports(spec: str, default_proto: str = "tcp") -> list[tuple[str, int]]:
    """Parse an nmap-style port spec into an ordered, de-duplicated list of (proto, port)."""
    if spec is None or not str(spec).strip():
        raise InputError("empty port spec")
    proto = default_proto
    out: list[tuple[str, int]] = []
    seen: set[tuple[str, int]] = set()
    for raw in str(spec).split(","):
        tok = raw.strip()
        if not tok:
            raise InputError(f"bad port spec {spec!r}: empty item")
        if len(tok) >= 2 and tok[1] == ":":
            p = tok[0].upper()
            if p not in PREFIXES:
                raise InputError(
                    f"bad port spec item {tok!r}: unknown protocol prefix {tok[0]!r} (use T: or U:)"
                )
            proto = PREFIXES[p]
            tok = tok[2:].strip()
            if not tok:
                raise InputError(f"bad port spec item {raw.strip()!r}: no port after the prefix")
        lo, hi = _port_range(tok)
        for port in range(lo, hi + 1):
            key = (proto, port)
            if key not in seen:
                seen.add(key)
                out.append(key)
    return out


def ports_text(ports: Iterable[int]) -> str:
    """Ports -> nmap range syntax, the inverse of parse_ports for one protocol:
    [22, 2379, 2380, 2381] -> "22,2379-2381"."""
    out: list[str] = []
    lo = hi = -2
    for p in sorted(set(ports)):
        if p == hi + 1:
            hi = p
            continue
        if hi >= 0:
            out.append(str(lo) if lo == hi else f"{lo}-{hi}")
        lo = hi = p
    if hi >= 0:
        out.append(str(lo) if lo == hi else f"{lo}-{hi}")
    return ",".join(out)


def _port_number(tok: str, whole: str) -> int:
    if not (tok.isascii() and tok.isdigit()):
        raise InputError(f"bad port {whole!r}: not a number")
    n = int(tok)
    if not 1 <= n <= 65535:
        raise InputError(f"bad port {whole!r}: out of range 1-65535")
    return n


def _port_range(tok: str) -> tuple[int, int]:
    if tok == "-":
        return 1, 65535
    if "-" in tok:
        a, _, b = tok.partition("-")
        lo = _port_number(a, tok) if a else 1
        hi = _port_number(b, tok) if b else 65535
        if lo > hi:
            raise InputError(f"bad port range {tok!r}: start is above end")
        return lo, hi
    n = _port_number(tok, tok)
    return n, n
