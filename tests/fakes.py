"""A complete fake engine for fast tests of the HTTP layer (never the only proof).

It follows the engine contract of :mod:`cloudllm_serve.engine.protocol`: it answers
with text derived from the request, so tests can see what reached it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from cloudllm_serve.engine.protocol import (
    ChoiceDelta,
    EngineError,
    EngineFleet,
    EngineStats,
    GenerationChunk,
    GenerationMetrics,
    GenerationRequest,
    ReplicaStatus,
)
from cloudllm_serve.errors import EngineUnavailableError


class FakeEngine:
    """Answers ``"<n> earlier messages; you said: <message>"``, one word per chunk.

    A message (or prompt) starting with ``say:`` is answered with the rest, verbatim;
    with a JSON schema the answer is ``{"answer": "<message>"}``. Choice ``i`` of
    ``n`` gets ``[i]`` appended. Stop sequences cut the answer like vLLM does.
    """

    def __init__(self, *, context_words: int = 200, delay_s: float = 0.0) -> None:
        self.context_words = context_words
        self.delay_s = delay_s
        self.down = False
        self.requests: list[GenerationRequest] = []
        self.running = 0
        self.cancelled = 0

    def _reply(self, request: GenerationRequest) -> str:
        if request.messages is not None:
            message = request.messages[-1]["content"]
            earlier = len(request.messages) - 1
        else:
            prompt = request.prompt
            message = prompt if isinstance(prompt, str) else " ".join(map(str, prompt or []))
            earlier = 0
        if request.sampling.json_schema is not None or request.sampling.json_object:
            return json.dumps({"answer": message})
        if message.startswith("say:"):
            return message.removeprefix("say:")
        return f"{earlier} earlier messages; you said: {message}"

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if self.down:
            raise EngineUnavailableError("engine unavailable: no replica")
        self.requests.append(request)
        text = self._reply(request)
        if len(text.split()) > self.context_words:
            yield GenerationChunk(finished=True, error=EngineError("prompt_too_long", "too long"))
            return
        sampling = request.sampling
        answers = []
        for index in range(sampling.n):
            words = (text + (f" [{index}]" if sampling.n > 1 else "")).split(" ")
            words = words[: sampling.max_tokens]
            answer, reason = (
                " ".join(words),
                "length" if len(words) == sampling.max_tokens else "stop",
            )
            for stop in sampling.stop:
                if stop in answer:
                    answer, reason = answer[: answer.index(stop)], "stop"
            answers.append((answer, reason))
        common = {"prompt_tokens": len(text.split()), "dropped_messages": 0}
        self.running += 1
        try:
            if request.stream:
                for index, (answer, _) in enumerate(answers):
                    for position, word in enumerate(answer.split(" ")):
                        if self.delay_s:
                            await asyncio.sleep(self.delay_s)
                        piece = word if position == 0 else " " + word
                        yield GenerationChunk(choices=(ChoiceDelta(index, piece, 1),), **common)
                final = tuple(
                    ChoiceDelta(i, "", 0, reason) for i, (_, reason) in enumerate(answers)
                )
            else:
                if self.delay_s:  # as long as streaming the same answer would take
                    await asyncio.sleep(self.delay_s * len(answers[0][0].split(" ")))
                final = tuple(
                    ChoiceDelta(i, answer, len(answer.split(" ")), reason)
                    for i, (answer, reason) in enumerate(answers)
                )
            yield GenerationChunk(
                choices=final,
                finished=True,
                metrics=GenerationMetrics(
                    queue_ms=0.1, ttft_ms=1.0, generation_ms=2.0, replica_id="fake-1"
                ),
                **common,
            )
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1

    async def fleet(self) -> EngineFleet:
        if self.down:
            raise EngineUnavailableError("engine unavailable: no replica")
        stats = engine_stats(
            running_requests=self.running,
            requests_finished=len(self.requests),
            replica_id="fake-1",
        )
        return EngineFleet(
            status="HEALTHY",
            target_replicas=1,
            replicas=[ReplicaStatus("fake-1", "RUNNING", stats=stats)],
        )


def engine_stats(**changes: Any) -> EngineStats:
    """An idle, running engine's stats (16 sequences, CPU); ``changes`` override fields."""
    values: dict[str, Any] = {
        "engine_status": "running",
        "model_name": "fake",
        "running_requests": 0,
        "pending_requests": 0,
        "kv_cache_usage": 0.0,
        "prefix_cache_hit_rate": None,
        "requests_finished": 0,
        "tokens_generated": 0,
        "max_model_len": 2048,
        "max_num_seqs": 16,
        "block_size": 16,
        "tensor_parallel_size": 1,
        "gpu_memory_utilization": 0.9,
        "device": "cpu",
        "uptime_s": 1.0,
    }
    return EngineStats(**{**values, **changes})
