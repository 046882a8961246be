"""An :class:`~cloudllm_serve.engine.protocol.EngineClient` over a Serve deployment handle.

Ray and Serve failures (no replica, a replica that died mid-stream) become
:class:`~cloudllm_serve.errors.EngineUnavailableError` here, so the service sees only
the project's own errors.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from cloudllm_serve.engine.protocol import EngineStats, GenerationChunk, GenerationRequest
from cloudllm_serve.errors import EngineUnavailableError


def _describe(error: BaseException) -> str:
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first_line[:300]}"


class ServeEngineClient:
    """Talks to the engine deployment through a ``DeploymentHandle``."""

    def __init__(self, handle: Any, *, stats_timeout_s: float = 3.0) -> None:
        self._stream_handle = handle.options(stream=True)
        self._handle = handle
        self._stats_timeout_s = stats_timeout_s

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream one generation from an engine replica."""
        try:
            async for chunk in self._stream_handle.generate.remote(request):
                yield chunk
        except asyncio.CancelledError:
            raise
        except Exception as error:
            raise EngineUnavailableError(f"engine unavailable: {_describe(error)}") from None

    async def stats(self) -> list[EngineStats]:
        """Stats from one engine replica (the one the router picks)."""
        try:
            stats = await asyncio.wait_for(self._handle.stats.remote(), self._stats_timeout_s)
        except TimeoutError:
            raise EngineUnavailableError(
                f"engine did not answer within {self._stats_timeout_s:.0f} s"
            ) from None
        except Exception as error:
            raise EngineUnavailableError(f"engine unavailable: {_describe(error)}") from None
        return [stats]
