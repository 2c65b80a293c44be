"""``Mesh.on_tally_groups`` puts a tally's line together from a group's bytes and folds the
common tally inline: the same lines, counts, pair join and summary as the plain record path
(``_tally_record`` here, a record at a time), also for odd entries an agent of another
version might send."""

from __future__ import annotations

import asyncio
import io
import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from scanner.core.tally import Tallies, af_of
from scanner.engine.output import NdjsonOutput
from scanner.mesh.coordinator import Mesh, MeshConfig
from scanner.mesh.link import AgentLink
from scanner.mesh.wire import TallyGroups
from scanner.plan.selection import SelectionOptions

INV = Path(__file__).parent / "data" / "inventories" / "kubespray-hosts.yml"


class _Out(NdjsonOutput):
    def __init__(self) -> None:
        super().__init__(None, stdout=False)
        self.lines: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.lines.append(data)


class _Link:
    def __init__(self, mesh: Mesh, name: str) -> None:
        self.name = name
        self.jidx = mesh.join.index.get(name)
        self.tallied = 0


def _mesh() -> Mesh:
    catalog, site, selection = SelectionOptions(
        inventories=(str(INV),), nodeport_sample=3
    ).resolve()
    m = Mesh(MeshConfig(catalog, site, selection, output=_Out(), summary_to=io.StringIO()))
    m.scan_id = "s%1"
    return m


def _groups(m: Mesh, rnd: random.Random) -> list[Any]:
    names = m.join.names
    out: list[Any] = []
    for _ in range(300):
        pairs: list[Any] = []
        for _ in range(rnd.choice([1, 3, 20])):
            pairs += [rnd.choice([*names, "vip"]), rnd.choice(["198.18.0.9", "fd00::9", 'we"ird'])]
        req = rnd.choice(["etcd.peer", "k8s.nodeport", "calico.bgp", None])
        states = rnd.choice([{"open": 3}, {"open": 3}, {"open": 2.0, "closed": 1}, {"x": True}, {}])
        ports = rnd.choice(["30000-30002", "30000-30002", "", None, 30001, "30000,30002"])
        af = rnd.choice(["ipv4", "ipv4", "ipv6"])
        g = [req, "tcp", af, rnd.choice(["198.18.0.1", "fd00::1"]), states, ports, pairs]
        x = rnd.random()
        if x < 0.05:
            g = rnd.choice([g[:5], {"a": 1}, "text", [None] * 7, [*g[:6], [1, 2]], [*g[:6], ["a"]]])
        elif x < 0.08:
            g[4] = rnd.choice([[1], {"open": [1]}, {"open": "x"}])
        elif x < 0.1:
            g[2] = rnd.choice(["ipx", None])
        out.append(g)
    return out


def _group_entries(g: Any) -> list[Any]:
    """A tally group (wire.TallyGroups) as entries for ``_tally_record`` ([host, dst, req,
    proto, flows, states, ports, src, af])."""
    req, proto, af, src, st, ports, pairs = g
    flows = sum(st.values())
    return [
        [pairs[j], pairs[j + 1], req, proto, flows, st, ports, src, af]
        for j in range(0, len(pairs) - 1, 2)
    ]


def _tally_record(m: Mesh, link: _Link, t: Any) -> None:
    """The oracle: one tally entry as a record, folded, counted and written the plain way
    (``PairJoin.add_tally``, ``Matrix.add_passes``, the output's ``record``)."""
    host, dst, req, proto, flows, states, ports, src = t[:8]
    af = t[8] if len(t) > 8 and t[8] in ("ipv4", "ipv6") else af_of(dst)
    rec: dict[str, Any] = {
        "type": "tally", "scan_id": m.scan_id, "src_host": link.name, "src": src,
        "host": host, "dst": dst, "req": req, "proto": proto, "af": af, "flows": int(flows),
        "states": {str(k): int(v) for k, v in states.items()},
    }  # fmt: skip
    if ports:
        rec["ports"] = str(ports)
    link.tallied += rec["flows"]
    m.tallied += rec["flows"]
    for k, v in rec["states"].items():
        m.states[k] += v
    m.matrix.add_passes(rec, rec["flows"], m.join.add_tally(rec))
    m.out.record(rec)


def _readable(g: Any, m: Mesh) -> bool:
    """Does on_tally_groups take this group (on a scratch mesh)?"""
    try:
        m.on_tally_groups(_Link(m, m.join.names[0]), [g])  # type: ignore[arg-type]
    except ValueError:
        return False
    return True


def test_tally_lines_and_counts_equal_the_record_path() -> None:
    for seed in range(6):
        fast, plain = _mesh(), _mesh()
        src = fast.join.names[seed % len(fast.join.names)]
        # a failing result first: some directions take the general (sparse) fold
        for m in (fast, plain):
            for dst in m.join.names[:3]:
                if dst != src:
                    m.emit({"type": "result", "src": "198.18.0.1", "dst": "198.18.0.9",
                            "host": dst, "proto": "tcp", "port": 30000, "state": "filtered",
                            "reason": "no-response", "src_host": src, "req": "k8s.nodeport",
                            "verdict": "fail"})  # fmt: skip
        scratch = _mesh()
        groups = [g for g in _groups(fast, random.Random(seed)) if _readable(g, scratch)]
        fast.on_tally_groups(_Link(fast, src), groups)  # type: ignore[arg-type]
        link = _Link(plain, src)
        for g in groups:
            for t in _group_entries(g):
                _tally_record(plain, link, t)
        assert b"".join(fast.out.lines) == b"".join(plain.out.lines)  # type: ignore[attr-defined]
        assert len(plain.out.lines) > 2000  # type: ignore[attr-defined]
        # the states in the same order too: the summary record lists them so
        assert (fast.tallied, list(fast.states.items())) == (
            plain.tallied,
            list(plain.states.items()),
        )
        assert fast.matrix.verdicts == plain.matrix.verdicts
        assert (fast.matrix.passes, fast.matrix.ends) == (plain.matrix.passes, plain.matrix.ends)
        for key, t in plain.join.reqs.items():
            u = fast.join.reqs[key]
            assert (u.passed, set(u.sparse)) == (t.passed, set(t.sparse))
            for k in range(len(t.sig)):
                a, b = plain.join._dir(t, k), fast.join._dir(u, k)
                assert (a is None) == (b is None)
                if a is not None and b is not None:
                    assert (a.counts(), a.ports.text(), a.ports.count, a.ports.none) == (
                        b.counts(), b.ports.text(), b.ports.count, b.ports.none)  # fmt: skip


def test_an_agents_tallies_reach_the_output_as_its_records() -> None:
    """The agent's tally records (scanner.core.tally) through its channel's columns
    (wire.TallyGroups), the JSON wire and the coordinator's fold: the same records, each once,
    as the agent's own ``--emit failures`` output would hold them (order aside)."""
    m = _mesh()
    src = m.join.names[0]
    t = Tallies()
    rnd = random.Random(7)
    for dst in m.join.names[1:]:
        for req, ports in (("k8s.nodeport", range(30000, 30018)), ("etcd.peer", (2380,))):
            for p in ports:
                if rnd.random() < 0.9:
                    state = "open" if rnd.random() < 0.95 else "closed"
                    t.add(src, "198.18.0.1", dst, "198.18.0.2", req, "tcp", p, state, "ipv4")
        t.add(src, "fd00::1", dst, "fd00::2", "calico.vxlan.v6", "udp", 4789, "open", "ipv6")
        t.add(src, "198.18.0.1", dst, "198.18.0.2", "node.icmp", "icmp", None, "open", "ipv4")
    records = list(t.records("s%1"))
    g = TallyGroups()
    for rec in records:
        g.add(rec)
    wire = orjson.loads(orjson.dumps(g.wire()))
    assert len(wire) < len(records)  # columns: directions that share all but dst, one group
    m.on_tally_groups(_Link(m, src), wire)  # type: ignore[arg-type]
    got = b"".join(m.out.lines).splitlines(keepends=True)  # type: ignore[attr-defined]
    want = [orjson.dumps({**r, "src_host": src}, option=orjson.OPT_APPEND_NEWLINE) for r in records]
    assert sorted(got) == sorted(want) and len(got) == len(records)
    assert m.tallied == t.flows


def test_unreadable_tally_groups_count_none_of_the_agents_tallies() -> None:
    """A ``done`` whose tally_groups is not a list of groups, or holds one group that cannot
    be read (a list as the requirement, a state count that is no number): ValueError before
    anything is counted or written, all groups or none (the agent then fails and owes every
    flow it sent no line for: no tally tells which flows an unread group stood for)."""
    m = _mesh()
    src, dst = m.join.names[0], m.join.names[1]
    link = _Link(m, src)
    good = ["k8s.nodeport", "tcp", "ipv4", "198.18.0.1", {"open": 3}, "30000-30002"]
    ok = [*good, [dst, "198.18.0.9"]]
    for groups in (
        5,
        3.5,
        True,
        "text",
        {"a": 1},
        [5, None, "x"],
        [ok, [["k8s.nodeport"], *good[1:], [dst, "198.18.0.9"]]],
        [ok, [good[0], {"p": 1}, *good[2:], [dst, "198.18.0.9"]]],
        [ok, [*good[:3], ["198.18.0.1"], *good[4:], [dst, "198.18.0.9"]]],
        [ok, [*good, [[dst], "198.18.0.9"]]],
        [ok, [*good[:4], {"open": "x"}, good[5], [dst, "198.18.0.9"]]],
        [ok, [None, "tcp", None, "198.18.0.1", {"open": 3}, "30000-30002", [[dst], "x"]]],
    ):
        with pytest.raises(ValueError):
            m.on_tally_groups(link, groups)  # type: ignore[arg-type]
    assert m.tallied == 0 and link.tallied == 0 and not m.states
    assert m.out.lines == []  # type: ignore[attr-defined]
    m.on_tally_groups(link, [ok])  # type: ignore[arg-type]
    assert m.tallied == 3 and len(m.out.lines) == 1  # type: ignore[attr-defined]


def test_a_done_with_one_unreadable_group_fails_its_agent_with_nothing_counted() -> None:
    """Through the agent's link: its ``done`` holds a readable group and one that is not.
    No tally is counted or written, the agent fails with the reason (its flows are then
    owed as unknown), and its reader goes on."""
    m = _mesh()
    src, dst = m.join.names[0], m.join.names[1]
    ok = ["k8s.nodeport", "tcp", "ipv4", "198.18.0.1", {"open": 3}, "30000-30002", [dst, "x"]]
    bad = [*ok[:4], {"open": "many"}, *ok[5:]]

    async def go() -> AgentLink:
        link = AgentLink(m, next(h for h in m.hosts if h.name == src), (["sim"], ["agent"]))
        link.feed(orjson.dumps({"type": "done", "tally_groups": [ok, bad]}) + b"\n")
        return link

    link = asyncio.run(go())
    assert link.failed is not None and "tallies could not be read" in link.failed
    assert m.tallied == 0 and link.tallied == 0 and not m.states
    out = [orjson.loads(x) for x in b"".join(m.out.lines).splitlines()]  # type: ignore[attr-defined]
    assert [x["type"] for x in out] == ["host"] and out[0]["state"] == "unreachable"


@pytest.mark.parametrize("ports", ["x", "1-2-3", "-5", "30000,x"])
def test_a_group_whose_ports_cannot_be_read_counts_none_of_the_agents_tallies(ports: str) -> None:
    """The ports of a group are read while it is folded (parse_runs): a group whose ports
    text is not runs of ports must fail the agent before any group is counted or written,
    as any other unreadable group (else the groups before it are written as tallies and
    their flows owed again as unknown: two lines for one flow)."""
    m = _mesh()
    src, dst = m.join.names[0], m.join.names[1]
    ok = ["k8s.nodeport", "tcp", "ipv4", "198.18.0.1", {"open": 3}, "30000-30002", [dst, "x"]]
    bad = [*ok[:5], ports, [dst, "y"]]

    async def go() -> AgentLink:
        link = AgentLink(m, next(h for h in m.hosts if h.name == src), (["sim"], ["agent"]))
        link.feed(orjson.dumps({"type": "done", "tally_groups": [ok, bad]}) + b"\n")
        return link

    link = asyncio.run(go())
    assert link.failed is not None
    assert m.tallied == 0 and link.tallied == 0 and not m.states
    out = [orjson.loads(x) for x in b"".join(m.out.lines).splitlines()]  # type: ignore[attr-defined]
    assert [x["type"] for x in out] == ["host"]
