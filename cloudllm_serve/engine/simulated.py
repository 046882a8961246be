"""A simulated engine: vLLM's ``AsyncLLM`` with its engine core replaced by a step loop.

``LLM_MODEL=sim`` serves this instead of a model. Everything above the engine core is
vLLM's own code running for real: the renderer and tokenizer (the default model's, which
``make model`` prepares offline), the input processor, the output processor that
detokenizes and builds every ``RequestOutput``, the stat loggers, and around them vLLM's
OpenAI serving layer and our ``/generate`` path. What the engine core would compute on a
GPU is simulated by :class:`SimulatedEngineCore`, a thread that runs one step loop:

* continuous batching: at most ``max_num_seqs`` sequences run at once, the rest wait in
  arrival order;
* a sequence's first token comes ``ttft_ms + ttft_ms_per_token x uncached prompt tokens``
  after it is scheduled (a prefix cache of ``block_size`` blocks, so affinity routing
  shows), then one token per decode step of ``step_ms + step_ms_per_seq x batch``;
* ``jitter`` scales each of those times by a normal factor around 1;
* after ``crash_after_tokens`` tokens in all, the core dies as vLLM's does when its
  process is gone: every request gets ``EngineDeadError`` and ``AsyncLLM.errored`` turns
  true (so the engine replica's dead-engine path and Serve's health check run).

The step loop hands each step's outputs to the event loop as vLLM's multiprocess client
does, and waits while more than :data:`STEPS_IN_FLIGHT` of them are not yet taken, so a
serving layer that cannot keep up slows the simulated engine instead of queueing
without bound (what a busy front end does to a real one's streams). The loop thread is
named ``sim-step-loop`` (``/proc/<pid>/task/*/comm``) so that its own CPU can be counted
apart from the serving layer's.

Generated tokens come from a fixed English text, so detokenized answers read as words,
from a place set by the request's ``seed`` (the same seed, the same answer) or else by
its id; answers run to ``max_tokens`` (finish reason ``length``) unless a stop string
ends them. A continuation (``SamplingParams.extra_args`` of
:data:`~cloudllm_serve.engine.resume.RESUMED_TOKENS_ARG`, with the same id or seed)
starts that many tokens further on: it goes on with the text the first try had begun.
Structured output is not simulated (a schema is accepted and ignored).

Imports vLLM: only :mod:`cloudllm_serve.engine.vllm_engine` (and the Ray Serve LLM
adapter of the benchmarks) import this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import random
import threading
import time
import zlib
from collections import OrderedDict, deque
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from vllm.v1.engine import (
    EngineCoreEvent,
    EngineCoreEventType,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    FinishReason,
)
from vllm.v1.engine import async_llm as _async_llm
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.core_client import EngineCoreClient
from vllm.v1.engine.exceptions import EngineDeadError
from vllm.v1.metrics.stats import PrefillStats, PrefixCacheStats, SchedulerStats

from cloudllm_serve.engine.resume import RESUMED_TOKENS_ARG

if TYPE_CHECKING:
    from cloudllm_serve.settings import Settings

logger = logging.getLogger(__name__)

#: The thread name of the step loop (Linux ``comm``, at most 15 bytes).
STEP_LOOP_THREAD = "sim-step-loop"
#: Steps whose outputs the event loop has not taken yet, at most.
STEPS_IN_FLIGHT = 2
#: Tokens a simulated replica's KV cache holds (sizes the prefix cache and kv usage):
#: about what an 8B model in bf16 leaves on an 80 GB GPU.
KV_CACHE_TOKENS = 262_144
#: What answers are made of (tokenized once with the model's tokenizer).
ANSWER_TEXT = (
    "The quick brown fox jumps over the lazy dog while the river runs past the old mill. "
    "Every morning the baker opens the shop, lights the oven and sets out fresh bread. "
    "Clouds drift across the valley, and the bells of the small church ring at noon. "
    "Children walk to school along the lane, talking about games, books and the weather. "
)

_PR_SET_NAME = 15
#: The name through which ``AsyncLLM.__init__`` builds its engine-core client.
_CLIENT_NAME = "EngineCoreClient"


@dataclass(frozen=True)
class SimulationConfig:
    """The simulated engine's time model (milliseconds) and limits."""

    ttft_ms: float = 20.0
    ttft_ms_per_token: float = 0.1
    step_ms: float = 12.0
    step_ms_per_seq: float = 0.02
    jitter: float = 0.0
    startup_s: float = 0.0
    crash_after_tokens: int = 0
    max_num_seqs: int = 256
    block_size: int = 16
    kv_cache_tokens: int = KV_CACHE_TOKENS
    seed: int = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> SimulationConfig:
        """The configuration the ``SIM_*`` and engine settings describe."""
        config = cls(
            ttft_ms=settings.SIM_TTFT_MS,
            ttft_ms_per_token=settings.SIM_TTFT_MS_PER_TOKEN,
            step_ms=settings.SIM_STEP_MS,
            step_ms_per_seq=settings.SIM_STEP_MS_PER_SEQ,
            jitter=settings.SIM_JITTER,
            startup_s=settings.SIM_STARTUP_S,
            crash_after_tokens=settings.SIM_CRASH_AFTER_TOKENS,
            max_num_seqs=settings.VLLM_MAX_NUM_SEQS,
            block_size=settings.VLLM_BLOCK_SIZE,
        )
        if settings.SIM_PRESET == "ceiling":
            config = replace(
                config, ttft_ms=0.0, ttft_ms_per_token=0.0, step_ms=0.0, step_ms_per_seq=0.0
            )
        return config

    def ttft_s(self, uncached_tokens: int) -> float:
        """Time from scheduling to the first token, before jitter."""
        return (self.ttft_ms + self.ttft_ms_per_token * uncached_tokens) / 1000

    def step_s(self, batch: int) -> float:
        """One decode step's time at ``batch`` running sequences, before jitter."""
        return (self.step_ms + self.step_ms_per_seq * batch) / 1000


class _Sequence:
    """One request in the simulated core."""

    __slots__ = (
        "cache_salt",
        "events",
        "first_token_due",
        "generated",
        "max_tokens",
        "position",
        "prefill",
        "prompt_tokens",
        "request_id",
    )

    def __init__(self, request: EngineCoreRequest, answer_length: int) -> None:
        self.request_id = request.request_id
        self.prompt_tokens = list(request.prompt_token_ids or ())
        self.cache_salt = request.cache_salt
        params = request.sampling_params
        max_tokens = params.max_tokens if params is not None else None
        self.max_tokens = max(1, max_tokens or 16)
        self.generated = 0
        # Where in the answer text this sequence starts: set by the seed when there is one
        # (the same answer again; choices of n get seed + index), else by the request id.
        seed = params.seed if params is not None else None
        # The id the request was given (vLLM adds a random suffix to its own copy).
        given_id = getattr(request, "external_req_id", None) or request.request_id
        start = seed if seed is not None else zlib.crc32(given_id.encode())
        extra = (params.extra_args if params is not None else None) or {}
        self.position = (start + int(extra.get(RESUMED_TOKENS_ARG, 0))) % answer_length
        self.first_token_due = 0.0
        self.prefill: PrefillStats | None = None
        self.events = [EngineCoreEvent.new_event(EngineCoreEventType.QUEUED)]


class PrefixCache:
    """Which prompt blocks a replica holds (chained block hashes, least recently used out)."""

    def __init__(self, block_size: int, capacity_blocks: int) -> None:
        self._block_size = block_size
        self._capacity = max(1, capacity_blocks)
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def lookup_and_insert(self, tokens: list[int], cache_salt: str | None = None) -> int:
        """How many leading tokens of ``tokens`` were cached; all full blocks are cached after.

        As in vLLM, the first block's hash includes ``cache_salt`` (and every later block's
        hash its parent's), so prompts with different salts share no block.
        """
        cached = 0
        parent = hash(cache_salt) if cache_salt else 0
        hit = True
        for start in range(0, len(tokens) - self._block_size + 1, self._block_size):
            parent = hash((parent, tuple(tokens[start : start + self._block_size])))
            if hit and parent in self._blocks:
                self._blocks.move_to_end(parent)
                cached += self._block_size
                continue
            hit = False
            self._blocks[parent] = None
            if len(self._blocks) > self._capacity:
                self._blocks.popitem(last=False)
        return cached


class _Resources:
    """What ``AsyncLLM`` reads of its client's background resources."""

    engine_dead = False


class SimulatedEngineCore(EngineCoreClient):
    """An engine-core client whose engine is a step loop in a thread of this process."""

    def __init__(self, config: SimulationConfig, answer_tokens: list[int]) -> None:
        self.config = config
        self.resources = _Resources()
        self.engine_ranks_managed = [0]
        self._answer = answer_tokens or [0]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outputs: asyncio.Queue[EngineCoreOutputs | BaseException] | None = None
        self._inbox: deque[tuple[str, Any]] = deque()
        self._wake = threading.Event()
        self._taken = threading.Condition()
        self._in_flight = 0
        self._stopped = False
        self._random = random.Random(config.seed)
        self._prefix = self._empty_prefix_cache()
        self._thread: threading.Thread | None = None
        self.tokens_generated = 0

    def _empty_prefix_cache(self) -> PrefixCache:
        return PrefixCache(
            self.config.block_size, self.config.kv_cache_tokens // self.config.block_size
        )

    # The client interface AsyncLLM uses ----------------------------------------------

    def _start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._outputs = asyncio.Queue()
        self._thread = threading.Thread(target=self._run, name=STEP_LOOP_THREAD, daemon=True)
        self._thread.start()

    async def get_output_async(self) -> EngineCoreOutputs:
        """The next step's outputs (as vLLM's client gives them); raises once dead."""
        self._start()
        assert self._outputs is not None
        outputs = await self._outputs.get()
        with self._taken:
            self._in_flight -= 1
            self._taken.notify()
        if isinstance(outputs, BaseException):
            raise outputs
        return outputs

    async def add_request_async(self, request: EngineCoreRequest) -> None:
        """Queue a request for the step loop."""
        if self.resources.engine_dead:
            raise EngineDeadError()
        self._start()
        self._inbox.append(("add", request))
        self._wake.set()

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        """Drop requests (the client went away, or a stop string ended them)."""
        if request_ids:
            self._inbox.append(("abort", list(request_ids)))
            self._wake.set()

    async def get_supported_tasks_async(self) -> tuple[Any, ...]:
        """What the simulated model can do: generate text."""
        return ("generate",)

    async def reset_prefix_cache_async(
        self, reset_running_requests: bool = False, reset_connector: bool = False
    ) -> bool:
        """Forget every cached block."""
        self._inbox.append(("reset", None))
        self._wake.set()
        return True

    async def reset_mm_cache_async(self) -> None:
        """Nothing is cached for media."""

    async def reset_encoder_cache_async(self) -> None:
        """Nothing is cached for encoders."""

    async def is_sleeping_async(self) -> bool:
        """Never asleep."""
        return False

    def dp_engines_running(self) -> bool:
        """No data parallelism here."""
        return False

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop the step loop."""
        self._stopped = True
        self._wake.set()
        with self._taken:
            self._taken.notify_all()

    # The step loop (its own thread) -------------------------------------------------

    def _run(self) -> None:
        with contextlib.suppress(Exception):  # the name is for /proc only
            libc = ctypes.CDLL(None)
            libc.prctl(_PR_SET_NAME, STEP_LOOP_THREAD.encode(), 0, 0, 0)
        try:
            self._step_loop()
        except Exception as error:  # a bug here must not hang every request
            logger.exception("the simulated engine's step loop failed")
            self._die(error)

    def _jittered(self, seconds: float) -> float:
        if self.config.jitter <= 0 or seconds <= 0:
            return seconds
        return seconds * max(0.0, self._random.gauss(1.0, self.config.jitter))

    def _step_loop(self) -> None:
        config = self.config
        waiting: deque[_Sequence] = deque()
        prefilling: dict[str, _Sequence] = {}
        decoding: dict[str, _Sequence] = {}
        next_step = time.monotonic()
        while not self._stopped:
            self._take_inbox(waiting, prefilling, decoding)
            now = time.monotonic()
            prefix_stats = PrefixCacheStats()
            while waiting and len(prefilling) + len(decoding) < config.max_num_seqs:
                sequence = waiting.popleft()
                cached = self._prefix.lookup_and_insert(sequence.prompt_tokens, sequence.cache_salt)
                prompt = len(sequence.prompt_tokens)
                prefix_stats.requests += 1
                prefix_stats.queries += prompt
                prefix_stats.hits += cached
                sequence.prefill = PrefillStats(
                    num_prompt_tokens=prompt,
                    num_computed_tokens=prompt - cached,
                    num_cached_tokens=cached,
                    num_local_cached_tokens=cached,
                )
                sequence.first_token_due = now + self._jittered(config.ttft_s(prompt - cached))
                prefilling[sequence.request_id] = sequence
                sequence.events.append(
                    EngineCoreEvent.new_event(EngineCoreEventType.SCHEDULED, now)
                )
            if not prefilling and not decoding:
                if not waiting and not self._inbox:
                    self._wake.wait(1.0)
                    self._wake.clear()
                next_step = time.monotonic()
                continue
            # Sleep until the next decode step or the first prefill that completes.
            wake_at = next_step if decoding else float("inf")
            if prefilling:
                wake_at = min(wake_at, min(s.first_token_due for s in prefilling.values()))
            delay = wake_at - time.monotonic()
            if delay > 0 and self._wake.wait(delay):
                self._wake.clear()
                if time.monotonic() < wake_at:
                    continue  # new requests or aborts first
            now = time.monotonic()
            outputs: list[EngineCoreOutput] = []
            if decoding and now >= next_step:
                for sequence in list(decoding.values()):
                    outputs.append(self._next_token(sequence, decoding, first=False))
                next_step = now + self._jittered(config.step_s(len(decoding)))
            for request_id, sequence in list(prefilling.items()):
                if sequence.first_token_due <= now:
                    del prefilling[request_id]
                    decoding[request_id] = sequence
                    outputs.append(self._next_token(sequence, decoding, first=True))
            if next_step <= now:  # the batch was idle: its next step starts now
                next_step = now + self._jittered(config.step_s(len(decoding)))
            if outputs or prefix_stats.requests:
                self._emit(outputs, waiting, prefilling, decoding, prefix_stats)
            if self._crashed():
                return

    def _take_inbox(
        self,
        waiting: deque[_Sequence],
        prefilling: dict[str, _Sequence],
        decoding: dict[str, _Sequence],
    ) -> None:
        """Apply the adds, aborts and resets sent since the last step."""
        while self._inbox:
            kind, value = self._inbox.popleft()
            if kind == "add":
                waiting.append(_Sequence(value, len(self._answer)))
            elif kind == "abort":
                gone = set(value)
                for request_id in gone:
                    prefilling.pop(request_id, None)
                    decoding.pop(request_id, None)
                if any(s.request_id in gone for s in waiting):
                    kept = [s for s in waiting if s.request_id not in gone]
                    waiting.clear()
                    waiting.extend(kept)
            elif kind == "reset":
                self._prefix = self._empty_prefix_cache()

    def _next_token(
        self,
        sequence: _Sequence,
        decoding: dict[str, _Sequence],
        *,
        first: bool,
    ) -> EngineCoreOutput:
        token = self._answer[(sequence.position + sequence.generated) % len(self._answer)]
        sequence.generated += 1
        self.tokens_generated += 1
        finish = None
        if sequence.generated >= sequence.max_tokens:
            finish = FinishReason.LENGTH
            decoding.pop(sequence.request_id, None)
        return EngineCoreOutput(
            request_id=sequence.request_id,
            new_token_ids=[token],
            finish_reason=finish,
            events=sequence.events if first else None,
            prefill_stats=sequence.prefill if first else None,
        )

    def _emit(
        self,
        outputs: list[EngineCoreOutput],
        waiting: deque[_Sequence],
        prefilling: dict[str, _Sequence],
        decoding: dict[str, _Sequence],
        prefix_stats: PrefixCacheStats,
    ) -> None:
        """Hand one step's outputs to the event loop (waiting while it is behind)."""
        held = sum(len(s.prompt_tokens) + s.generated for s in decoding.values())
        stats = SchedulerStats(
            num_running_reqs=len(prefilling) + len(decoding),
            num_waiting_reqs=len(waiting),
            kv_cache_usage=min(1.0, held / self.config.kv_cache_tokens),
            prefix_cache_stats=prefix_stats,
        )
        with self._taken:
            while self._in_flight >= STEPS_IN_FLIGHT and not self._stopped:
                self._taken.wait(0.5)
            self._in_flight += 1
        self._put(EngineCoreOutputs(outputs=outputs, scheduler_stats=stats))

    def _put(self, item: EngineCoreOutputs | BaseException) -> None:
        loop, queue = self._loop, self._outputs
        if loop is None or queue is None:
            return
        with contextlib.suppress(RuntimeError):  # the event loop is closed
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def _crashed(self) -> bool:
        limit = self.config.crash_after_tokens
        if limit <= 0 or self.tokens_generated < limit:
            return False
        logger.error(
            "simulated engine crash after %d tokens (SIM_CRASH_AFTER_TOKENS)", self.tokens_generated
        )
        self._die(None)
        return True

    def _die(self, cause: BaseException | None) -> None:
        """Die as vLLM's engine core does: the client marked dead, every request failed."""
        self.resources.engine_dead = True
        self._stopped = True
        with self._taken:
            self._in_flight += 1
        self._put(EngineDeadError())


def answer_tokens(tokenizer: Any) -> list[int]:
    """The token ids answers are made of: :data:`ANSWER_TEXT` without special tokens."""
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    ids = tokenizer.encode(ANSWER_TEXT, add_special_tokens=False)
    return [token for token in ids if token not in special]


class SimulatedAsyncLLM(AsyncLLM):
    """vLLM's ``AsyncLLM`` over a :class:`SimulatedEngineCore` (no weights, no compute).

    Takes ``AsyncLLM``'s arguments (so Ray Serve LLM's engine can build it in place of
    ``AsyncLLM``) plus ``simulation``; without it the ``SIM_*`` settings are read from
    the environment.
    """

    def __init__(self, *args: Any, simulation: SimulationConfig | None = None, **kwargs: Any):
        if simulation is None:
            from cloudllm_serve.settings import load_settings

            simulation = SimulationConfig.from_settings(load_settings())
        vllm_config = kwargs.get("vllm_config", args[0] if args else None)
        if vllm_config is not None:
            simulation = replace(
                simulation,
                max_num_seqs=vllm_config.scheduler_config.max_num_seqs,
                block_size=vllm_config.cache_config.block_size or simulation.block_size,
            )
        cores: list[SimulatedEngineCore] = []

        def make_core(*_args: Any, renderer: Any = None, **_kwargs: Any) -> SimulatedEngineCore:
            core = SimulatedEngineCore(simulation, answer_tokens(renderer.tokenizer))
            cores.append(core)
            return core

        kwargs.setdefault("executor_class", None)
        # AsyncLLM builds its engine-core client through this one name; nothing else
        # of vLLM's changes. It fails loudly below if vLLM stops building it there.
        original = getattr(_async_llm, _CLIENT_NAME)
        factory = type("SimulatedCore", (), {"make_async_mp_client": staticmethod(make_core)})
        setattr(_async_llm, _CLIENT_NAME, factory)
        try:
            super().__init__(*args, **kwargs)
        finally:
            setattr(_async_llm, _CLIENT_NAME, original)
        if not cores:
            raise RuntimeError(
                "vLLM's AsyncLLM did not build its engine core through "
                "EngineCoreClient.make_async_mp_client: the simulator needs updating"
            )
        self.simulated_core = cores[0]

    @classmethod
    def from_settings(cls, settings: Settings, engine_args: Any, stat_loggers: list[Any]) -> Any:
        """Build one for ``settings`` from parsed ``AsyncEngineArgs``."""
        vllm_config = engine_args.create_engine_config()
        return cls(
            vllm_config=vllm_config,
            log_requests=engine_args.enable_log_requests,
            log_stats=not engine_args.disable_log_stats,
            stat_loggers=stat_loggers,
            simulation=SimulationConfig.from_settings(settings),
        )


__all__ = [
    "STEP_LOOP_THREAD",
    "SimulatedAsyncLLM",
    "SimulatedEngineCore",
    "SimulationConfig",
]
