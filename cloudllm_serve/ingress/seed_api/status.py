"""``/health`` and ``/status/detailed``: what the engines and Redis report right now.

``/health`` is public: its answer is computed at most once a second per ingress replica
(callers in that second share it, and concurrent callers share one check), and its
problems are summaries of our own ("redis unavailable", "no engine replica running"),
never an address, a host, a port or an exception's text. ``/status/detailed`` (an admin
key when keys are on) keeps the detail.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from cloudllm_serve.engine.protocol import EngineFleet, EngineStats, ReplicaStatus
from cloudllm_serve.errors import CloudLLMError
from cloudllm_serve.ingress.seed_api.schemas import HealthResponse, VllmStats
from cloudllm_serve.ingress.service import CloudLLMService
from cloudllm_serve.metrics import Metric
from cloudllm_serve.placement import max_ongoing_requests
from cloudllm_serve.settings import Settings

#: How long one ingress replica reuses a ``/health`` answer (a public route that load
#: balancers poll must not reach every engine replica and Redis on each call).
HEALTH_CACHE_S = 1.0


class HealthCheck:
    """``GET /health``'s answer for one ingress replica, reused for ``ttl_s``.

    Callers while a check runs await that check (one engine and one Redis call however
    many callers); a caller that goes away does not cancel it for the others.
    """

    def __init__(
        self,
        service: CloudLLMService,
        *,
        ttl_s: float = HEALTH_CACHE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._service = service
        self._ttl_s = ttl_s
        self._clock = clock
        self._answer: tuple[int, HealthResponse] | None = None
        self._answered_at = 0.0
        self._running: asyncio.Task[tuple[int, HealthResponse]] | None = None

    async def answer(self) -> tuple[int, HealthResponse]:
        """The status code and body; ``uptime`` is as of now, the rest at most ``ttl_s`` old."""
        if self._answer is None or self._clock() - self._answered_at >= self._ttl_s:
            if self._running is None:
                self._running = asyncio.create_task(self._check())
            await asyncio.shield(self._running)
        assert self._answer is not None
        code, body = self._answer
        return code, body.model_copy(update={"uptime": round(self._service.uptime_s, 3)})

    async def _check(self) -> tuple[int, HealthResponse]:
        try:
            answer = await health(self._service)
            self._answer, self._answered_at = answer, self._clock()
            return answer
        finally:
            self._running = None


async def health(service: CloudLLMService) -> tuple[int, HealthResponse]:
    """``GET /health`` computed now: 200 when the model is loaded and Redis answers, else 503.

    Pending and running requests are summed over every running engine replica.
    """
    # With keys on, how many conversations all tenants hold is not for anyone to see.
    redis_check = service.store.ping() if service.registry.enabled else service.store.count()
    fleet_result, count_result = await asyncio.gather(
        service.engine.fleet(), redis_check, return_exceptions=True
    )
    problems = []
    stats: list[EngineStats] = []
    if isinstance(fleet_result, BaseException):
        problems.append("engine: engine replicas unavailable")
    else:
        stats = fleet_result.running_stats
        if not stats:
            problems.append(f"engine: {_no_replica_summary(fleet_result)}")
    conversations: int | None = None
    redis_ok = not isinstance(count_result, BaseException)
    if isinstance(count_result, BaseException):
        problems.append("redis: redis unavailable")
    elif not service.registry.enabled:
        conversations = int(count_result)
    model_loaded = bool(stats) and all(s.engine_status == "running" for s in stats)
    if stats and not model_loaded:
        problems.append("engine: a replica reports engine_status errored")
    gpus = [gpu for s in stats for gpu in s.gpus]
    body = HealthResponse(
        status="healthy"
        if not problems
        else "unhealthy: " + "; ".join(p.split(":")[0] + " unavailable" for p in problems),
        model_loaded=model_loaded,
        model_name=service.settings.model_name,
        engine_type=service.settings.engine_type,
        gpu_memory_used=round(sum(g.memory_used_gb for g in gpus), 3) if gpus else None,
        gpu_memory_total=round(sum(g.memory_total_gb for g in gpus), 3) if gpus else None,
        vllm_stats=_sum_engine_stats(stats),
        active_conversations=conversations,
        uptime=round(service.uptime_s, 3),
        redis_ok=redis_ok,
        problems=problems,
        lost_nodes=[]
        if isinstance(fleet_result, BaseException)
        else [node.public_name for node in fleet_result.lost_nodes],
    )
    return (200 if not problems else 503), body


def _no_replica_summary(fleet: EngineFleet) -> str:
    """Why no replica runs, for anyone: Serve's state words and our capacity check only.

    Serve's messages and replicas' errors (exception text, node addresses) are left to
    ``/status/detailed``.
    """
    summary = f"no engine replica running (deployment {fleet.status})"
    if fleet.lost_nodes:
        summary += "; node lost: " + ", ".join(node.public_name for node in fleet.lost_nodes)
    if fleet.capacity_problem:
        summary += f"; {fleet.capacity_problem}"
    return summary


def _no_replica_problem(fleet: EngineFleet) -> str:
    states = ", ".join(f"{r.replica_id} {r.state}" for r in fleet.replicas) or "none"
    parts = [f"no engine replica is running (deployment {fleet.status}; replicas: {states})"]
    if fleet.lost_nodes:
        lost = ", ".join(f"{node.name} ({node.node_id})" for node in fleet.lost_nodes)
        parts.append(f"node lost: {lost}")
    if fleet.capacity_problem:
        parts.append(fleet.capacity_problem)
    if fleet.message:
        parts.append(fleet.message.splitlines()[0][:500])
    errors = [r.error for r in fleet.replicas if r.error]
    parts.extend(errors[:1])
    return "; ".join(parts)


def _requests_by_status(requests: Metric) -> dict[int, int]:
    """This replica's answered requests by status, from its request counter."""
    status_at = requests.tag_keys.index("status")
    counts: dict[int, int] = {}
    for key, value in requests.totals.items():
        status = int(key[status_at])
        counts[status] = counts.get(status, 0) + int(value)
    return counts


async def detailed_status(service: CloudLLMService) -> dict[str, Any]:
    """``GET /status/detailed``: engine replicas, GPU, batching, store and ingress metrics."""
    fleet_result, ping_result, count_result = await asyncio.gather(
        service.engine.fleet(), service.store.ping(), service.store.count(), return_exceptions=True
    )
    settings = service.settings
    by_status = _requests_by_status(service.metrics.requests)
    tokens_generated = int(service.metrics.tokens.total(kind="completion"))
    fleet = None if isinstance(fleet_result, BaseException) else fleet_result
    engine_error = _message(fleet_result) if isinstance(fleet_result, BaseException) else None
    if fleet is not None and not fleet.running_stats:
        engine_error = _no_replica_problem(fleet)
    replicas = [_replica_view(r) for r in fleet.replicas] if fleet else []
    redis_ok = not isinstance(ping_result, BaseException)
    return {
        "model_name": settings.model_name,
        "engine_type": settings.engine_type,
        "uptime": round(service.uptime_s, 3),
        "engine": {
            "summary": _sum_engine_stats(fleet.running_stats if fleet else []).model_dump(),
            "deployment": {
                "status": fleet.status if fleet else None,
                "message": fleet.message if fleet else None,
                "target_replicas": fleet.target_replicas if fleet else None,
                "running_replicas": len(fleet.running_stats) if fleet else 0,
                "status_trigger": fleet.status_trigger if fleet else None,
                "capacity_problem": fleet.capacity_problem if fleet else None,
            },
            "replicas": replicas,
            # Ray nodes lost (dead, not stopped on purpose, none of that name back).
            "lost_nodes": [asdict(node) for node in fleet.lost_nodes] if fleet else [],
            "error": engine_error,
        },
        "gpu": [
            gpu for replica in replicas for gpu in (replica.get("stats") or {}).get("gpus", [])
        ],
        "scaling": {
            "min_replicas": settings.ENGINE_MIN_REPLICAS,
            "max_replicas": settings.ENGINE_MAX_REPLICAS,
            "target_ongoing_requests": settings.VLLM_MAX_NUM_SEQS,
            "max_ongoing_requests": max_ongoing_requests(settings),
            "max_queued_requests_per_ingress": settings.ENGINE_MAX_QUEUED_REQUESTS,
            "upscale_delay_s": settings.ENGINE_UPSCALE_DELAY_S,
            "downscale_delay_s": settings.ENGINE_DOWNSCALE_DELAY_S,
            "routing_affinity": settings.ROUTING_AFFINITY,
            "request_timeout_s": settings.REQUEST_TIMEOUT_S,
            "ingress_replicas": settings.INGRESS_REPLICAS,
        },
        # Deadline-aware admission on this ingress replica (ingress/admission.py).
        "admission": service.admission.view(),
        "config": {
            "model": settings.engine_model,
            "device": settings.ENGINE_DEVICE,
            "max_model_len": settings.VLLM_MAX_MODEL_LEN,
            "max_num_seqs": settings.VLLM_MAX_NUM_SEQS,
            "block_size": settings.VLLM_BLOCK_SIZE,
            "gpu_memory_utilization": settings.VLLM_GPU_MEMORY_UTILIZATION,
            "tensor_parallel_size": settings.VLLM_TENSOR_PARALLEL_SIZE,
            "max_tokens_cap": settings.MAX_TOKENS_CAP,
            "max_upload_bytes": settings.MAX_UPLOAD_BYTES,
            "max_image_side": settings.MAX_IMAGE_SIDE,
            "stream_batch_interval_ms": settings.STREAM_BATCH_INTERVAL_MS,
            "stream_batch_max_items": settings.STREAM_BATCH_MAX_ITEMS,
        },
        # The simulated engine's time model (null with vLLM): these answers come from no model.
        "simulation": _simulation(settings),
        "redis": {
            "ok": redis_ok,
            "latency_ms": round(ping_result, 3) if isinstance(ping_result, float) else None,
            "conversations": count_result if isinstance(count_result, int) else None,
            "round_trips": service.store.round_trips,
            "time_ms_total": round(service.store.busy_s * 1000, 3),
            "error": _message(ping_result) if isinstance(ping_result, BaseException) else None,
        },
        "ingress": {
            "replica_id": service.replica_id or None,
            "requests_total": sum(by_status.values()),
            "requests_failed": sum(n for status, n in by_status.items() if status >= 400),
            "requests_in_flight": service.in_flight,
            "tokens_generated": tokens_generated,
            "mean_tokens_per_second": round(
                tokens_generated / (service.generation_ms_total / 1000), 3
            )
            if service.generation_ms_total
            else None,
            "errors_by_status": {
                str(status): n for status, n in sorted(by_status.items()) if status >= 400
            },
            "rate_limited": dict(sorted(service.limiter.refused.items())),
            "rate_limit_fallback_decisions": service.limiter.fallback_decisions,
            "rate_limit_round_trips": service.limiter.round_trips,
        },
        "security": {
            "auth": service.registry.enabled,
            "tenants": len(service.registry.tenants),
            "key_file_loads": service.registry.loads,
            "key_file_error": service.registry.reload_error,
            "conversation_ttl_s": settings.CONVERSATION_TTL_S,
        },
    }


def _replica_view(replica: ReplicaStatus) -> dict[str, Any]:
    view = asdict(replica)
    if replica.stats is not None:
        view["stats"]["batch_utilization"] = round(
            replica.stats.running_requests / max(replica.stats.max_num_seqs, 1), 4
        )
    return view


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


def _simulation(settings: Settings) -> dict[str, Any] | None:
    """The ``SIM_*`` settings when the engine is simulated, else ``None``."""
    if not settings.simulated:
        return None
    return {
        name.removeprefix("SIM_").lower(): getattr(settings, name)
        for name in Settings.model_fields
        if name.startswith("SIM_")
    }
