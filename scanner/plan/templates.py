"""Ansible values portmesh reads without Jinja: ``{{ name }}`` expressions with simple filters,
inline ``!vault`` values, and URL passwords kept out of messages. Pure, no imports of its own."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

UNRESOLVED: Any = object()  # what eval_expr returns for an expression it does not follow
_NAME = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*\Z")
_SCALARS = (str, int, float, bool)
_TRUE = ("true", "yes", "on", "1")
_UNRESOLVED = UNRESOLVED


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


class Vaulted:
    """An inline ``!vault`` value (or ``{"__ansible_vault": ...}`` in ansible-inventory JSON):
    portmesh has no vault password, so such a variable does not resolve."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "!vault"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vaulted)

    def __hash__(self) -> int:
        return 0


VAULTED = Vaulted()


_FILTER = re.compile(r"\s*([A-Za-z_]+)\s*(?:\((.*)\))?\s*\Z", re.S)
_LITERAL = re.compile(r"""\s*(?:'([^'\\]*)'|"([^"\\]*)"|(-?[0-9]+)|(true|false|True|False))\s*\Z""")


def _literal(text: str) -> Any:
    m = _LITERAL.match(text)
    if not m:
        return _UNRESOLVED
    if m.group(1) is not None or m.group(2) is not None:
        return m.group(1) if m.group(1) is not None else m.group(2)
    if m.group(3) is not None:
        return int(m.group(3))
    return m.group(4).lower() == "true"


def eval_expr(expr: str, lookup: Callable[[str], Any]) -> Any:
    """One ``{{ ... }}`` body: a variable name, optionally piped through the simple filters
    ``int``, ``string``, ``lower``, ``upper``, ``trim``, ``bool`` and ``default(literal)`` /
    ``d(literal)``; anything else (tests, ternaries, ``groups[...]``, lookups) is _UNRESOLVED."""
    head, *filters = expr.split("|")
    m = _NAME.match(head)
    if not m:
        return _UNRESOLVED
    value = lookup(m.group(1))
    for f in filters:
        fm = _FILTER.match(f)
        if not fm:
            return _UNRESOLVED
        fname, arg = fm.group(1), fm.group(2)
        if fname in ("default", "d"):
            if arg is None:
                return _UNRESOLVED
            fallback = _literal(arg.split(",")[0] if arg.count(",") <= 1 else arg)
            if fallback is _UNRESOLVED:
                return _UNRESOLVED
            if value is _UNRESOLVED or value is None:
                value = fallback
            continue
        if value is _UNRESOLVED or arg is not None or not isinstance(value, _SCALARS):
            return _UNRESOLVED
        if fname == "int":
            try:
                value = int(str(value).strip())
            except ValueError:
                value = 0  # Jinja's int filter
        elif fname == "string":
            value = _show(value) if isinstance(value, bool) else str(value)
        elif fname in ("lower", "upper", "trim"):
            value = getattr(str(value), {"trim": "strip"}.get(fname, fname))()
        elif fname == "bool":
            value = str(value).strip().lower() in _TRUE
        else:
            return _UNRESOLVED
    return value


_USERINFO = re.compile(r"(://)[^/@\s'\"]+@")


def redact(text: str) -> str:
    """``text`` with the user:password of every URL in it replaced by ``***``."""
    return _USERINFO.sub(r"\1***@", text)


