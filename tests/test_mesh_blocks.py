"""An agent's passing results in blocks (``wire.PassBlocks``, agent protocol 3): the
coordinator folds a block by its header and forwards its lines unread (``Mesh.on_passes``).
The oracle is the plain path, every result its own line with its plan index
(``Mesh.on_results``): the same output lines, counts, window, pair join and summary, whatever
the results (another source address, a host outside the mesh, a direction with a failure,
IPv6) and wherever the pipe's reads cut the stream; and a block the agent did not finish is
owed, never counted."""

from __future__ import annotations

import asyncio
import io
import random
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from scanner.core.flows import Flow
from scanner.core.results import Result, encode_results
from scanner.engine.output import NdjsonOutput
from scanner.mesh.coordinator import Mesh, MeshConfig, flows_of
from scanner.mesh.link import AgentLink
from scanner.mesh.wire import PassBlocks
from scanner.plan.selection import SelectionOptions

INV = Path(__file__).parent / "data" / "inventories" / "kubespray-hosts.yml"
SCAN = "s%1"


class _Out(NdjsonOutput):
    def __init__(self) -> None:
        super().__init__(None, stdout=False)
        self.data: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.data.append(data)

    def lines(self) -> list[bytes]:
        return b"".join(self.data).splitlines()


def _mesh(only: frozenset[str] | None = None) -> Mesh:
    catalog, site, selection = SelectionOptions(
        inventories=(str(INV),), nodeport_sample=100
    ).resolve()
    cfg = MeshConfig(catalog, site, selection, output=_Out(), summary_to=io.StringIO(), only=only)
    m = Mesh(cfg)
    m.scan_id = SCAN
    return m


def _results(m: Mesh, src_host: str, rnd: random.Random) -> list[Result]:
    """The source's planned flows, answered: mostly passing, some failing, some odd."""
    out = []
    for i, f in enumerate(flows_of(m.cfg, src_host)):
        x = rnd.random()
        extra: dict[str, Any] = {}
        if x < 0.03:
            extra["src"] = "198.18.9.9"  # left from another address (a moved agent)
        elif x > 0.97:
            extra["src"] = "198.18.9.8"  # the same, said by passing results only
        if x < 0.1:
            r = Result(f, "filtered", "no-response", None, 2, 1e9, "fail")
        elif x < 0.12:
            r = Result(f, "closed", "reset", 0.3, 1, 1e9, "fail")
        else:
            reason = "responder" if rnd.random() < 0.5 else "syn-ack"
            r = Result(f, "open", reason, round(rnd.random(), 3), 1, 1e9 + i, "pass")
        if rnd.random() < 0.03:  # a flow the plan does not hold as such: host outside the mesh
            g = f
            r.flow = Flow(g.dst, g.port, g.proto, "registry", g.src, g.src_host, g.req, g.fam)
        extra["i"] = i
        r.extra = extra
        out.append(r)
    # answers come in any order, each once
    rnd.shuffle(out)
    return out


def _agent_stream(
    results: list[Result], block: int, rnd: random.Random, flushes: float = 0.01
) -> bytes:
    """What an agent writes (scanner.engine.process._run with PassBlocks): failing results in
    batches with their index, passing ones in blocks, both flushed now and then."""
    blocks = PassBlocks(SCAN, size=block)
    pending: list[Result] = []
    out = []
    for r in results:
        if r.verdict == "pass":
            if blocks.add(r):
                out.append(blocks.take())
        else:
            pending.append(r)
        if rnd.random() < flushes:  # the ticker's flush
            out.append(encode_results(pending, SCAN))
            pending = []
            out.append(blocks.take())
    out.append(encode_results(pending, SCAN))
    out.append(blocks.take())
    return b"".join(out)


def _plain_stream(results: list[Result]) -> bytes:
    return encode_results(results, SCAN)


def _feed(m: Mesh, name: str, data: bytes, rnd: random.Random) -> AgentLink:
    """``data`` through a real AgentLink, cut into reads at random line boundaries."""

    async def go() -> AgentLink:
        host = next(h for h in m.hosts if h.name == name)
        link = AgentLink(m, host, (["sim"], ["agent"]))
        lines = data.splitlines(keepends=True)
        pos = 0
        while pos < len(lines):
            k = rnd.choice([1, 7, 200, 1000])
            link.feed(b"".join(lines[pos : pos + k]))
            pos += k
        return link

    return asyncio.run(go())


def _state(m: Mesh, link: AgentLink) -> dict[str, Any]:
    join = {}
    for key, t in m.join.reqs.items():
        dirs = []
        for k in range(len(t.sig)):  # (t.passed of a direction with a failure is stale)
            d = m.join._dir(t, k)
            if d is not None:
                dirs.append((k, d.counts(), d.ports.text(), d.ports.count, d.ports.none,
                             d.src, d.dst, sorted((k, p.text()) for k, p in d.failures.items())))  # fmt: skip
        join[key] = dirs
    return {
        "lines": sorted(m.out.lines()),  # type: ignore[attr-defined]
        "results": (m.results, link.results),
        "states": Counter(m.states),
        "tokens": (m.tokens.token, m.tokens.synack),
        "verdicts": m.matrix.verdicts,
        "matrix": (m.matrix.passes, m.matrix.ends),
        "window": (link.window.low, link.window.starts, link.window.ends),
        "moved": m.moved,
        "join": join,
    }


@pytest.mark.parametrize("seed", range(5))
def test_blocks_fold_and_forward_as_their_lines_would(seed: int) -> None:
    rnd = random.Random(seed)
    probe = _mesh()
    sources = [n for n in probe.join.names if probe.planned_by.get(n)]
    src = sources[seed % len(sources)]
    results = _results(probe, src, rnd)
    block = rnd.choice([1, 5, 64, 512])
    fast, plain = _mesh(), _mesh()
    lines = _plain_stream(results)  # first: PassBlocks.add takes the index off a result
    fl = _feed(fast, src, _agent_stream(results, block, rnd), rnd)
    pl = _feed(plain, src, lines, rnd)
    a, b = _state(fast, fl), _state(plain, pl)
    assert a == b
    assert len(a["lines"]) == len(results) > 100
    assert a["window"] == (len(results), [], [])
    assert a["moved"] == {src: {"198.18.9.9", "198.18.9.8"}}
    assert a["tokens"][0] and a["tokens"][1]  # both reasons were there


def test_only_or_a_host_outside_the_join_takes_the_lines_one_by_one() -> None:
    rnd = random.Random(9)
    probe = _mesh()
    src = probe.join.names[1]
    results = _results(probe, src, rnd)
    only = frozenset({"fail"})
    fast, plain = _mesh(only), _mesh(only)
    lines = _plain_stream(results)
    fl = _feed(fast, src, _agent_stream(results, 64, rnd), rnd)
    pl = _feed(plain, src, lines, rnd)
    assert _state(fast, fl) == _state(plain, pl)
    assert all(b'"verdict":"fail"' in x for x in fast.out.lines())  # type: ignore[attr-defined]


def test_a_block_the_agent_did_not_finish_is_owed_never_counted() -> None:
    rnd = random.Random(3)
    m = _mesh()
    src = m.join.names[0]
    results = [r for r in _results(m, src, rnd) if r.verdict == "pass"][:300]
    results.sort(key=lambda r: r.extra["i"])  # type: ignore[index]
    data = _agent_stream(results, 100, rnd, flushes=0).splitlines()
    heads = [k for k, x in enumerate(data) if x.startswith(PassBlocks.HEAD)]
    assert len(heads) == 3
    cut = data[: heads[2] + 40]  # the third block's header and 40 of its 100 lines
    link = _feed(m, src, b"\n".join(cut) + b"\n", rnd)
    assert link.results == m.results == 200 and len(m.out.lines()) == 200  # type: ignore[attr-defined]
    m.owed(link, "the agent exited with status 1")
    lines = [orjson.loads(x) for x in m.out.lines()]  # type: ignore[attr-defined]
    planned = m.planned_by[src]
    assert len(lines) == planned == m.results  # every planned flow exactly once
    owed = [x for x in lines if x["verdict"] == "unknown"]
    assert len(owed) == planned - 200


def _owed_once(m: Mesh, link: AgentLink, src: str) -> list[dict[str, Any]]:
    """Owe the agent's missing flows (as the coordinator does at the end) and check that every
    planned flow then has exactly one result line."""
    m.owed(link, "the agent ended without a result")
    lines = [orjson.loads(x) for x in m.out.lines()]  # type: ignore[attr-defined]
    idx = sorted(i for i, _ in enumerate(flows_of(m.cfg, src)))
    assert len(lines) == len(idx) == m.planned_by[src] == m.results
    keys = {(x["host"], x["req"], x["proto"], x["port"], x["dst"]) for x in lines}
    assert len(keys) == len(lines)  # no flow twice
    return lines


@pytest.mark.parametrize(
    "field, value, counted",
    [("i", [0, 9], 0), ("n", 9, 0), ("bytes", "x", 0), ("n", 0, 0), ("bytes", -1, 0),
     ("bytes", "inside a line", 10), ("type", "banner", 0)],
)  # fmt: skip
def test_a_block_whose_header_does_not_frame_it_is_broken_lines_never_lost(
    field: str, value: Any, counted: int
) -> None:
    """A header whose runs do not give one index per line, whose line or byte count is not
    its lines', or that cannot be read at all: what cannot be told is a broken line (counted,
    said at the end), its flow owed; a flow is never counted twice nor lost. Lines that are
    whole but framed by a wrong byte count are read one by one and count."""
    rnd = random.Random(4)
    m = _mesh()
    src = m.join.names[0]
    results = [r for r in _results(m, src, rnd) if r.verdict == "pass"][:10]
    data = _agent_stream(results, 10, rnd, flushes=0).splitlines()
    head = orjson.loads(data[0])
    head[field] = value
    if value == "inside a line":
        head["bytes"] = head["n"] * 10
    first = orjson.dumps(head)
    if field == "type":
        first = b"banner " + orjson.dumps({**head, "type": "passes"})
    bad = b"\n".join([first, *data[1:]]) + b"\n"
    link = _feed(m, src, bad, random.Random(0))
    assert link.failed is None and m.results == counted == link.results
    assert link.garbage == (0 if counted else 10 + (field in ("bytes", "type") or value == 0))
    lines = _owed_once(m, link, src)
    assert sum(x["verdict"] == "pass" for x in lines) == counted


def test_a_line_broken_inside_a_block_is_one_flow_owed() -> None:
    """Something writes into the agent's stdout in the middle of a block (a prefix on one
    result line): the block's bytes no longer frame it, so its lines are read one by one; the
    broken line is one flow owed, the other lines count, the next block is taken whole."""
    rnd = random.Random(6)
    m = _mesh()
    src = m.join.names[0]
    results = [r for r in _results(m, src, rnd) if r.verdict == "pass"][:30]
    data = _agent_stream(results, 10, rnd, flushes=0).splitlines(keepends=True)
    data[3] = b"banner " + data[3]  # the first block's third line
    link = _feed(m, src, b"".join(data), random.Random(1))
    assert link.failed is None and link.garbage == 1 and m.results == 29
    lines = _owed_once(m, link, src)
    assert sum(x["verdict"] == "pass" for x in lines) == 29


def test_a_header_that_lies_about_its_lines_is_read_line_by_line() -> None:
    """Groups that say pass over lines that are failures: the first line is read, it is not
    what the header says, so every line goes the plain way and counts as what it is."""
    rnd = random.Random(5)
    m, plain = _mesh(), _mesh()
    src = m.join.names[0]
    results = [r for r in _results(m, src, rnd) if r.verdict == "fail"][:10]
    lines = encode_results(results, SCAN).splitlines()
    stripped = [x[: x.rfind(b',"i":')] + b"}" for x in lines]
    idx = [r.extra["i"] for r in results]  # type: ignore[index]
    runs = [x for i in idx for x in (i, 1)]
    g = ["k8s.nodeport", "tcp", "ipv4", "198.18.0.1", src, "open", 30000, [src, "x"] * 10]
    body = b"\n".join(stripped) + b"\n"
    head = {"type": "passes", "n": 10, "bytes": len(body), "i": runs, "why": {}, "groups": [g]}
    fl = _feed(m, src, orjson.dumps(head) + b"\n" + body, rnd)
    pl = _feed(plain, src, b"\n".join(lines) + b"\n", rnd)
    assert _state(m, fl) == _state(plain, pl)
    assert m.matrix.verdicts.get("fail") == 10 and not m.matrix.verdicts.get("pass")


@pytest.mark.parametrize("stray", [b"banner\n", b"{}\n", b"cut"])
def test_a_line_written_into_a_block_never_gives_a_flow_two_lines_or_none(stray: bytes) -> None:
    """Something writes a whole line of its own into the agent's stdout in the middle of a
    block (another process on the same pipe: a block of ~150 KB is many pipe writes). The
    block's bytes no longer frame it and its next n lines hold the stray line: the lines
    after it must not take the plan index of the line before them (that flow would get its
    pass and an owed unknown; the block's last flow, pushed out of it, no line at all)."""
    rnd = random.Random(6)
    m = _mesh()
    src = m.join.names[0]
    results = [r for r in _results(m, src, rnd) if r.verdict == "pass"][:30]
    data = _agent_stream(results, 10, rnd, flushes=0).splitlines(keepends=True)
    if stray == b"cut":  # a stray line written inside the third line: its tail is a line
        data[3] = data[3][:40] + b"stray\n" + data[3][40:]
    else:
        data.insert(3, stray)  # before the first block's third line
    link = _feed(m, src, b"".join(data), random.Random(1))
    assert link.failed is None
    lines = _owed_once(m, link, src)
    assert sum(x["verdict"] == "pass" for x in lines) == 20  # the first block is owed


def test_a_stray_line_as_long_as_the_blocks_last_line_is_not_taken_for_it() -> None:
    """A stray line written into a block that is exactly as long as the block's last line:
    the header's byte count then frames n whole lines, one of them the stray one, and the
    last real line falls out of the block. The block must not be taken whole (the stray line
    forwarded as a result, the last flow's index claimed with no line for it)."""
    rnd = random.Random(6)
    m = _mesh()
    src = m.join.names[0]
    results = [r for r in _results(m, src, rnd) if r.verdict == "pass"][:30]
    data = _agent_stream(results, 10, rnd, flushes=0).splitlines(keepends=True)
    last = data[10]  # the first block's last line
    data.insert(3, b"x" * (len(last) - 1) + b"\n")
    link = _feed(m, src, b"".join(data), random.Random(1))
    assert link.failed is None
    lines = _owed_once(m, link, src)
    assert sum(x["verdict"] == "pass" for x in lines) == 20  # the first block is owed


@pytest.mark.parametrize("why", [{"responder": "x"}, {"syn-ack": None}, {"responder": [1]}])
def test_a_block_whose_reasons_are_not_counts_is_never_claimed_and_lost(why: Any) -> None:
    """A header whose ``why`` is not counts: read before the block's indexes are claimed
    (it used to raise after the claim and the fold: the agent failed, and the block's flows
    were neither written nor owed)."""
    rnd = random.Random(6)
    m = _mesh()
    src = m.join.names[0]
    results = [r for r in _results(m, src, rnd) if r.verdict == "pass"][:10]
    data = _agent_stream(results, 10, rnd, flushes=0).splitlines(keepends=True)
    head = orjson.loads(data[0])
    head["why"] = why
    data[0] = orjson.dumps(head) + b"\n"
    host = next(h for h in m.hosts if h.name == src)

    async def go() -> AgentLink:
        link = AgentLink(m, host, (["sim"], ["agent"]))
        try:
            link.feed(b"".join(data))
        except Exception as e:  # noqa: BLE001 - as AgentLink's reader: the agent fails
            link._resolve_error(f"a record of the agent could not be read ({e!r:.200})")
        return link

    link = asyncio.run(go())
    assert link.failed is None
    _owed_once(m, link, src)
