"""``Mesh.on_tallies`` puts a tally's line together from cached bytes and folds the common
tally inline: the same lines, counts, pair join and summary as the plain record path
(``Mesh._tally_record``), also for odd entries an agent of another version might send."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

from scanner.engine.output import NdjsonOutput
from scanner.mesh.coordinator import Mesh, MeshConfig
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


def _entries(m: Mesh, rnd: random.Random) -> list[Any]:
    names = m.join.names
    out: list[Any] = []
    for _ in range(3000):
        dst = rnd.choice([*names, "vip"])
        req = rnd.choice(["etcd.peer", "k8s.nodeport", "calico.bgp", None])
        flows = rnd.choice([3, 3, 3, 0, "2", 2.5, True])
        states = rnd.choice([{"open": 3}, {"open": 3}, {"open": 2.0, "closed": 1}, {"x": True}, {}])
        ports = rnd.choice(["30000-30002", "30000-30002", "", None, 30001, "30000,30002"])
        e = [dst, rnd.choice(["198.18.0.9", "fd00::9", "we\"ird"]), req, "tcp", flows, states,
             ports, rnd.choice(["198.18.0.1", "fd00::1"])]  # fmt: skip
        x = rnd.random()
        if x < 0.5:
            e.append(rnd.choice(["ipv4", "ipv6", "ipx", None]))
        elif x < 0.55:
            e = rnd.choice([e[:5], {"a": 1}, "text", [None] * 9, [[1], *e[1:]]])
        elif x < 0.58:
            e[5] = rnd.choice([[1], {"open": [1]}, {"open": "x"}])
        out.append(e)
    return out


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
        entries = _entries(fast, random.Random(seed))
        ok = [e for e in entries if not (isinstance(e, list) and e and isinstance(e[0], list))]
        fast.on_tallies(_Link(fast, src), ok)  # type: ignore[arg-type]
        link = _Link(plain, src)
        for e in ok:
            plain._tally_record(link, e)  # type: ignore[arg-type]
        assert fast.out.lines == plain.out.lines  # type: ignore[attr-defined]
        assert len(fast.out.lines) > 2000  # type: ignore[attr-defined]
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
