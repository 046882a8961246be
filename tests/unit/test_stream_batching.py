"""Stream coalescing (:func:`cloudllm_serve.engine.stream_batching.coalesce`) on timed sources."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import pytest

from cloudllm_serve.engine.stream_batching import coalesce


async def timed(items: list[tuple[float, int]], closed: list[bool]) -> AsyncIterator[int]:
    """Yield each item after its delay (seconds); record whether it was stopped early
    (closed, or cancelled as vLLM's ``generate`` is when its consumer goes away)."""
    try:
        for delay, item in items:
            if delay:
                await asyncio.sleep(delay)
            yield item
    except (GeneratorExit, asyncio.CancelledError):
        closed.append(True)
        raise


async def gather(source: AsyncIterator[int], interval_s: float, max_items: int = 1000) -> list:
    loop = asyncio.get_running_loop()
    started = loop.time()
    return [
        (loop.time() - started, batch) async for batch in coalesce(source, interval_s, max_items)
    ]


def test_every_item_in_order_and_the_first_at_once() -> None:
    # Two items in the first step, then one every 10 ms, gathered for up to 200 ms.
    items = [(0.0, 0), (0.0, 1)] + [(0.01, i) for i in range(2, 12)]
    batches = asyncio.run(gather(timed(items, []), 0.2))
    assert [i for _, batch in batches for i in batch] == list(range(12))
    first_at, first = batches[0]
    assert first == [0, 1] and first_at < 0.05
    # The other ten came in far fewer than ten batches.
    assert len(batches) <= 3


def test_a_slow_stream_is_not_delayed() -> None:
    # Items 150 ms apart with a 100 ms interval: each goes out alone, as it comes.
    items = [(0.15, i) for i in range(4)]
    batches = asyncio.run(gather(timed(items, []), 0.1))
    assert [batch for _, batch in batches] == [[0], [1], [2], [3]]
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(batches)]
    assert all(gap < 0.3 for gap in gaps)


def test_max_items_bounds_a_batch() -> None:
    items = [(0.0, 0)] + [(0.001, i) for i in range(1, 40)]
    batches = asyncio.run(gather(timed(items, []), 10.0, max_items=8))
    assert [i for _, batch in batches for i in batch] == list(range(40))
    assert max(len(batch) for _, batch in batches) <= 8


def test_interval_zero_sends_one_item_per_batch() -> None:
    items = [(0.0, i) for i in range(5)]
    batches = asyncio.run(gather(timed(items, []), 0.0))
    assert [batch for _, batch in batches] == [[i] for i in range(5)]


def test_an_error_comes_after_the_items_before_it() -> None:
    async def failing() -> AsyncIterator[int]:
        yield 1
        await asyncio.sleep(0.01)
        yield 2
        raise RuntimeError("engine died")

    async def run() -> list[int]:
        got: list[int] = []
        with pytest.raises(RuntimeError, match="engine died"):
            async for batch in coalesce(failing(), 0.05, 100):
                got += batch
        return got

    assert asyncio.run(run()) == [1, 2]


def test_closing_the_batches_closes_the_source() -> None:
    closed: list[bool] = []

    async def run() -> None:
        batches = coalesce(
            timed([(0.0, 0)] + [(0.01, i) for i in range(1, 100)], closed), 0.02, 100
        )
        assert await anext(batches) == [0]
        await anext(batches)
        await batches.aclose()

    asyncio.run(run())
    assert closed == [True]
