"""The mesh's pair join (pure): both directions of a requirement folded into one verdict."""

from __future__ import annotations

from collections import Counter

import pytest

from scanner.mesh.pairs import EXACT_PORTS, PairJoin, PortSet, pair_verdict, ranges

ADDR = {"a": "198.18.0.1", "b": "198.18.0.2", "c": "198.18.0.3"}
PASS_STATE = {"tcp": ("open", "responder"), "icmp": ("open", "echo-reply")}


def rec(src, dst, verdict, proto="tcp", port=2380, req="etcd.peer", state=None, reason=None):
    if state is None:
        state, reason = {
            "pass": PASS_STATE.get(proto, ("open", "responder")),
            "fail": ("filtered", "no-response"),
            "unknown": ("error", "agent unreachable"),
        }[verdict]
    return {
        "type": "result",
        "src": ADDR[src],
        "src_host": src,
        "dst": ADDR[dst],
        "host": dst,
        "proto": proto,
        "port": port,
        "req": req,
        "state": state,
        "reason": reason,
        "verdict": verdict,
    }


@pytest.mark.parametrize(
    ("ab", "ba", "want"),
    [
        ("pass", "pass", "pass"),
        ("fail", "fail", "fail"),
        ("fail", "pass", "one-way"),
        ("pass", "fail", "one-way"),
        ("unknown", "pass", "unknown"),
        ("pass", "unknown", "unknown"),
        ("unknown", "fail", "unknown"),
        ("unknown", "unknown", "unknown"),
    ],
)
def test_pair_verdict_table(ab: str, ba: str, want: str) -> None:
    assert pair_verdict(ab, ba) == want


@pytest.mark.parametrize(
    ("ab", "ba", "verdict", "reason_has"),
    [
        (["pass"], ["pass"], "pass", None),
        (["fail"], ["fail"], "fail", "a -> b: tcp/2380 filtered (no-response); b -> a:"),
        (["fail"], ["pass"], "one-way", "a -> b: tcp/2380 filtered"),
        (["pass"], ["fail"], "one-way", "b -> a: tcp/2380 filtered"),
        (["unknown"], ["pass"], "unknown", "a -> b: undecided (agent unreachable)"),
        # several flows in one direction: one failure fails the direction
        (["pass", "fail", "pass"], ["pass"], "one-way", "a -> b"),
        (["pass", "unknown"], ["pass", "pass"], "unknown", "undecided"),
        (["fail", "unknown"], ["pass"], "one-way", "a -> b: tcp"),
    ],
)
def test_join_table(ab: list[str], ba: list[str], verdict: str, reason_has: str | None) -> None:
    j = PairJoin(["a", "b", "c"])
    for i, v in enumerate(ab):
        j.add(rec("a", "b", v, port=2380 + i if len(ab) > 1 else 2380))
    for i, v in enumerate(ba):
        j.add(rec("b", "a", v, port=2380 + i if len(ba) > 1 else 2380))
    pairs = list(j.pairs())
    assert len(pairs) == 1
    p = pairs[0]
    assert (p["a"], p["b"], p["req"], p["proto"]) == ("a", "b", "etcd.peer", "tcp")
    assert p["verdict"] == verdict
    if reason_has is None:
        assert "reason" not in p
    else:
        assert reason_has in p["reason"]
    assert p["detail"]["a_to_b"]["fail"] == ab.count("fail")
    assert p["detail"]["b_to_a"]["pass"] == ba.count("pass")


def test_only_pairs_with_both_directions_and_mesh_hosts() -> None:
    j = PairJoin(["a", "b", "c"])
    j.add(rec("a", "b", "pass"))  # b -> a never planned: no pair
    j.add(rec("a", "c", "pass", req="x"))
    j.add(rec("c", "a", "fail", req="x"))
    j.add(rec("a", "c", "pass", req="y"))  # another requirement, one direction only
    vip = rec("a", "b", "pass")
    vip["host"] = "vip:kube_api"
    j.add(vip)
    j.add({**rec("a", "b", "pass"), "req": None})
    pairs = list(j.pairs())
    assert [(p["a"], p["b"], p["req"], p["verdict"]) for p in pairs] == [("a", "c", "x", "one-way")]


def test_portless_and_port_fields() -> None:
    j = PairJoin(["a", "b"])
    j.add(rec("a", "b", "pass", port=2380, req="one"))
    j.add(rec("b", "a", "pass", port=2380, req="one"))
    j.add(rec("a", "b", "pass", proto="icmp", port=None, req="icmp"))
    j.add(rec("b", "a", "pass", proto="icmp", port=None, req="icmp"))
    for port in (30000, 30001, 30002, 30010):
        j.add(rec("a", "b", "pass", port=port, req="np"))
        j.add(rec("b", "a", "pass", port=port, req="np"))
    by_req = {p["req"]: p for p in j.pairs()}
    assert by_req["icmp"]["port"] is None and "ports" not in by_req["icmp"]
    assert by_req["np"]["ports"] == "30000-30002,30010" and "port" not in by_req["np"]
    assert by_req["one"]["port"] == 2380 and "ports" not in by_req["one"]


def test_nodeport_sweep_collapses_to_counts_and_ranges() -> None:
    j = PairJoin(["a", "b"])
    for port in range(30000, 32768):
        j.add(rec("a", "b", "fail" if port < 30100 else "pass", port=port, req="np"))
        j.add(rec("b", "a", "pass", port=port, req="np"))
    d = j.direction("np", "a", "b")
    assert d is not None
    assert d.ports.exact is None and d.ports.count == 2768  # nothing per port is kept
    (p,) = j.pairs()
    assert p["ports"] == "30000-32767"
    assert p["verdict"] == "one-way"
    assert "tcp/30000-30099 filtered (no-response)" in p["reason"]
    assert p["detail"]["a_to_b"] == {"pass": 2668, "fail": 100, "unknown": 0}


@pytest.mark.parametrize(
    ("seen", "proto", "port", "said"),
    [
        (True, "icmp", None, True),
        (False, "icmp", None, False),
        (True, "udp", 4789, True),
        (False, "udp", 4789, False),
    ],
)
def test_witness_says_arrived_but_answer_lost(seen: bool, proto: str, port, said: bool) -> None:
    j = PairJoin(["a", "b"])
    state = "filtered" if proto == "icmp" else "open|filtered"
    j.add(rec("a", "b", "fail", proto=proto, port=port, req="r", state=state, reason="no-response"))
    j.add(rec("b", "a", "pass", proto=proto, port=port, req="r"))
    if seen:
        j.witness(
            {"type": "witness", "proto": proto, "src": ADDR["a"], "dst": ADDR["b"], "port": port}
        )
    # a witness of another pair says nothing about this one
    j.witness({"type": "witness", "proto": proto, "src": ADDR["b"], "dst": ADDR["a"], "port": port})
    j.witness({"garbage": 1})
    (p,) = j.pairs()
    assert p["verdict"] == "one-way"  # the flow as a whole still fails
    assert ("arrived at b (witness)" in p["reason"]) is said


@pytest.mark.parametrize(
    ("proto", "port", "state", "reason"),
    [
        ("tcp", 2380, "closed", "conn-refused"),
        ("icmp", None, "filtered", "admin-prohibited"),  # the reject's ICMP error came back
    ],
)
def test_witness_never_explains_a_reject(proto, port, state, reason) -> None:
    j = PairJoin(["a", "b"])
    j.add(rec("a", "b", "fail", proto=proto, port=port, state=state, reason=reason))
    j.add(rec("b", "a", "pass", proto=proto, port=port))
    j.witness({"proto": proto, "src": ADDR["a"], "dst": ADDR["b"], "port": port})
    (p,) = j.pairs()
    assert "witness" not in p["reason"]


@pytest.mark.parametrize(
    ("ports", "text"),
    [
        ([], ""),
        ([22], "22"),
        ([2381, 2379, 2380, 22], "22,2379-2381"),
        (list(range(30000, 30000 + EXACT_PORTS + 5)), f"30000-{30000 + EXACT_PORTS + 4}"),
        (list(range(30000, 31000, 2)), "500 ports in 30000-30998"),
    ],
)
def test_portset_text(ports: list[int], text: str) -> None:
    ps = PortSet()
    for p in ports:
        ps.add(p)
    assert ps.text() == text
    assert len(ps) == len(ports)
    assert ranges([5, 3, 4, 9]) == "3-5,9"


def test_pair_blocks_are_the_pair_records_encoded_byte_for_byte() -> None:
    """The coordinator writes ``pair_blocks`` (all-passing pairs from a template): the same
    bytes as encoding ``pairs``, for awkward names, '%' in names, ports, portless, IPv6."""
    import random

    from scanner.core.results import encode

    kinds: set[str] = set()
    for trial in range(60):
        rnd = random.Random(trial)
        names = [f"h{i}" for i in range(rnd.randint(2, 7))] + ['we"ird%s\\', "nø"]
        join = PairJoin(names)
        for _ in range(rnd.randint(1, 300)):
            a, b = rnd.sample(names, 2)
            req = rnd.choice(["r1", "r%2", "r3"])
            proto = {"r1": "tcp", "r%2": "icmp", "r3": "udp"}[req]
            port = None if proto == "icmp" else rnd.choice([80, 81, 30000 + rnd.randint(0, 60)])
            verdict = rnd.choice(["pass"] * 8 + ["fail", "unknown"])
            join.add({
                "type": "result", "src_host": a, "host": b, "req": req, "proto": proto,
                "port": port, "state": "open" if verdict == "pass" else "filtered",
                "reason": "x", "verdict": verdict, "src": "10.0.0.1",
                "dst": rnd.choice(["10.0.0.2", "fd00::2"]),
            })  # fmt: skip
        want = [(r["verdict"], encode(r)) for r in join.pairs("id%d")]
        # pair_blocks (what the coordinator writes): the same bytes, a row at a time
        blocks = list(join.pair_blocks("id%d"))
        assert b"".join(b for _, b in blocks) == b"".join(line for _, line in want)
        assert sum((Counter(c) for c, _ in blocks), Counter()) == Counter(v for v, _ in want)
        kinds.update(v for v, _ in want)
    assert kinds == {"pass", "fail", "one-way", "unknown"}
