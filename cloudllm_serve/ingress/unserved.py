"""A request that waits for an engine replica while none runs: refused, never left to hang.

Serve's router keeps a request until a replica of the deployment runs, however long
that takes (a worker node lost, its replicas waiting for a node with their resources).
:func:`first_item` waits for a stream's first item as before, and only when it has not
come for :data:`CHECK_AFTER_S` asks whether any replica runs at all (Serve's controller,
an answer shared by the ingress replica's requests for a second; a replica starting while
no node is lost counts, so a redeploy's requests wait for it): if none does, the request is
cancelled and refused with :class:`~cloudllm_serve.errors.EngineUnavailableError`
(503, ``Retry-After``). A request queued behind busy replicas keeps its place.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from cloudllm_serve.errors import EngineUnavailableError

T = TypeVar("T")

#: How long a first item may take before the fleet is asked whether any replica runs.
CHECK_AFTER_S = 2.0
#: Marks a stream that ended before its first item.
ENDED: Any = object()


async def first_item(
    items: AsyncIterator[T],
    unserved: Callable[[], Awaitable[str | None]],
    *,
    check_after_s: float = CHECK_AFTER_S,
) -> T:
    """The first item of ``items`` (:data:`ENDED` if none), or a refusal.

    Each ``check_after_s`` without it, ``unserved()`` says why no replica could serve the
    request (``None``: one could); then the wait is cancelled and the reason raised as
    :class:`EngineUnavailableError`.
    """
    waiting = asyncio.ensure_future(_next(items))
    try:
        while True:
            done, _ = await asyncio.wait((waiting,), timeout=check_after_s)
            if done:
                return waiting.result()
            reason = await unserved()
            if reason is not None:
                raise EngineUnavailableError(reason)
    finally:
        if not waiting.done():
            waiting.cancel()


async def _next(items: AsyncIterator[T]) -> T:
    try:
        return await items.__anext__()
    except StopAsyncIteration:
        return ENDED  # type: ignore[no-any-return]
