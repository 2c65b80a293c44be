"""``transport.ndjson_chunks``: lines split across reads come out whole, over-long lines are
dropped, and with a gate only that many long lines are gathered at once."""

from __future__ import annotations

import asyncio
import contextlib
import random

from scanner.mesh import transport


async def _collect(data: bytes, chunk: int, limit: int, gated: bool) -> list[bytes]:
    gate = asyncio.Semaphore(1) if gated else None
    r = asyncio.StreamReader()
    r.feed_data(data)
    r.feed_eof()
    out: list[bytes] = []
    async for data in transport.ndjson_chunks(r, limit=limit, chunk=chunk, gate=gate):
        assert data.endswith(b"\n") or not data  # complete lines only
        out.extend(data[:-1].split(b"\n") if data else [])
    return out


async def _reference(data: bytes, limit: int, chunk: int) -> list[bytes]:
    """The line reader before the gate (rest + data at every read): the behaviour to keep."""
    stream = asyncio.StreamReader()
    stream.feed_data(data)
    stream.feed_eof()
    out: list[bytes] = []
    rest = b""
    skipping = False
    while True:
        data = await stream.read(chunk)
        if not data:
            return out
        data = rest + data if rest else data
        cut = data.rfind(b"\n")
        if cut < 0:
            if skipping or len(data) > limit:
                rest, skipping = b"", True
            else:
                rest = data
            continue
        rest = data[cut + 1 :]
        lines = data[:cut].split(b"\n")
        if skipping:
            del lines[0]
            skipping = False
        if len(rest) > limit:
            rest, skipping = b"", True
        out.extend(lines)


def test_lines_as_before_across_reads_and_over_long_lines() -> None:
    rnd = random.Random(7)
    for _ in range(300):
        lines = [
            bytes([97 + rnd.randrange(26)]) * rnd.choice([0, 1, 5, 40, 300, 900])
            for _ in range(rnd.randint(1, 30))
        ]
        data = b"\n".join(lines) + rnd.choice([b"\n", b"", b"\ntail"])
        chunk, limit = rnd.choice([7, 64, 256]), rnd.choice([50, 400, 10_000])
        want = asyncio.run(_reference(data, limit, chunk))
        for gated in (False, True):
            assert asyncio.run(_collect(data, chunk, limit, gated)) == want


def test_gate_bounds_long_lines_gathered_at_once() -> None:
    async def main() -> int:
        gate = asyncio.Semaphore(2)
        holding = peak = 0
        acquire, release = gate.acquire, gate.release

        async def counted_acquire() -> bool:
            nonlocal holding, peak
            await acquire()
            holding += 1
            peak = max(peak, holding)
            return True

        def counted_release() -> None:
            nonlocal holding
            holding -= 1
            release()

        gate.acquire, gate.release = counted_acquire, counted_release  # type: ignore[method-assign]

        async def agent(i: int) -> list[bytes]:
            r = asyncio.StreamReader()
            line = b"x" * (5000 + i) + b"\n"

            async def feed() -> None:
                for k in range(0, len(line), 100):
                    r.feed_data(line[k : k + 100])
                    await asyncio.sleep(0)
                r.feed_eof()

            task = asyncio.create_task(feed())
            out = [
                x
                async for data in transport.ndjson_chunks(r, chunk=100, gate=gate)
                for x in data.splitlines()
            ]
            await task
            return out

        results = await asyncio.gather(*(agent(i) for i in range(10)))
        assert [len(r[0]) for r in results] == [5000 + i for i in range(10)]
        assert holding == 0
        return peak

    assert asyncio.run(main()) == 2


def test_last_read_not_kept_while_waiting() -> None:
    """An agent that said done waits for the stop phase: its last read (its done line with
    the tallies, ~2 MB at 1,000 hosts) must not stay referenced meanwhile."""
    import sys

    async def main() -> None:
        r = asyncio.StreamReader()
        r.feed_data(b'{"type":"done"}\n')
        gen = transport.ndjson_chunks(r)
        lines = await gen.__anext__()
        nxt = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0)  # the generator now waits for its next read
        assert not nxt.done()
        assert sys.getrefcount(lines) == 2  # ours and getrefcount's argument: nobody else
        r.feed_eof()
        with contextlib.suppress(StopAsyncIteration):
            await nxt

    asyncio.run(main())
