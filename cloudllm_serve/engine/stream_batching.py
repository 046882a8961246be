"""Stream coalescing: a stream's items gathered into batches, without delaying its start.

Every item of an engine replica's stream crosses the Serve handle as its own message
and becomes its own HTTP write in the ingress; at GPU token rates those per-item costs
are what limit a serving layer (ray-project/ray#52745). :func:`coalesce` turns a stream
of items into a stream of lists:

* the first item goes out at once, with whatever the engine produced in the same step
  (vLLM's role chunk and first token), so the time to first token does not move;
* after a batch has gone out, the next one leaves ``interval_s`` after it at the
  earliest, holding every item made meanwhile (at most ``max_items``); an item that
  comes after a quiet ``interval_s`` goes out at once.

So a slow stream pays nothing and a fast one pays at most ``interval_s`` per item.
Items are never merged or altered: the consumer gets each one, in order. An item that is
``attached`` to the next one (a stream's progress report) never leaves alone when items go
one per batch: it waits for the next item.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TypeVar

T = TypeVar("T")


async def coalesce(
    items: AsyncIterator[T],
    interval_s: float,
    max_items: int,
    *,
    attached: Callable[[T], bool] | None = None,
) -> AsyncGenerator[list[T], None]:
    """``items`` as batches (see the module docstring); ``interval_s`` 0: one per batch.

    With ``interval_s`` 0, an item for which ``attached`` is true goes out with the
    item after it (or at the end). An exception of ``items`` is raised after the items
    that came before it. Closing the result (or cancelling its consumer) closes ``items``.
    """
    if interval_s <= 0:
        held: list[T] = []
        try:
            async for item in items:
                if attached is not None and attached(item):
                    held.append(item)
                    continue
                if held:
                    held.append(item)
                    batch, held = held, []
                    yield batch
                else:
                    yield [item]
            if held:
                yield held
        finally:
            await _close(items)
        return
    loop = asyncio.get_running_loop()
    pending: list[T] = []
    ready = asyncio.Event()
    ended = False
    failure: BaseException | None = None
    timer: asyncio.TimerHandle | None = None
    last_sent = float("-inf")

    def schedule() -> None:
        nonlocal timer
        due = last_sent + interval_s
        if loop.time() >= due:
            ready.set()
        elif timer is None:
            timer = loop.call_at(due, ready.set)

    async def pump() -> None:
        nonlocal ended, failure
        try:
            async for item in items:
                pending.append(item)
                if len(pending) == 1:
                    schedule()
                elif len(pending) >= max_items:
                    ready.set()
        except Exception as error:  # handed to the consumer, after what came before
            failure = error
        finally:
            ended = True
            ready.set()

    task = asyncio.create_task(pump())
    try:
        while True:
            await ready.wait()
            ready.clear()
            if timer is not None:
                timer.cancel()
                timer = None
            if pending:
                batch = pending[:]
                pending.clear()
                last_sent = loop.time()
                yield batch
                if pending and not ended:
                    schedule()
                    continue
            if ended and not pending:
                if failure is not None:
                    raise failure
                return
            if ended:
                ready.set()
    finally:
        if timer is not None:
            timer.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await _close(items)


async def _close(items: AsyncIterator[object]) -> None:
    close = getattr(items, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()
