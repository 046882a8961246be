"""The contract between the ingress and an engine.

An engine takes a :class:`GenerationRequest` (chat messages, oldest first, the new
user message last) and yields :class:`GenerationChunk` values:

* streaming (``request.stream``): one chunk per engine step as soon as the engine
  makes it, each with the new text of the choices that advanced; the last one has
  ``finished=True`` and the metrics;
* not streaming: a single chunk with each choice's whole text, ``finished=True`` and
  the metrics.

Errors travel as values: a chunk whose ``error`` is set ends the stream, and nothing
else in it is meaningful.

A *resumable* request (``resumable``, set by the ingress) also reports the token ids it
generated, out of band of the text: ``ChoiceDelta.token_ids`` on ``/generate``, an
:class:`OpenAIProgress` item on ``/v1``; a non-streamed one sends its progress every
:data:`PROGRESS_INTERVAL_S` as well. When its engine dies midway, the ingress sends it
again with ``resume_token_ids`` (what its client got): the engine renders the prompt as
before, appends those ids and generates the rest, a continuation
(:mod:`cloudllm_serve.engine.resume`).

Across the deployment handle a stream travels in batches: lists of these items, in
order, each list one handle item (:mod:`cloudllm_serve.engine.stream_batching`), which
the ingress writes to its client as one HTTP chunk. Every value here is a plain
dataclass so it crosses Ray cheaply and needs neither vLLM nor FastAPI to import.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from cloudllm_serve.cluster_nodes import ClusterNode

#: An OpenAI-style chat message: ``role``, ``content`` (a string, or a list of parts such
#: as ``{"type": "image_url", "image_url": {"url": "data:..."}}``), maybe tool fields.
ChatMessage = dict[str, Any]
EngineErrorKind = Literal["prompt_too_long", "invalid_request", "engine_failure"]
#: How often a resumable request that is not streamed reports its progress (seconds):
#: an engine crash costs it at most the tokens of this interval, generated again.
PROGRESS_INTERVAL_S = 1.0


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample; the ingress has validated ranges and clamped ``max_tokens``."""

    max_tokens: int
    temperature: float = 1.0
    json_schema: dict[str, Any] | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """One generation of chat ``messages``.

    ``messages`` are rendered with the chat template and fitted to the context by
    dropping the oldest turns.
    """

    request_id: str
    sampling: SamplingOptions
    messages: list[ChatMessage] | None = None
    stream: bool = True
    #: Requests with the same key go to the same engine replica while it has room
    #: (:mod:`cloudllm_serve.engine.routing`): the conversation id, or a hash of the
    #: conversation's opening for stateless chat.
    affinity_key: str | None = None
    #: The engine replica that answered this conversation's previous turn, if known.
    preferred_replica: str | None = None
    #: Engine replicas whose engine died under an earlier try of this request: the
    #: router passes over them while another replica is there.
    avoid_replicas: tuple[str, ...] = ()
    #: vLLM's prefix-cache salt: the tenant's (:mod:`cloudllm_serve.ingress.cache_salt`),
    #: so one tenant's prompts are never a cache hit for another's.
    cache_salt: str | None = None
    #: Report the token ids generated (``ChoiceDelta.token_ids``) so that the request can
    #: continue on another replica if this one's engine dies (see the module docstring).
    resumable: bool = False
    #: A continuation: the token ids the client already got, generated after the prompt.
    resume_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class OpenAICall:
    """One ``/v1`` chat or text completion, or a response, for vLLM's own OpenAI serving layer.

    ``body`` is the client's JSON (our own fields removed, a stored conversation's
    history put in front of ``messages``, ``cache_salt`` the tenant's); vLLM's request
    model validates it in the engine replica. The first ``droppable_messages`` messages
    are stored history the engine may leave out, oldest turn first, when the whole does
    not fit the context.
    """

    #: ``responses``: ``/v1/responses`` (the ingress keeps responses; vLLM's store is off).
    kind: Literal["chat", "completion", "responses"]
    body: dict[str, Any]
    request_id: str
    droppable_messages: int = 0
    #: Gather the assistant's message of a stream into its :class:`OpenAIStreamEnd`.
    collect: bool = False
    #: As on :class:`GenerationRequest` (read by the router).
    affinity_key: str | None = None
    preferred_replica: str | None = None
    avoid_replicas: tuple[str, ...] = ()
    #: As on :class:`GenerationRequest`: report progress (:class:`OpenAIProgress`), and
    #: the token ids a continuation follows.
    resumable: bool = False
    resume_token_ids: tuple[int, ...] = ()
    #: A continued stream: the first stream's ``created``, which its chunks keep.
    resume_created: int | None = None


@dataclass(frozen=True)
class OpenAIAnswer:
    """A whole ``/v1`` answer from the engine: a response body or vLLM's error body."""

    status: int
    body: dict[str, Any]
    dropped_messages: int = 0
    replica_id: str = ""


@dataclass(frozen=True)
class OpenAIStreamEnd:
    """Sent after a ``/v1`` stream's last SSE string (never forwarded to the client).

    ``usage`` is vLLM's usage of the whole stream; ``message`` the first choice's
    assistant message (``content``, ``tool_calls``) when the call asked to ``collect``.
    """

    usage: dict[str, Any] | None
    message: dict[str, Any] | None = None
    dropped_messages: int = 0
    replica_id: str = ""


@dataclass(frozen=True)
class OpenAIProgress:
    """Tokens a resumable ``/v1`` call generated (never forwarded to the client).

    In a stream it comes right before the SSE string that holds ``text`` (the tokens'
    text, as vLLM detokenized them), so the ids count as sent once that string is; a
    call that is not streamed sends one every :data:`PROGRESS_INTERVAL_S`.
    """

    token_ids: Sequence[int]
    text: str


#: What the ingress's engine client yields for a ``/v1`` call (progress taken out).
OpenAIItem = str | OpenAIAnswer | OpenAIStreamEnd
#: What an engine replica's ``openai`` method yields: those, and a resumable call's progress.
OpenAIReplicaItem = OpenAIItem | OpenAIProgress


@dataclass(frozen=True)
class EngineModelInfo:
    """What the served model can take (asked once per ingress replica)."""

    model_name: str
    #: Whether the model takes images (a vision-language model).
    supports_images: bool
    max_model_len: int


@dataclass(frozen=True)
class GenerationMetrics:
    """Timings measured inside the engine replica, in milliseconds."""

    queue_ms: float
    ttft_ms: float
    generation_ms: float
    #: The engine replica that ran the generation (Serve's replica id).
    replica_id: str = ""


class EngineDeadError(RuntimeError):
    """An engine replica's vLLM engine is dead: this request cannot go on there.

    Raised by the replica instead of an error chunk, before or after items were sent,
    so the ingress can try the request on another replica (``replica_id`` goes into its
    ``avoid_replicas``), or continue it there if it is resumable. Serve's health check
    replaces the replica.
    """

    def __init__(self, replica_id: str, message: str) -> None:
        super().__init__(f"the engine of replica {replica_id or '?'} is dead: {message}")
        self.replica_id = replica_id
        self.reason = message

    def __reduce__(self) -> tuple[Any, ...]:
        # Crosses Ray: rebuilt from both fields, not from ``args`` (one string).
        return (type(self), (self.replica_id, self.reason))


@dataclass(frozen=True)
class EngineError:
    """Why a generation failed; ``kind`` decides the HTTP status in the ingress."""

    kind: EngineErrorKind
    message: str


@dataclass(frozen=True)
class ChoiceDelta:
    """New output of one choice (``index`` < ``n``): text and how many tokens it holds.

    ``token_ids``: the tokens themselves, for a resumable request only.
    """

    index: int
    text: str
    token_count: int
    finish_reason: str | None = None
    token_ids: Sequence[int] = ()


@dataclass(frozen=True)
class GenerationChunk:
    """A piece of a generation; see the module docstring for the sequence.

    ``prompt_tokens`` and ``dropped_messages`` are set on every chunk; ``metrics`` on
    the last one only.
    """

    choices: tuple[ChoiceDelta, ...] = ()
    finished: bool = False
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
    replica_id: str = ""
    #: Prompt tokens looked up in vLLM's prefix cache, and how many were found there.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EngineStats:
        """Rebuild from :func:`dataclasses.asdict` output (how replicas report it)."""
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        known["gpus"] = [GpuReading(**gpu) for gpu in known.get("gpus", [])]
        return cls(**known)


@dataclass(frozen=True)
class ReplicaStatus:
    """One engine replica as Serve's controller and the replica itself report it."""

    replica_id: str
    state: str
    node_ip: str | None = None
    pid: int | None = None
    started_at: float | None = None
    stats: EngineStats | None = None
    error: str | None = None
    #: Ray's node id and the node's name (nodes of one machine share ``node_ip``).
    node_id: str | None = None
    node_name: str | None = None


@dataclass(frozen=True)
class EngineFleet:
    """The engine deployment: its status, its replicas and their live stats.

    ``status``, ``status_trigger`` and ``message`` are Serve's (``HEALTHY``, ``UPSCALING``...);
    ``capacity_problem`` says why replicas cannot be placed (too few GPUs), if so.
    """

    status: str
    message: str = ""
    target_replicas: int | None = None
    replicas: list[ReplicaStatus] = field(default_factory=list)
    capacity_problem: str | None = None
    #: What last changed the status (``AUTOSCALING``, ``CONFIG_UPDATE_STARTED``, ...).
    status_trigger: str = ""
    #: Nodes Ray lost (dead, not stopped on purpose, no live node of the same name).
    lost_nodes: list[ClusterNode] = field(default_factory=list)

    @property
    def running_stats(self) -> list[EngineStats]:
        """Stats of the replicas that are running and answered."""
        return [r.stats for r in self.replicas if r.state == "RUNNING" and r.stats is not None]


class EngineClient(Protocol):
    """What the ingress needs from the engine tier (a deployment handle or a local engine)."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[list[GenerationChunk]]:
        """Run one generation; yields batches of the chunks the module docstring describes."""
        ...

    def openai(self, call: OpenAICall) -> AsyncIterator[list[OpenAIItem]]:
        """Run one ``/v1`` call: an :class:`OpenAIAnswer`, or SSE strings then an end (batched)."""
        ...

    async def models(self) -> dict[str, Any]:
        """``GET /v1/models`` as vLLM answers it."""
        ...

    async def model_info(self) -> EngineModelInfo:
        """What the served model can take."""
        ...

    async def fleet(self) -> EngineFleet:
        """The engine replicas and their live stats."""
        ...
