"""The engine deployment: a thin Serve shim around one engine backend per replica.

The backend is injected (``backend_factory``) so a test can hand in a small real
engine; by default it is :class:`~cloudllm_serve.engine.vllm_engine.VLLMEngine`.

Before loading anything, a replica checks that it runs in the placement group its
settings derive (:mod:`cloudllm_serve.placement`); hand-written bundles in a
Serve config stop it with an error that says what to change.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any, Protocol, TypeVar

from cloudllm_serve.engine.protocol import (
    EngineDeadError,
    EngineModelInfo,
    EngineStats,
    GenerationChunk,
    GenerationRequest,
    OpenAIAnswer,
    OpenAICall,
    OpenAIProgress,
    OpenAIReplicaItem,
    OpenAIStreamEnd,
)
from cloudllm_serve.engine.stream_batching import coalesce
from cloudllm_serve.engine.vllm_engine import VLLMEngine
from cloudllm_serve.errors import SettingsError
from cloudllm_serve.placement import bundle_mismatch
from cloudllm_serve.settings import Settings

logger = logging.getLogger(__name__)
ItemT = TypeVar("ItemT")


def current_bundles() -> list[dict[str, float]] | None:
    """Bundles of the placement group this process runs in (``None`` outside one)."""
    import ray

    if not ray.is_initialized():
        return None
    group = ray.util.get_current_placement_group()
    return None if group is None else list(group.bundle_specs)


def current_replica_id() -> str:
    """Serve's id of this replica ("" outside Serve)."""
    from ray import serve

    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # not running inside a Serve replica (a test)
        return ""


class EngineBackend(Protocol):
    """What :class:`EngineServer` runs: vLLM in production."""

    async def start(self) -> None:
        """Load the model; return when ready to generate."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Run one generation (see :mod:`cloudllm_serve.engine.protocol`)."""
        ...

    def openai(self, call: OpenAICall) -> AsyncIterator[OpenAIReplicaItem]:
        """Run one ``/v1`` call through vLLM's OpenAI serving layer."""
        ...

    async def models(self) -> dict[str, Any]:
        """``GET /v1/models`` as vLLM answers it."""
        ...

    def model_info(self) -> EngineModelInfo:
        """What the served model can take."""
        ...

    def stats(self) -> EngineStats:
        """A live snapshot."""
        ...

    async def check_health(self) -> None:
        """Raise when the backend can no longer serve."""
        ...

    def dead(self) -> bool:
        """Whether the backend's engine has died (no request can succeed here)."""
        ...

    def shutdown(self) -> None:
        """Release the backend's processes and memory."""
        ...


class EngineServer:
    """One engine replica. Serve calls ``generate`` and ``openai`` with ``stream=True`` handles.

    Both stream lists of items: a stream's items coalesced
    (:mod:`cloudllm_serve.engine.stream_batching`), each list one handle item.
    """

    # Ray actors (and so Serve replicas) may have an async constructor.
    async def __init__(  # type: ignore[misc]
        self,
        settings: Settings,
        backend_factory: Callable[[Settings], EngineBackend] = VLLMEngine,
    ) -> None:
        problem = bundle_mismatch(settings, current_bundles())
        if problem is not None:
            logger.error(problem)
            raise SettingsError(problem)
        self._replica_id = current_replica_id()
        self._settings = settings
        self._backend = backend_factory(settings)
        await self._backend.start()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[list[GenerationChunk]]:
        """Stream one generation's chunks back, in batches (the last chunk names us).

        Raises :class:`EngineDeadError` when the engine is dead (the ingress tries again
        elsewhere, or continues the request there).
        """
        async with aclosing(self._batched(self._generate(request))) as batches:
            async for batch in batches:
                yield batch

    async def openai(self, call: OpenAICall) -> AsyncIterator[list[OpenAIReplicaItem]]:
        """Stream one ``/v1`` call's items back, in batches (its answer or end names us).

        Raises :class:`EngineDeadError` when the engine is dead (as ``generate``). A
        progress item never goes alone: it leaves with the string that holds it.
        """
        async with aclosing(self._batched(self._openai(call), _is_progress)) as batches:
            async for batch in batches:
                yield batch

    def _batched(
        self, items: AsyncIterator[ItemT], attached: Callable[[ItemT], bool] | None = None
    ) -> AsyncGenerator[list[ItemT], None]:
        """``items`` coalesced as ``STREAM_BATCH_INTERVAL_MS`` says.

        Each batch crosses the handle as one item and becomes one HTTP write.
        """
        return coalesce(
            items,
            self._settings.STREAM_BATCH_INTERVAL_MS / 1000,
            self._settings.STREAM_BATCH_MAX_ITEMS,
            attached=attached,
        )

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self._refuse_if_dead("")
        async for chunk in self._backend.generate(request):
            if chunk.error is not None:
                self._refuse_if_dead(chunk.error.message)
            if chunk.metrics is not None:
                chunk = dataclasses.replace(
                    chunk, metrics=dataclasses.replace(chunk.metrics, replica_id=self._replica_id)
                )
            yield chunk

    async def _openai(self, call: OpenAICall) -> AsyncIterator[OpenAIReplicaItem]:
        self._refuse_if_dead("")
        async for item in self._backend.openai(call):
            if _is_error(item):
                self._refuse_if_dead(str(item)[:300])
            if isinstance(item, (OpenAIAnswer, OpenAIStreamEnd)):
                item = dataclasses.replace(item, replica_id=self._replica_id)
            yield item

    def _refuse_if_dead(self, error: str) -> None:
        """Raise :class:`EngineDeadError` if the engine died (``error``: what it gave)."""
        if self._backend.dead():
            logger.warning("engine is dead; refusing a request so that it is retried elsewhere")
            raise EngineDeadError(self._replica_id, error or "vLLM's engine process is gone")

    async def models(self) -> dict[str, Any]:
        """``GET /v1/models`` as vLLM answers it."""
        return await self._backend.models()

    async def model_info(self) -> EngineModelInfo:
        """What the served model can take."""
        return self._backend.model_info()

    async def record_routing_stats(self) -> dict[str, Any]:
        """This replica's live :class:`EngineStats`, as a dict.

        A Serve hook, so it is an actor method: the ingress calls it directly, beside
        the request queue (see :mod:`cloudllm_serve.ingress.engine_client`).
        """
        stats = dataclasses.replace(self._backend.stats(), replica_id=self._replica_id)
        return dataclasses.asdict(stats)

    async def check_health(self) -> None:
        """Serve's periodic health check; raising makes Serve replace this replica."""
        await self._backend.check_health()

    def __del__(self) -> None:
        backend = getattr(self, "_backend", None)
        if backend is not None:
            backend.shutdown()


def _is_progress(item: OpenAIReplicaItem) -> bool:
    return isinstance(item, OpenAIProgress)


def _is_error(item: OpenAIReplicaItem) -> bool:
    """Whether a ``/v1`` item is an error: a 5xx answer or an SSE error event."""
    if isinstance(item, OpenAIAnswer):
        return item.status >= 500
    return isinstance(item, str) and item.startswith('data: {"error"')
