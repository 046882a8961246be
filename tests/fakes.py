"""A complete fake engine for fast tests of the HTTP layer (never the only proof).

It follows the engine contract of :mod:`cloudllm_serve.engine.protocol`: it answers
with text derived from the conversation, so tests can see what history reached it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from cloudllm_serve.engine.protocol import (
    EngineError,
    EngineStats,
    GenerationChunk,
    GenerationMetrics,
    GenerationRequest,
)
from cloudllm_serve.errors import EngineUnavailableError


class FakeEngine:
    """Answers ``"<n> earlier messages; you said: <message>"`` one word per chunk.

    A message starting with ``say:`` is answered with the rest of it, verbatim.
    """

    def __init__(self, *, context_words: int = 200, delay_s: float = 0.0) -> None:
        self.context_words = context_words
        self.delay_s = delay_s
        self.down = False
        self.requests: list[GenerationRequest] = []
        self.running = 0

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if self.down:
            raise EngineUnavailableError("engine unavailable: no replica")
        self.requests.append(request)
        if len(request.messages[-1]["content"].split()) > self.context_words:
            yield GenerationChunk(finished=True, error=EngineError("prompt_too_long", "too long"))
            return
        message = request.messages[-1]["content"]
        reply = (
            message.removeprefix("say:")
            if message.startswith("say:")
            else f"{len(request.messages) - 1} earlier messages; you said: {message}"
        )
        words = reply.split(" ")[: request.max_tokens]
        self.running += 1
        try:
            text = ""
            for index, word in enumerate(words):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                piece = word if index == 0 else " " + word
                text += piece
                if request.stream:
                    yield GenerationChunk(text=piece, tokens_generated=index + 1)
            yield GenerationChunk(
                text="" if request.stream else text,
                finished=True,
                finish_reason="length" if len(words) == request.max_tokens else "stop",
                tokens_generated=len(words),
                prompt_tokens=sum(len(m["content"].split()) for m in request.messages),
                metrics=GenerationMetrics(queue_ms=0.1, ttft_ms=1.0, generation_ms=2.0),
            )
        finally:
            self.running -= 1

    async def stats(self) -> list[EngineStats]:
        if self.down:
            raise EngineUnavailableError("engine unavailable: no replica")
        return [
            EngineStats(
                engine_status="running",
                model_name="fake",
                running_requests=self.running,
                pending_requests=0,
                kv_cache_usage=0.0,
                prefix_cache_hit_rate=None,
                requests_finished=len(self.requests),
                tokens_generated=0,
                max_model_len=2048,
                max_num_seqs=16,
                block_size=16,
                tensor_parallel_size=1,
                gpu_memory_utilization=0.9,
                device="cpu",
                uptime_s=1.0,
            )
        ]
