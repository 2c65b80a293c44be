"""The coordinator's side of one agent: its process, its stream of records, its window.

``AgentLink`` starts the agent through the exec template, reads its stdout a pipe read at a
time (one JSON parse per read), hands result records to the mesh (``Mesh.on_results``) and
answers the phase futures (``expect``) from its control records. ``Window`` is what an agent
still owes: the plan indexes that got a result.
"""

from __future__ import annotations

import asyncio
import contextlib
from array import array
from bisect import bisect_right
from collections import deque
from typing import Any

import orjson

from scanner.mesh import transport
from scanner.mesh.wire import PassBlocks

PASSES_HEAD = PassBlocks.HEAD
NL_PASSES_HEAD = b"\n" + PASSES_HEAD
RESULT = b'{"type":"result",'  # how every line of a block starts (encode_results)
NL_RESULT = b"\n" + RESULT
MAX_BLOCK = 1 << 16  # lines in one block of passing results (an agent sends 512)
MAX_BLOCK_LINE = 1 << 12  # bytes per line of a block, at most (a result line is ~300)


class Window:
    """Which plan indexes got a result: everything below ``low``, plus the runs above it
    (``starts[j]`` up to ``ends[j]``, exclusive; sorted, disjoint, never touching). Runs, not
    single indexes: a block of passing results (wire.PassBlocks) marks ~500 at once, and an
    agent's results arrive nearly in plan order, so there are about as many runs as probes
    still in flight."""

    __slots__ = ("low", "starts", "ends")

    def __init__(self) -> None:
        self.low = 0
        self.starts: list[int] = []
        self.ends: list[int] = []

    def add(self, i: int) -> bool:
        """Mark i; False if it was already marked (a duplicate)."""
        if i == self.low and not self.starts:
            self.low = i + 1
            return True
        return self.add_run(i, i + 1)

    def add_run(self, a: int, b: int) -> bool:
        """Mark a..b-1 (a < b); False, and nothing marked, if one of them was marked."""
        if a < self.low:
            return False
        starts, ends = self.starts, self.ends
        j = bisect_right(starts, a)  # the runs before j start at or below a
        if (j and ends[j - 1] > a) or (j < len(starts) and starts[j] < b):
            return False
        if j and ends[j - 1] == a:  # joins the run before
            j -= 1
            if j + 1 < len(starts) and starts[j + 1] == b:  # and the one after
                ends[j] = ends[j + 1]
                del starts[j + 1], ends[j + 1]
            else:
                ends[j] = b
        elif j < len(starts) and starts[j] == b:  # joins the run after
            starts[j] = a
        else:
            starts.insert(j, a)
            ends.insert(j, b)
        if starts[0] == self.low:
            self.low = ends[0]
            del starts[0], ends[0]
        return True

    def claim(self, runs: list[int]) -> bool:
        """Mark the runs [start, length, start, length, ...] (valid: lengths >= 1), all of
        them, or none when one index is marked already or two runs overlap."""
        if len(runs) == 2 and runs[0] == self.low and not self.starts:
            self.low += runs[1]  # in order, contiguous: the common case
            return True
        spans = sorted((runs[j], runs[j] + runs[j + 1]) for j in range(0, len(runs), 2))
        for (_, b), (a2, _) in zip(spans, spans[1:], strict=False):
            if a2 < b:
                return False
        for a, b in spans:
            if a < self.low or (a in self) or (b - 1 in self):
                return False
            k = bisect_right(self.starts, a)
            if k < len(self.starts) and self.starts[k] < b:
                return False  # a marked run inside a..b
        for a, b in spans:
            self.add_run(a, b)
        return True

    def __contains__(self, i: int) -> bool:
        if i < self.low:
            return True
        j = bisect_right(self.starts, i)
        return bool(j) and i < self.ends[j - 1]


# ---- one agent ------------------------------------------------------------------------------


class AgentLink:
    """The coordinator's side of one agent: its process, its phase futures, its window."""

    def __init__(self, mesh: Any, host: Any, parts: tuple[list[str], list[str]]) -> None:
        self.mesh = mesh
        self.host = host
        self.name: str = host.name
        self.prefix, self.agent = parts  # the exec template's words, the agent command's
        self.argv = transport.command_argv(*parts)
        self.proc: asyncio.subprocess.Process | None = None
        self.window = Window()
        # --emit failures: the plan indexes of the lines received (the passing flows never
        # come one by one, so no window can close over them); 8 bytes per failing flow
        self.got: array[int] | None = array("Q") if mesh.cfg.emit == "failures" else None
        self.tallied = 0
        self.jidx: int | None = mesh.join.index.get(self.name)  # this host in the pair join
        self.results = 0
        self.garbage = 0  # stdout lines that were not one JSON record (said at the end)
        # a block of passing results being gathered (wire.PassBlocks): its header, its lines
        # so far and how many are still to come
        self.block_head: dict[str, Any] | None = None
        self.block_parts: list[bytes] = []
        self.block_left = 0  # bytes
        self.block_lines = 0  # lines, for a block whose bytes did not frame it
        self.planned = mesh.planned_by.get(self.name, 0)
        self.failed: str | None = None
        self.stderr: deque[str] = deque(maxlen=8)
        self.waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.reader: asyncio.Task[None] | None = None
        self.err_reader: asyncio.Task[None] | None = None
        self.eof = asyncio.get_running_loop().create_future()
        self.done_rec: dict[str, Any] | None = None
        self.exit_rec: dict[str, Any] | None = None
        self.hello_rec: dict[str, Any] | None = None
        self.ready_rec: dict[str, Any] | None = None

    # -- I/O ---------------------------------------------------------------------------------

    def send(self, msg: dict[str, Any]) -> None:
        p = self.proc
        if p is None or p.stdin is None or p.stdin.is_closing():
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            p.stdin.write(orjson.dumps(msg) + b"\n")

    async def expect(self, kind: str, timeout: float | None) -> dict[str, Any]:
        """Wait for the next record of this kind (or the agent's end / an error record)."""
        fut = asyncio.get_running_loop().create_future()
        self.waiting[kind] = fut
        waits = [fut, self.eof]
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        self.waiting.pop(kind, None)
        if fut in done:
            return fut.result()
        if self.eof.done():
            raise AgentFailed(self.eof.result())
        fut.cancel()
        raise AgentFailed(f"no {kind} record within {timeout:g} s")

    async def start(self, payload: bytes | None) -> None:
        try:
            self.proc = await transport.start(self.argv)
        except OSError as e:
            raise AgentFailed(f"exec failed: {self.argv[0]}: {e.strerror or e}") from None
        self.reader = asyncio.create_task(self._read())
        self.err_reader = asyncio.create_task(self._read_err())
        if payload is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(payload)
            await self.drain()

    async def drain(self) -> None:
        """Wait until what was written is in the pipe: bounds the coordinator's buffers."""
        p = self.proc
        if p is not None and p.stdin is not None and not p.stdin.is_closing():
            with contextlib.suppress(ConnectionError, RuntimeError):
                await p.stdin.drain()

    async def send_raw(self, data: bytes) -> None:
        p = self.proc
        if p is None or p.stdin is None or p.stdin.is_closing():
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            p.stdin.write(data)
        await self.drain()

    async def _read_err(self) -> None:
        p = self.proc
        assert p is not None and p.stderr is not None
        while True:
            try:
                line = await p.stderr.readline()
            except (ValueError, asyncio.LimitOverrunError):
                continue
            if not line:
                return
            text = line.decode("utf-8", "replace").strip()
            if text:
                self.stderr.append(text[:300])

    async def _read(self) -> None:
        p = self.proc
        assert p is not None and p.stdout is not None
        feed = self.feed
        gate = getattr(self.mesh, "long_lines", None)
        async for data in transport.ndjson_chunks(p.stdout, gate=gate):
            try:
                feed(data)
            except Exception as e:  # noqa: BLE001 - any record the coordinator cannot take
                # the host fails with the reason (its flows owed), never a reader that dies
                # and a run that waits for ever for this agent's end
                self._resolve_error(f"a record of the agent could not be read ({e!r:.200})")
            del data
        code = await p.wait()
        await asyncio.sleep(0)  # let the stderr reader catch up with the last lines
        if self.err_reader is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self.err_reader), 1.0)
        tail = f": {self.stderr[-1]}" if self.stderr else ""
        if self.hello_rec is None:
            tail += transport.start_hint(self.prefix, self.agent, code, "\n".join(self.stderr))
        if not self.eof.done():
            self.eof.set_result(f"the agent exited with status {code}{tail}")

    def feed(self, data: bytes) -> None:
        """Complete lines of this agent's stdout (one read's worth, ~200 result lines, ending
        with a newline): its records, parsed, and its blocks of passing results
        (wire.PassBlocks), whose bytes are gathered unread until the block is whole (an agent
        that ends inside a block owes those flows).

        A block is framed by its header's byte count. When those bytes are not its ``n``
        lines (something else wrote into the agent's stdout: a wrapper, a banner), the block
        is its next ``n`` lines instead, each read on its own (``Mesh.on_passes`` with
        ``exact=False``): a broken line is one flow owed, as outside a block; a line that is
        none of the block's (a stray line that shifts the rest) owes every flow of the block.
        A header that cannot be read is a broken line; the lines after it then carry no index
        and count as broken lines (their flows owed), never as results."""
        pos, end = 0, len(data)
        while pos < end:
            if self.block_left:  # a block's bytes, as its header counts them
                take = data[pos : pos + self.block_left] if pos or self.block_left < end else data
                pos += len(take)
                self.block_left -= len(take)
                self.block_parts.append(take)
                if self.block_left:
                    continue
                parts, self.block_parts = self.block_parts, []
                lines = parts[0] if len(parts) == 1 else b"".join(parts)
                blk = self.block_head
                assert blk is not None
                n = blk["n"]
                if (
                    lines.endswith(b"\n")
                    and lines.count(b"\n") == n
                    # n lines, each a result line: not a stray line as long as the one it
                    # pushed out of the block
                    and lines.startswith(RESULT)
                    and lines.count(NL_RESULT) == n - 1
                ):
                    self.block_head = None
                    self.mesh.on_passes(self, blk, lines)
                else:  # not n lines: the block is the next n lines, counted from its start
                    data = lines + data[pos:]
                    pos, end = 0, len(data)
                    self.block_lines = n
                continue
            if self.block_lines:  # a block whose bytes did not frame it: its next n lines
                q = pos
                while self.block_lines and q < end:
                    nl = data.find(b"\n", q)
                    if nl < 0:
                        q = end  # a line that goes on in the next read
                        break
                    q = nl + 1
                    self.block_lines -= 1
                self.block_parts.append(data[pos:q])
                pos = q
                if not self.block_lines:
                    blk, lines = self.block_head, b"".join(self.block_parts)
                    self.block_head, self.block_parts = None, []
                    self.mesh.on_passes(self, blk, lines, exact=False)
                continue
            if data.startswith(PASSES_HEAD, pos):
                h = pos
            else:
                h = data.find(NL_PASSES_HEAD, pos)
                h = end if h < 0 else h + 1
            if h > pos:
                self._records((data[pos:h] if pos or h < end else data)[:-1].split(b"\n"))
            if h < end:
                nl = data.find(b"\n", h)
                blk = loads_or_none(data[h:nl])
                n, size = (blk.get("n"), blk.get("bytes")) if blk.__class__ is dict else (0, 0)
                if (
                    n.__class__ is not int
                    or size.__class__ is not int
                    or not 0 < n <= MAX_BLOCK
                    or not n <= size <= MAX_BLOCK * MAX_BLOCK_LINE
                ):
                    self.garbage += 1  # not a header that can frame a block: a broken line
                else:
                    self.block_head, self.block_left = blk, size
                h = nl + 1
            pos = h

    def _records(self, lines: list[bytes]) -> None:
        try:
            # one parse for the whole read: a third less CPU than a parse per line. Lines that
            # are not one JSON value each fail it or change the count: then line by line
            recs = loads(b"[" + b",".join(lines) + b"]")
            if len(recs) != len(lines):
                raise ValueError
        except ValueError:  # orjson.JSONDecodeError is one
            recs = [loads_or_none(x) for x in lines]
        self.mesh.on_results(self, recs, lines)

    def _control(self, rec: dict[str, Any]) -> None:
        """Every record of an agent but its results."""
        mesh = self.mesh
        t = rec.get("type")
        if t == "witness":
            mesh.join.witness(rec)
            return
        if t == "done":
            groups = rec.pop("tally_groups", None)
            if groups and self.failed is None:
                try:
                    mesh.on_tally_groups(self, groups)
                except ValueError as e:  # none of them counted: the agent's flows are owed
                    self._resolve_error(f"its tallies could not be read ({e})")
                    return
            self.done_rec = rec
        elif t == "exit":
            self.exit_rec = rec
        elif t == "probing" and rec.get("planned") != self.planned:
            self._resolve_error(
                f"the agent planned {rec.get('planned')} flows, the coordinator "
                f"{self.planned} (different portmesh versions on the two ends?)"
            )
            return
        elif t == "error":
            self._resolve_error(f"agent error: {rec.get('reason')}")
            return
        fut = self.waiting.get(t) if isinstance(t, str) else None
        if fut is not None and not fut.done():
            fut.set_result(rec)

    def _resolve_error(self, reason: str) -> None:
        # fail at once: not one more line of this agent may be counted
        self.mesh.fail(self, reason)
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(AgentFailed(reason))

    def kill(self) -> None:
        p = self.proc
        if p is not None and p.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                p.kill()


class AgentFailed(Exception):
    pass


loads = orjson.loads


def loads_or_none(line: bytes) -> Any:
    try:
        return loads(line)
    except orjson.JSONDecodeError:
        return None
