"""A complete fake engine for fast tests of the HTTP layer (never the only proof).

It follows the engine contract of :mod:`cloudllm_serve.engine.protocol`: it answers
with text derived from the request, so tests can see what reached it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from vllm.entrypoints.serve.engine.protocol import ErrorInfo, ErrorResponse

from cloudllm_serve.engine.protocol import (
    ChoiceDelta,
    EngineError,
    EngineFleet,
    EngineModelInfo,
    EngineStats,
    GenerationChunk,
    GenerationMetrics,
    GenerationRequest,
    OpenAIAnswer,
    OpenAICall,
    OpenAIItem,
    OpenAIStreamEnd,
    ReplicaStatus,
)
from cloudllm_serve.errors import EngineUnavailableError


class FakeEngine:
    """Answers ``"<n> earlier messages; you said: <message>"``, one word per chunk.

    A message (or prompt) starting with ``say:`` is answered with the rest, verbatim;
    with a JSON schema the answer is ``{"answer": "<message>"}``. Choice ``i`` of
    ``n`` gets ``[i]`` appended. Stop sequences cut the answer like vLLM does. On ``/v1``,
    the word :attr:`fail_word` in the answer makes the engine fail (``None``: never).
    """

    def __init__(self, *, context_words: int = 200, delay_s: float = 0.0) -> None:
        self.context_words = context_words
        self.delay_s = delay_s
        self.down = False
        self.requests: list[GenerationRequest] = []
        self.calls: list[OpenAICall] = []
        self.model = "SmolLM2-135M-Instruct"
        self.supports_images = False
        self.running = 0
        self.cancelled = 0
        self.fail_word: str | None = "FAIL"
        #: How long a ``/v1/responses`` answer takes (cancellable, counted in ``cancelled``).
        self.response_delay_s = 0.0

    def _reply(self, request: GenerationRequest) -> str:
        if request.messages is not None:
            message = request.messages[-1]["content"]
            if isinstance(message, list):  # content parts: "<k> images: <text>"
                images = sum(1 for part in message if part.get("type") == "image_url")
                text = " ".join(str(part.get("text", "")) for part in message if "text" in part)
                message = f"{images} images: {text}"
            earlier = len(request.messages) - 1
        else:
            message, earlier = "", 0
        if request.sampling.json_schema is not None:
            return json.dumps({"answer": message})
        if message.startswith("say:"):
            return message.removeprefix("say:")
        return f"{earlier} earlier messages; you said: {message}"

    async def generate(self, request: GenerationRequest) -> AsyncIterator[list[GenerationChunk]]:
        """The chunks of :meth:`generate_items`, each in a batch of its own."""
        async for chunk in self.generate_items(request):
            yield [chunk]

    async def openai(self, call: OpenAICall) -> AsyncIterator[list[OpenAIItem]]:
        """The items of :meth:`openai_items`, each in a batch of its own."""
        async for item in self.openai_items(call):
            yield [item]

    async def generate_items(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if self.down:
            raise EngineUnavailableError("engine unavailable: no replica")
        self.requests.append(request)
        text = self._reply(request)
        if len(text.split()) > self.context_words:
            yield GenerationChunk(finished=True, error=EngineError("prompt_too_long", "too long"))
            return
        sampling = request.sampling
        words = text.split(" ")[: sampling.max_tokens]
        answer = " ".join(words)
        reason = "length" if len(words) == sampling.max_tokens else "stop"
        common = {"prompt_tokens": len(text.split()), "dropped_messages": 0}
        self.running += 1
        try:
            if request.stream:
                for position, word in enumerate(words):
                    if self.delay_s:
                        await asyncio.sleep(self.delay_s)
                    piece = word if position == 0 else " " + word
                    yield GenerationChunk(choices=(ChoiceDelta(0, piece, 1),), **common)
                final = ChoiceDelta(0, "", 0, reason)
            else:
                if self.delay_s:  # as long as streaming the same answer would take
                    await asyncio.sleep(self.delay_s * len(words))
                final = ChoiceDelta(0, answer, len(words), reason)
            yield GenerationChunk(
                choices=(final,),
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

    # /v1: a small stand-in for vLLM's OpenAI serving layer ----------------------------

    async def model_info(self) -> EngineModelInfo:
        if self.down:
            raise EngineUnavailableError("engine unavailable: no replica")
        return EngineModelInfo(self.model, self.supports_images, 2048)

    async def models(self) -> dict[str, Any]:
        if self.down:
            raise EngineUnavailableError("engine unavailable: no replica")
        card = {"id": self.model, "object": "model", "owned_by": "vllm", "max_model_len": 2048}
        return {"object": "list", "data": [card]}

    def _fits(self, call: OpenAICall) -> tuple[list[dict[str, Any]], int] | None:
        """The messages that fit ``context_words`` (oldest droppable first), or None."""
        messages = list(call.body["messages"])
        dropped = 0
        while True:
            words = sum(len(str(m.get("content") or "").split()) for m in messages)
            if words <= self.context_words:
                return messages, dropped
            if dropped >= call.droppable_messages:
                return None
            messages.pop(0)
            dropped += 1

    async def openai_items(self, call: OpenAICall) -> AsyncIterator[OpenAIItem]:
        """Answers like :meth:`generate` (one word per chunk), in vLLM's shapes."""
        if self.down:
            raise EngineUnavailableError("engine unavailable: no replica")
        self.calls.append(call)
        body = call.body
        if body.get("model") not in (None, self.model):
            yield _error(404, "NotFoundError", f"The model `{body['model']}` does not exist.")
            return
        if not isinstance(body.get("temperature", 1.0), (int, float)):
            yield _error(400, "Bad Request", "temperature: Input should be a valid number")
            return
        if call.kind == "responses":
            if self.response_delay_s:
                try:
                    await asyncio.sleep(self.response_delay_s)
                except asyncio.CancelledError:
                    self.cancelled += 1
                    raise
            yield _response(call)
            return
        chat = call.kind == "chat"
        if chat:
            fitted = self._fits(call)
            if fitted is None:
                yield _error(400, "BadRequestError", "maximum context length exceeded")
                return
            messages, dropped = fitted
            last = str(messages[-1].get("content") or "")
            text = f"{len(messages) - 1} earlier messages; you said: {last}"
            if last.startswith("say:"):
                text = last.removeprefix("say:")
        else:
            dropped = 0
            text = str(body.get("prompt"))
        words = text.split(" ")[: int(body.get("max_tokens") or 10_000)]
        usage = {
            "prompt_tokens": len(text.split()),
            "completion_tokens": len(words),
            "total_tokens": len(text.split()) + len(words),
        }
        envelope = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{call.request_id}",
            "object": "chat.completion" if chat else "text_completion",
            "created": 1,
            "model": self.model,
        }
        self.running += 1
        try:
            if not body.get("stream"):
                if self.fail_word is not None and self.fail_word in words:
                    yield _error(500, "InternalServerError", "boom")
                    return
                if self.delay_s:
                    await asyncio.sleep(self.delay_s * len(words))
                answer = " ".join(words)
                choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None}
                if chat:
                    choice["message"] = {"role": "assistant", "content": answer}
                else:
                    choice["text"] = answer
                yield OpenAIAnswer(
                    200,
                    {**envelope, "choices": [choice], "usage": usage},
                    dropped_messages=dropped,
                    replica_id="fake-1",
                )
                return
            kind = "chat.completion.chunk" if chat else "text_completion"
            for position, word in enumerate(words):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                if self.fail_word is not None and word == self.fail_word:
                    error = ErrorInfo(message="boom", type="InternalServerError", code=500)
                    yield _sse(ErrorResponse(error=error).model_dump())
                    yield "data: [DONE]\n\n"
                    yield OpenAIStreamEnd(usage=None, message=None, replica_id="fake-1")
                    return
                piece = word if position == 0 else " " + word
                last_word = position == len(words) - 1
                if chat:
                    delta: dict[str, Any] = {"content": piece}
                    if position == 0:
                        delta["role"] = "assistant"
                    part = {"index": 0, "delta": delta, "finish_reason": None}
                else:
                    part = {"index": 0, "text": piece, "finish_reason": None}
                if last_word:
                    part["finish_reason"] = "stop"
                yield _sse({**envelope, "object": kind, "choices": [part]})
            options = body.get("stream_options") or {}
            if options.get("include_usage"):
                yield _sse({**envelope, "object": kind, "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
            message = {"role": "assistant", "content": " ".join(words)}
            yield OpenAIStreamEnd(
                usage=usage,
                message=message if call.collect else None,
                dropped_messages=dropped,
                replica_id="fake-1",
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


def _response(call: OpenAICall) -> OpenAIAnswer:
    """A ``/v1/responses`` answer: it counts the input items it was given (not streamed)."""
    items = call.body["input"]
    text = f"{len(items)} input items"
    output = {
        "type": "message",
        "id": f"msg_{call.request_id}",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }
    usage = {"input_tokens": len(items), "output_tokens": 3, "total_tokens": len(items) + 3}
    body = {
        "id": call.request_id,
        "object": "response",
        "status": "completed",
        "output": [output],
        "usage": usage,
        "previous_response_id": call.body.get("previous_response_id"),
    }
    return OpenAIAnswer(200, body, replica_id="fake-1")


def _error(status: int, kind: str, message: str) -> OpenAIAnswer:
    """An error answer in vLLM's own body (its ``ErrorResponse``), as our engine relays it."""
    body = ErrorResponse(error=ErrorInfo(message=message, type=kind, code=status))
    return OpenAIAnswer(status, body.model_dump())


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


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
