"""The engine deployment: a thin Serve shim around one engine backend per replica.

The backend is injected (``backend_factory``) so a test can hand in a small real
engine; by default it is :class:`~cloudllm_serve.engine.vllm_engine.VLLMEngine`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Protocol

from cloudllm_serve.engine.protocol import EngineStats, GenerationChunk, GenerationRequest
from cloudllm_serve.engine.vllm_engine import VLLMEngine
from cloudllm_serve.settings import Settings


class EngineBackend(Protocol):
    """What :class:`EngineServer` runs: vLLM in production."""

    async def start(self) -> None:
        """Load the model; return when ready to generate."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Run one generation (see :mod:`cloudllm_serve.engine.protocol`)."""
        ...

    def stats(self) -> EngineStats:
        """A live snapshot."""
        ...

    async def check_health(self) -> None:
        """Raise when the backend can no longer serve."""
        ...

    def shutdown(self) -> None:
        """Release the backend's processes and memory."""
        ...


class EngineServer:
    """One engine replica. Serve calls ``generate`` with ``stream=True`` handles."""

    # Ray actors (and so Serve replicas) may have an async constructor.
    async def __init__(  # type: ignore[misc]
        self,
        settings: Settings,
        backend_factory: Callable[[Settings], EngineBackend] = VLLMEngine,
    ) -> None:
        self._backend = backend_factory(settings)
        await self._backend.start()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream one generation's chunks back to the caller."""
        async for chunk in self._backend.generate(request):
            yield chunk

    async def stats(self) -> EngineStats:
        """This replica's live stats."""
        return self._backend.stats()

    async def check_health(self) -> None:
        """Serve's periodic health check; raising makes Serve replace this replica."""
        await self._backend.check_health()

    def __del__(self) -> None:
        backend = getattr(self, "_backend", None)
        if backend is not None:
            backend.shutdown()
