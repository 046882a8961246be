"""The contract between the ingress and an engine.

An engine takes a :class:`GenerationRequest` (chat messages, oldest first, the new
user message last) and yields :class:`GenerationChunk` values:

* streaming (``request.stream``): one chunk per text delta as the engine makes it,
  then a last chunk with ``finished=True`` and the metrics;
* not streaming: a single chunk with the whole text, ``finished=True`` and the metrics.

Errors travel as values: a chunk whose ``error`` is set ends the stream, and nothing
else in it is meaningful. Every value here is a plain dataclass so it crosses Ray
cheaply and needs neither vLLM nor FastAPI to import.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

ChatMessage = dict[str, str]
EngineErrorKind = Literal["prompt_too_long", "invalid_request", "engine_failure"]


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: the conversation so far plus the new user message."""

    request_id: str
    messages: list[ChatMessage]
    max_tokens: int
    temperature: float
    stream: bool = True


@dataclass(frozen=True)
class GenerationMetrics:
    """Timings measured inside the engine replica, in milliseconds."""

    queue_ms: float
    ttft_ms: float
    generation_ms: float


@dataclass(frozen=True)
class EngineError:
    """Why a generation failed; ``kind`` decides the HTTP status in the ingress."""

    kind: EngineErrorKind
    message: str


@dataclass(frozen=True)
class GenerationChunk:
    """A piece of a generation; see the module docstring for the sequence."""

    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    tokens_generated: int = 0
    prompt_tokens: int = 0
    dropped_messages: int = 0
    metrics: GenerationMetrics | None = None
    error: EngineError | None = None


@dataclass(frozen=True)
class GpuReading:
    """One GPU as NVML sees it; memory in GiB."""

    index: int
    name: str
    memory_used_gb: float
    memory_total_gb: float
    utilization_percent: float | None


@dataclass(frozen=True)
class EngineStats:
    """A live snapshot of one engine replica."""

    engine_status: Literal["running", "errored"]
    model_name: str
    running_requests: int
    pending_requests: int
    kv_cache_usage: float
    prefix_cache_hit_rate: float | None
    requests_finished: int
    tokens_generated: int
    max_model_len: int
    max_num_seqs: int
    block_size: int
    tensor_parallel_size: int
    gpu_memory_utilization: float
    device: str
    uptime_s: float
    gpus: list[GpuReading] = field(default_factory=list)


class EngineClient(Protocol):
    """What the ingress needs from the engine tier (a deployment handle or a local engine)."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Run one generation; yields chunks as described in the module docstring."""
        ...

    async def stats(self) -> list[EngineStats]:
        """Stats of the engine replicas this client can see."""
        ...
