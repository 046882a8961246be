"""What the seed's endpoints do, independent of HTTP and of Ray.

:class:`CloudLLMService` holds the conversation store and an engine client (both
injected), runs generations, and assembles health and status reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from cloudllm_serve.conversations.store import ConversationStore, StoredMessage
from cloudllm_serve.engine.protocol import (
    EngineClient,
    EngineStats,
    GenerationChunk,
    GenerationRequest,
)
from cloudllm_serve.errors import (
    CloudLLMError,
    EngineUnavailableError,
    InvalidRequestError,
    PromptTooLongError,
)
from cloudllm_serve.ingress.response_json import extract_json
from cloudllm_serve.ingress.schemas import (
    GenerateRequest,
    GenerationResponse,
    HealthResponse,
    ModelInfo,
    Timings,
    VllmStats,
)
from cloudllm_serve.settings import Settings


@dataclass
class IngressCounters:
    """Request counters of this ingress replica, for ``/status/detailed``."""

    requests_total: int = 0
    requests_failed: int = 0
    in_flight: int = 0
    tokens_generated: int = 0
    generation_ms_total: float = 0.0
    errors_by_status: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineResult:
    """A whole generation, gathered from the engine's chunks."""

    text: str
    final: GenerationChunk


_ERROR_KINDS: dict[str, type[CloudLLMError]] = {
    "prompt_too_long": PromptTooLongError,
    "invalid_request": InvalidRequestError,
    "engine_failure": EngineUnavailableError,
}


class CloudLLMService:
    """The seed API's logic over a :class:`ConversationStore` and an ``EngineClient``."""

    def __init__(self, settings: Settings, store: ConversationStore, engine: EngineClient) -> None:
        self.settings = settings
        self.store = store
        self.engine = engine
        self.counters = IngressCounters()
        self._started_at = time.monotonic()

    @property
    def uptime_s(self) -> float:
        """Seconds since this service started."""
        return time.monotonic() - self._started_at

    async def run_generation(self, request: GenerationRequest) -> EngineResult:
        """Drive one engine generation to its end; engine errors become project errors."""
        parts: list[str] = []
        async for chunk in self.engine.generate(request):
            if chunk.error is not None:
                error_class = _ERROR_KINDS.get(chunk.error.kind, EngineUnavailableError)
                param = "message" if chunk.error.kind == "prompt_too_long" else None
                raise error_class(chunk.error.message, param=param)
            parts.append(chunk.text)
            if chunk.finished:
                return EngineResult("".join(parts), chunk)
        raise EngineUnavailableError("engine stream ended without a final chunk")

    async def generate(self, body: GenerateRequest, received_at: float) -> GenerationResponse:
        """``POST /generate``: one turn of a (new or stored) conversation."""
        started = time.perf_counter()
        max_tokens = min(body.max_tokens, self.settings.MAX_TOKENS_CAP)
        temperature = float(body.temperature)
        user_message = StoredMessage("user", body.message, time.time())
        created = body.conversation_id is None
        if body.conversation_id is None:
            conversation_id = await self.store.create()
            history: list[StoredMessage] = []
        else:
            conversation_id = body.conversation_id
            history = await self.store.messages(conversation_id)

        request = GenerationRequest(
            request_id=uuid.uuid4().hex,
            messages=[{"role": m.role, "content": m.content} for m in (*history, user_message)],
            max_tokens=max_tokens,
            temperature=temperature,
            stream=False,
        )
        self.counters.in_flight += 1
        try:
            result = await self.run_generation(request)
            await self.store.append(
                conversation_id,
                [user_message, StoredMessage("assistant", result.text, time.time())],
            )
        except BaseException:
            if created:
                await asyncio.shield(self._forget(conversation_id))
            raise
        finally:
            self.counters.in_flight -= 1
        finished = time.perf_counter()

        parse_started = time.perf_counter()
        parsed = extract_json(result.text)
        json_parse_ms = (time.perf_counter() - parse_started) * 1000

        final = result.final
        metrics = final.metrics
        generation_ms = metrics.generation_ms if metrics else (finished - started) * 1000
        tokens = final.tokens_generated
        self.counters.tokens_generated += tokens
        self.counters.generation_ms_total += generation_ms
        timings = Timings(
            generation_ms=round(generation_ms, 3),
            total_ms=round((finished - started) * 1000, 3),
            tokens_generated=tokens,
            tokens_per_second=round(tokens / (generation_ms / 1000), 3)
            if generation_ms > 0
            else 0.0,
            endpoint_total_ms=round((time.perf_counter() - received_at) * 1000, 3),
            json_parse_ms=round(json_parse_ms, 3),
            ttft_ms=round(metrics.ttft_ms, 3) if metrics else None,
            queue_ms=round(metrics.queue_ms, 3) if metrics else None,
            prompt_tokens=final.prompt_tokens,
        )
        return GenerationResponse(
            response=result.text,
            conversation_id=conversation_id,
            generation_time=round(generation_ms / 1000, 6),
            model_info=ModelInfo(
                model_name=self.settings.model_name,
                max_tokens=max_tokens,
                temperature=temperature,
                timings=timings,
            ),
            response_json=parsed,
            response_is_json=parsed is not None,
            finish_reason=final.finish_reason,
            dropped_history_messages=final.dropped_messages,
        )

    async def _forget(self, conversation_id: str) -> None:
        """Remove a conversation this request created and could not complete."""
        # Redis is down or the conversation is gone already: nothing more to do.
        with contextlib.suppress(CloudLLMError):
            await self.store.delete(conversation_id)

    async def health(self) -> tuple[int, HealthResponse]:
        """``GET /health``: 200 when the model is loaded and Redis answers, else 503."""
        stats_result, count_result = await asyncio.gather(
            self.engine.stats(), self.store.count(), return_exceptions=True
        )
        problems = []
        stats: list[EngineStats] = []
        if isinstance(stats_result, BaseException):
            problems.append(f"engine: {_message(stats_result)}")
        else:
            stats = stats_result
        conversations: int | None = None
        if isinstance(count_result, BaseException):
            problems.append(f"redis: {_message(count_result)}")
        else:
            conversations = count_result
        model_loaded = bool(stats) and all(s.engine_status == "running" for s in stats)
        if stats and not model_loaded:
            problems.append("engine: a replica reports engine_status errored")
        gpus = [gpu for s in stats for gpu in s.gpus]
        body = HealthResponse(
            status="healthy"
            if not problems
            else "unhealthy: " + "; ".join(p.split(":")[0] + " unavailable" for p in problems),
            model_loaded=model_loaded,
            model_name=self.settings.model_name,
            gpu_memory_used=round(sum(g.memory_used_gb for g in gpus), 3) if gpus else None,
            gpu_memory_total=round(sum(g.memory_total_gb for g in gpus), 3) if gpus else None,
            vllm_stats=_sum_engine_stats(stats),
            active_conversations=conversations,
            uptime=round(self.uptime_s, 3),
            redis_ok=conversations is not None,
            problems=problems,
        )
        return (200 if not problems else 503), body

    async def detailed_status(self) -> dict[str, Any]:
        """``GET /status/detailed``: engine, GPU, batching, store and ingress metrics."""
        stats_result, ping_result, count_result = await asyncio.gather(
            self.engine.stats(), self.store.ping(), self.store.count(), return_exceptions=True
        )
        settings = self.settings
        counters = self.counters
        engines: list[dict[str, Any]] = []
        engine_error = None
        if isinstance(stats_result, BaseException):
            engine_error = _message(stats_result)
        else:
            for replica in stats_result:
                item = asdict(replica)
                item["batch_utilization"] = round(
                    replica.running_requests / max(replica.max_num_seqs, 1), 4
                )
                engines.append(item)
        redis_ok = not isinstance(ping_result, BaseException)
        return {
            "model_name": settings.model_name,
            "engine_type": "vLLM",
            "uptime": round(self.uptime_s, 3),
            "engine": {
                "summary": _sum_engine_stats(
                    [] if isinstance(stats_result, BaseException) else stats_result
                ).model_dump(),
                "replicas": engines,
                "error": engine_error,
            },
            "gpu": [gpu for replica in engines for gpu in replica.get("gpus", [])],
            "config": {
                "model": settings.LLM_MODEL,
                "device": settings.ENGINE_DEVICE,
                "max_model_len": settings.VLLM_MAX_MODEL_LEN,
                "max_num_seqs": settings.VLLM_MAX_NUM_SEQS,
                "block_size": settings.VLLM_BLOCK_SIZE,
                "gpu_memory_utilization": settings.VLLM_GPU_MEMORY_UTILIZATION,
                "tensor_parallel_size": settings.VLLM_TENSOR_PARALLEL_SIZE,
                "max_tokens_cap": settings.MAX_TOKENS_CAP,
                "max_upload_bytes": settings.MAX_UPLOAD_BYTES,
                "max_image_side": settings.MAX_IMAGE_SIDE,
            },
            "redis": {
                "ok": redis_ok,
                "latency_ms": round(ping_result, 3) if isinstance(ping_result, float) else None,
                "conversations": count_result if isinstance(count_result, int) else None,
                "error": _message(ping_result) if isinstance(ping_result, BaseException) else None,
            },
            "ingress": {
                "requests_total": counters.requests_total,
                "requests_failed": counters.requests_failed,
                "requests_in_flight": counters.in_flight,
                "tokens_generated": counters.tokens_generated,
                "mean_tokens_per_second": round(
                    counters.tokens_generated / (counters.generation_ms_total / 1000), 3
                )
                if counters.generation_ms_total
                else None,
                "errors_by_status": {
                    str(k): v for k, v in sorted(counters.errors_by_status.items())
                },
            },
        }


def _message(error: BaseException) -> str:
    return error.message if isinstance(error, CloudLLMError) else f"{type(error).__name__}: {error}"


def _sum_engine_stats(stats: list[EngineStats]) -> VllmStats:
    if not stats:
        return VllmStats(engine_status="unavailable", pending_requests=0, running_requests=0)
    return VllmStats(
        engine_status="running" if all(s.engine_status == "running" for s in stats) else "errored",
        pending_requests=sum(s.pending_requests for s in stats),
        running_requests=sum(s.running_requests for s in stats),
        kv_cache_usage=round(sum(s.kv_cache_usage for s in stats) / len(stats), 4),
        replicas=len(stats),
    )
