"""encode_results (the fast path of result lines) against result_dict + orjson, byte for byte.

The fast path (scanner/core/results.py) writes a line from cached fragments; every line it
writes must be exactly ``encode(result_dict(r, scan_id))``, the documented serialiser. These
tables cover the shapes real probes make and the ones it must hand to orjson.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import orjson
import pytest

from scanner.core import results as R
from scanner.core.flows import Flow
from scanner.core.results import Result, encode, encode_results, result_dict

SID = "0123456789abcdef"
TS = 1700000000.5

FLOWS = [
    Flow("198.18.0.2", 6443, "tcp", "node2"),
    Flow("198.18.0.3", None, "icmp", "node3", "198.18.0.1", "node1", "calico.icmp"),
    Flow("198.18.0.3", None, "ipip", None, "198.18.0.1", "node1", "calico.ipip"),
    Flow("2001:2::2", 30000, "tcp", "node2", "2001:2::1", "node1", "k8s.nodeport"),
    Flow("2001:2::2", 4789, "udp", None),
    Flow("registry.example", 443, "tcp", "registry.example", "198.18.0.1", "n1", "reg", "ipv6"),
    Flow("registry.example", 443, "tcp", "registry.example", None, None, None, "ipv4"),
    Flow("198.18.0.4", 0, "udp", "nöde-ü", "198.18.0.1", "knoten-ß", "req.ünïcode"),
    Flow("198.18.0.5", 65535, "tcp", 'we"ird\\host', "198.18.0.1", 'src"q', 'r\\e"q'),
    Flow("198.18.0.6", 22, "tcp", "ctl\x00\x1f\x7f\u2028", None, "\U0001f600", None),
    Flow("127.0.0.1", 22),
]
STATES = [
    ("open", "syn-ack"),
    ("closed", "reset"),
    ("filtered", "no-response"),
    ("open|filtered", "no-response"),
    ("error", "needs-cap-net-raw"),
    ("filtered", 'reason "quoted" \\ back'),
]
RTTS: list[Any] = [
    None, 0.0, -0.0, 0.0004, 0.0005, 0.0015, 1e-7, 0.123456, 12.3456, 999.9995,
    1234567.891, 123456789012.3456, 1e15, 1e16, 1e22, -3.25, float("inf"), float("nan"), 7,
]  # fmt: skip
EXTRAS: list[dict[str, Any] | None] = [
    None,
    {},
    {"i": 0},
    {"i": 12345},
    {"i": None},
    {"src": "198.18.0.99"},
    {"src": None},
    {"src": "198.18.0.99", "i": 7},
    {"verdict_reason": 'held-by-kernel: "vx0" \\ x', "i": 3},
    {"icmp_from": "198.18.0.254"},
    {"tcp_method": "syn"},
    {"icmp_from": "198.18.0.9", "tcp_method": "connect"},
    {"i": 2, "src": "198.18.0.98"},  # src replaces in place even when it comes after i
    {"something_new": 1},  # unknown extras: orjson's path
    {"src": 5},
    {"i": True},
    {"i": -1},
    {"i": 2**63},
    {"tcp_method": 1.5},
    {"icmp_from": ["198.18.0.9"]},
    {"host": "override"},  # a result_dict key: replaced in place
    {"verdict": "pass"},
    {"ts": "x"},
]


def orjson_lines(rs: list[Result]) -> bytes:
    return b"".join(encode(result_dict(r, SID)) for r in rs)


def mismatches(rs: list[Result]) -> list[tuple[bytes, bytes]]:
    """The lines where encode_results differs from result_dict + orjson (also checks the
    batch as a whole, and each result alone)."""
    bad = [(encode_results([r], SID), encode(result_dict(r, SID))) for r in rs]
    bad = [(a, b) for a, b in bad if a != b]
    if not bad and encode_results(rs, SID) != orjson_lines(rs):
        bad.append((encode_results(rs, SID), orjson_lines(rs)))
    return bad


def table() -> list[Result]:
    rs = []
    combos = itertools.product(FLOWS, STATES, RTTS, EXTRAS, (None, "pass", "fail", "unknown"))
    for n, (flow, (state, reason), rtt, extra, verdict) in enumerate(combos):
        if n % 7:  # a spread of the product (every value of each column appears many times)
            continue
        ts = TS + n * 0.0004 + (0.0001 if n % 3 else 0)
        rs.append(Result(flow, state, reason, rtt, 1 + n % 4, ts, verdict, extra))
    return rs


def test_the_fast_path_writes_what_orjson_writes_over_the_table() -> None:
    rs = table()
    assert len(rs) > 3000
    assert mismatches(rs) == []


def test_every_column_value_on_its_own() -> None:
    # each value of each column with the others plain (the sampled product might skip one)
    base = Result(FLOWS[3], "open", "syn-ack", 0.5, 1, TS, "pass", {"i": 1})
    rs = [Result(f, base.state, base.reason, 0.5, 1, TS, "pass", {"i": 1}) for f in FLOWS]
    rs += [Result(base.flow, s, why, 0.5, 1, TS) for s, why in STATES]
    rs += [Result(base.flow, "open", "syn-ack", rtt, 1, TS) for rtt in RTTS]
    rs += [Result(base.flow, "open", "syn-ack", 0.5, 1, TS, None, e) for e in EXTRAS]
    rs += [Result(base.flow, "open", "syn-ack", 0.5, a, TS) for a in (0, 1, 10, 2**40)]
    assert mismatches(rs) == []


def test_rtt_values_over_every_magnitude() -> None:
    rnd = random.Random(16)
    flow = FLOWS[0]
    rtts = [rnd.uniform(0, 1) * 10 ** rnd.uniform(-9, 17) for _ in range(20000)]
    rtts += [round(x, 4) for x in rtts[:2000]] + [-x for x in rtts[:2000]]
    rtts += [k / 1000 for k in range(3000)] + [k / 10000 for k in range(200)]
    rs = [Result(flow, "open", "syn-ack", x, 1, TS + k * 1e-4) for k, x in enumerate(rtts)]
    assert mismatches(rs) == []


@pytest.mark.parametrize(
    "t", [0.0, 1.0, 1.123, 1.0005, 1.9995, 1.9999999, 1700000000.123, 1700000000.999999, 2.5e9]
)
def test_timestamps_and_the_per_millisecond_reuse(t: float) -> None:
    # consecutive results in and across one millisecond: the fast path reuses the ts text
    rs = [Result(FLOWS[0], "open", "syn-ack", 0.1, 1, t + k * 0.0003) for k in range(12)]
    assert mismatches(rs) == []


def test_plain_results_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # the table above would pass if every line went through orjson; the lines real sweeps
    # make must not (the counter is the fallback's)
    calls: list[Result] = []
    slow = R._Lines._line

    def counted(self: Any, r: Result) -> str:
        calls.append(r)
        return slow(self, r)

    monkeypatch.setattr(R._Lines, "_line", counted)
    plain = [
        Result(FLOWS[3], "open", "syn-ack", 0.123, 1, TS, "pass", {"i": 4}),
        Result(FLOWS[1], "filtered", "no-response", None, 3, TS, "fail", {"icmp_from": "x"}),
        Result(FLOWS[7], "closed", "reset", 0.0, 2, TS, None, {"src": "198.18.0.7", "i": 1}),
    ]
    encode_results(plain, SID)
    assert calls == []
    odd = Result(FLOWS[0], "open", "syn-ack", 0.1, 1, TS, None, {"something_new": 1})
    assert encode_results([odd], SID) == encode(result_dict(odd, SID))
    assert calls == [odd]


def test_the_comparison_catches_a_wrong_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # a fast path that appended a result_dict key from the extras instead of replacing it in
    # place (dict.update's order) writes a duplicate "host": the table must say so
    r = Result(FLOWS[0], "open", "syn-ack", 0.5, 1, TS, None, {"host": "override"})
    assert mismatches([r]) == []
    monkeypatch.setattr(R, "_FAST_EXTRAS", R._FAST_EXTRAS | {"host"})
    bad = mismatches([r])
    assert bad and b'"host":"node2"' in bad[0][0] and b'"host":"override"}' in bad[0][0]
    # and a stale flow fragment (a cache keyed on too little) is caught too
    monkeypatch.setattr(R, "_FAST_EXTRAS", R._FAST_EXTRAS - {"host"})
    key = ("198.18.0.1", "198.18.0.2", None, "node2", "tcp", None, None)
    monkeypatch.setitem(R._FLOWS, key, ('","src":null,"dst":"198.18.0.2","port":', ""))
    assert mismatches([Result(Flow("198.18.0.2", 1, src="198.18.0.1", host="node2"), "open", "r")])


def test_values_orjson_refuses_raise_as_orjson_raises() -> None:
    # (a lone surrogate is not UTF-8: orjson refuses it in a cached fragment as in the line)
    for extra in ({"i": 2**64}, {"x": object()}, {"icmp_from": "\ud800"}, {"src": "\udfff"}):
        r = Result(FLOWS[0], "open", "syn-ack", 0.5, 1, TS, None, extra)
        with pytest.raises(orjson.JSONEncodeError):
            encode(result_dict(r, SID))
        with pytest.raises(orjson.JSONEncodeError):
            encode_results([r], SID)


def test_the_caches_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(R, "_CACHE_MAX", 50)
    rs = [
        Result(Flow(f"198.18.{k // 256}.{k % 256}", 80, host=f"h{k}"), "open", f"r{k % 90}", 0.5)
        for k in range(400)
    ]
    assert mismatches(rs) == []
    assert len(R._FLOWS) <= 50 and len(R._J) <= 50 and len(R._STATES) <= 50
