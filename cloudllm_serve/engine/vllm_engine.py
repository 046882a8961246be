"""The vLLM backend: one ``AsyncLLM`` per engine replica.

vLLM is imported inside methods (here and in :mod:`.openai_serving`), and
:mod:`.simulated` (which imports vLLM at module level) only when ``LLM_MODEL=sim``, so
that importing the package (and most tests) needs no vLLM at all.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from cloudllm_serve.engine.gpu import GpuMonitor
from cloudllm_serve.engine.prompt import (
    FittedPrompt,
    PromptDoesNotFitError,
    fit_messages,
)
from cloudllm_serve.engine.protocol import (
    PROGRESS_INTERVAL_S,
    ChoiceDelta,
    EngineError,
    EngineModelInfo,
    EngineStats,
    GenerationChunk,
    GenerationMetrics,
    GenerationRequest,
    OpenAICall,
    OpenAIReplicaItem,
)
from cloudllm_serve.engine.resume import RESUMED_TOKENS_ARG, continued_input
from cloudllm_serve.errors import SettingsError
from cloudllm_serve.heap import settle_heap
from cloudllm_serve.settings import Settings

logger = logging.getLogger(__name__)


class _SchedulerSnapshot:
    """The latest scheduler numbers, written by vLLM's stat-logging hook."""

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.kv_cache_usage = 0.0
        self.prefix_queries = 0
        self.prefix_hits = 0
        #: Every request of the engine, whichever path sent it (/generate, /v1, responses).
        self.tokens_generated = 0
        self.requests_finished = 0


def _make_stat_logger_factory(snapshot: _SchedulerSnapshot) -> Any:
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SnapshotStatLogger(StatLoggerBase):
        """Copies each ``SchedulerStats`` into ``snapshot``; logs nothing."""

        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self._snapshot = snapshot

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if iteration_stats is not None:
                self._snapshot.tokens_generated += iteration_stats.num_generation_tokens
                self._snapshot.requests_finished += len(iteration_stats.finished_requests)
            if scheduler_stats is None:
                return
            self._snapshot.running = scheduler_stats.num_running_reqs
            self._snapshot.waiting = scheduler_stats.num_waiting_reqs
            self._snapshot.kv_cache_usage = scheduler_stats.kv_cache_usage
            prefix = scheduler_stats.prefix_cache_stats
            self._snapshot.prefix_queries += prefix.queries
            self._snapshot.prefix_hits += prefix.hits

        def log_engine_initialized(self) -> None:
            pass

    def factory(vllm_config: Any, engine_index: int = 0) -> Any:
        return SnapshotStatLogger(vllm_config, engine_index)

    return factory


#: The one host vLLM's own media fetching may reach: none (``.invalid`` never resolves).
MEDIA_FETCH_OFF_DOMAIN = "vllm-media-fetching-is-off.invalid"
#: vLLM's modalities other than images, each limited to 0 items per prompt (off).
OFF_MODALITIES = {"video": 0, "audio": 0}


def _prometheus_logger(enabled: bool) -> list[Any]:
    """VLLM's Ray stat-logger class when this is a Ray worker (an engine replica).

    It exports vLLM's own metrics through Ray's metrics agent (``ray_vllm_*``, tagged
    with the replica's id), as Ray Serve LLM does. Passing the *class* matters: vLLM adds
    its default Prometheus logger (a registry nothing here would serve) unless one of the
    loggers it is given is a ``PrometheusStatLogger`` subclass. Outside Ray: the default.
    """
    import ray

    if not enabled or not ray.is_initialized():
        return []
    from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

    return [RayPrometheusStatLogger]


def engine_args_from_settings(settings: Settings) -> dict[str, Any]:
    """The ``AsyncEngineArgs`` keyword arguments that the settings ask for."""
    args: dict[str, Any] = {
        "model": settings.engine_model,
        "served_model_name": settings.model_name,
        "max_model_len": settings.VLLM_MAX_MODEL_LEN,
        "max_num_seqs": settings.VLLM_MAX_NUM_SEQS,
        "block_size": settings.VLLM_BLOCK_SIZE,
        "gpu_memory_utilization": settings.VLLM_GPU_MEMORY_UTILIZATION,
        "tensor_parallel_size": settings.VLLM_TENSOR_PARALLEL_SIZE,
        "enforce_eager": settings.VLLM_ENFORCE_EAGER,
        "disable_log_stats": False,
        # Compact JSON under a schema: a small model cannot loop on whitespace until
        # max_tokens and return a truncated object.
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
        # Images (ignored by a text-only model). vLLM never fetches media itself: the
        # ingress checks every image and sends it as a data URL; an allowlist no host
        # matches turns vLLM's own http(s) fetching off (an empty one allows every host).
        # Video and audio stay off: no check of ours covers them (the ingress refuses them).
        "limit_mm_per_prompt": {"image": settings.VLLM_LIMIT_IMAGES_PER_PROMPT, **OFF_MODALITIES},
        "allowed_media_domains": [MEDIA_FETCH_OFF_DOMAIN],
    }
    if settings.VLLM_MM_PROCESSOR_KWARGS:
        args["mm_processor_kwargs"] = settings.VLLM_MM_PROCESSOR_KWARGS
    if settings.VLLM_KV_CACHE_MEMORY_BYTES is not None:
        args["kv_cache_memory_bytes"] = settings.VLLM_KV_CACHE_MEMORY_BYTES
    if settings.ENGINE_DEVICE == "gpu" and settings.VLLM_TENSOR_PARALLEL_SIZE > 1:
        args["distributed_executor_backend"] = "ray"
    return {**args, **settings.VLLM_ENGINE_KWARGS}


def vllm_cli_args(settings: Settings) -> list[str]:
    """The ``vllm serve`` command-line arguments our engine replicas run with.

    Engine arguments (:func:`engine_args_from_settings`) plus the front-end ones of
    vLLM's OpenAI layer (the tool-call parser). Raw vLLM in the benchmark and the
    differential test gets exactly these, so both run the same engine.
    """
    command: list[str] = []
    for key, value in engine_args_from_settings(settings).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if value:
                command.append(flag)
            elif key in _TRUE_BY_DEFAULT:
                command.append("--no-" + key.replace("_", "-"))
        elif isinstance(value, dict):
            command += [flag, json.dumps(value)]
        elif isinstance(value, list):  # vLLM's list arguments take one value per item
            command += [flag, *(str(item) for item in value)]
        elif value is not None:
            command += [flag, str(value)]
    if settings.VLLM_TOOL_CALL_PARSER:
        parser = settings.VLLM_TOOL_CALL_PARSER
        command += ["--enable-auto-tool-choice", "--tool-call-parser", parser]
    return command


#: Boolean engine arguments that are on unless turned off.
_TRUE_BY_DEFAULT = frozenset({"enable_prefix_caching"})


#: Engine arguments that a setting of ours controls: VLLM_ENGINE_KWARGS may not set them.
SETTING_OF_ENGINE_ARG = {
    "model": "LLM_MODEL",
    "served_model_name": "LLM_SERVED_MODEL_NAME",
    "max_model_len": "VLLM_MAX_MODEL_LEN",
    "max_num_seqs": "VLLM_MAX_NUM_SEQS",
    "block_size": "VLLM_BLOCK_SIZE",
    "gpu_memory_utilization": "VLLM_GPU_MEMORY_UTILIZATION",
    "tensor_parallel_size": "VLLM_TENSOR_PARALLEL_SIZE",
    "enforce_eager": "VLLM_ENFORCE_EAGER",
    "kv_cache_memory_bytes": "VLLM_KV_CACHE_MEMORY_BYTES",
    "limit_mm_per_prompt": "VLLM_LIMIT_IMAGES_PER_PROMPT",
    "mm_processor_kwargs": "VLLM_MM_PROCESSOR_KWARGS",
    "allowed_media_domains": "MEDIA_ALLOWED_DOMAINS (fetched by the ingress, never by vLLM)",
    "distributed_executor_backend": "VLLM_TENSOR_PARALLEL_SIZE and ENGINE_DEVICE",
}


def check_engine_kwargs(settings: Settings) -> None:
    """Refuse ``VLLM_ENGINE_KWARGS`` keys vLLM does not know or that a setting controls.

    Raises :class:`~cloudllm_serve.errors.SettingsError` naming the key. Imports vLLM
    only when there is something to check.
    """
    if not settings.VLLM_ENGINE_KWARGS:
        return
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs

    known = {field.name for field in dataclasses.fields(AsyncEngineArgs)}
    problems = []
    for key in sorted(settings.VLLM_ENGINE_KWARGS):
        if key in SETTING_OF_ENGINE_ARG:
            problems.append(f"'{key}' is set by {SETTING_OF_ENGINE_ARG[key]}; set that instead")
        elif key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"'{key}' is not a vLLM engine argument{hint}")
    if problems:
        raise SettingsError("invalid settings:\n  VLLM_ENGINE_KWARGS: " + "; ".join(problems))


def _client_errors() -> tuple[type[Exception], ...]:
    """The exceptions vLLM raises for a bad request (``VLLMValidationError``: no ValueError)."""
    from vllm.exceptions import VLLMClientError

    return (ValueError, VLLMClientError)


class VLLMEngine:
    """Runs generations on a vLLM ``AsyncLLM``; see :mod:`cloudllm_serve.engine.protocol`."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._engine: Any = None
        self._snapshot = _SchedulerSnapshot()
        self._gpus = GpuMonitor()
        self._started_at = time.monotonic()
        self._sampling: Any = None
        self._openai: Any = None

    async def start(self) -> None:
        """Load the model, start the engine and vLLM's OpenAI serving layer around it."""
        from vllm import SamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.async_llm import AsyncLLM

        from cloudllm_serve.engine.openai_serving import OpenAIServer, parse_vllm_args

        cli_args = vllm_cli_args(self._settings)
        logger.info("starting vLLM engine: vllm serve %s", " ".join(cli_args))
        args = parse_vllm_args(cli_args)
        engine_args = AsyncEngineArgs.from_cli_args(args)
        stat_loggers = [
            *_prometheus_logger(self._settings.METRICS_ENABLED),
            _make_stat_logger_factory(self._snapshot),
        ]
        if self._settings.simulated:
            from cloudllm_serve.engine.simulated import SimulatedAsyncLLM

            logger.info("the engine is simulated (LLM_MODEL=sim): no weights, no compute")
            self._engine = SimulatedAsyncLLM.from_settings(
                self._settings, engine_args, stat_loggers
            )
            await asyncio.sleep(self._settings.SIM_STARTUP_S)
        else:
            self._engine = AsyncLLM.from_engine_args(engine_args, stat_loggers=stat_loggers)
        self._openai = OpenAIServer(
            self._engine,
            args,
            self._settings.VLLM_MAX_MODEL_LEN,
            images_per_prompt=self._settings.VLLM_LIMIT_IMAGES_PER_PROMPT,
        )
        await self._openai.start()
        self._sampling = (SamplingParams, RequestOutputKind)
        self._started_at = time.monotonic()
        # As `vllm serve` does once its server is up: the start-up objects (the model's
        # modules, tokenizer, Ray, Serve) go to a permanent generation that the garbage
        # collector no longer walks, so a full collection (which pauses this replica's
        # event loop) covers only what requests allocated. And as vLLM's engine core
        # does: its environment variables are read once from now on (the output
        # processing of every token reads some).
        import vllm.envs

        settle_heap()
        vllm.envs.enable_envs_cache()

    def openai(self, call: OpenAICall) -> AsyncIterator[OpenAIReplicaItem]:
        """One ``/v1`` call through vLLM's own OpenAI serving layer."""
        return self._openai.answer(call)  # type: ignore[no-any-return]

    async def models(self) -> dict[str, Any]:
        """``GET /v1/models`` as vLLM answers it."""
        return await self._openai.models()  # type: ignore[no-any-return]

    def model_info(self) -> EngineModelInfo:
        """What the served model can take (vLLM's model config says)."""
        return EngineModelInfo(
            model_name=self._settings.model_name,
            supports_images=bool(self._engine.model_config.is_multimodal_model),
            max_model_len=self._settings.VLLM_MAX_MODEL_LEN,
        )

    async def _prompt(self, request: GenerationRequest) -> FittedPrompt:
        """The prompt to generate from; raises ``PromptDoesNotFitError``.

        Encoded as the ``/v1`` chat path encodes (:meth:`OpenAIServer.encode_chat`).
        """
        budget = self._settings.VLLM_MAX_MODEL_LEN - request.sampling.max_tokens
        if request.messages is not None:
            return await fit_messages(
                request.messages,
                self._openai.encode_chat,
                budget,
                max_images=self._settings.VLLM_LIMIT_IMAGES_PER_PROMPT,
            )
        raise ValueError("the request has no messages")

    def _sampling_params(self, request: GenerationRequest) -> Any:
        from vllm.sampling_params import StructuredOutputsParams

        sampling_params_cls, output_kind = self._sampling
        options = request.sampling
        structured = None
        if options.json_schema is not None:
            structured = StructuredOutputsParams(json=options.json_schema)
        if request.stream:
            kind = output_kind.DELTA
        else:  # a resumable whole answer reports its progress: vLLM's outputs so far
            kind = output_kind.CUMULATIVE if request.resumable else output_kind.FINAL_ONLY
        resumed = len(request.resume_token_ids)
        return sampling_params_cls(
            max_tokens=options.max_tokens - resumed,
            extra_args={RESUMED_TOKENS_ARG: resumed} if resumed else None,
            temperature=options.temperature,
            structured_outputs=structured,
            output_kind=kind,
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Run one generation; yields chunks as the protocol describes.

        A continuation (``resume_token_ids``) fits the prompt as the first try did, then
        generates after those ids (:mod:`cloudllm_serve.engine.resume`).
        """
        from vllm.inputs import TokensPrompt

        try:
            fitted = await self._prompt(request)
            params = self._sampling_params(request)
            if request.resume_token_ids and params.max_tokens < 1:
                raise ValueError("a continuation with nothing left to generate")
        except PromptDoesNotFitError as error:
            yield GenerationChunk(
                finished=True,
                error=EngineError(
                    "prompt_too_long",
                    f"message is too long for the context: {error.tokens} prompt tokens, "
                    f"at most {error.budget} fit (VLLM_MAX_MODEL_LEN "
                    f"{self._settings.VLLM_MAX_MODEL_LEN} minus max_tokens "
                    f"{request.sampling.max_tokens})",
                ),
            )
            return
        except Exception as error:  # a chat template or parameters vLLM refuses
            yield GenerationChunk(
                finished=True,
                error=EngineError("invalid_request", f"{error}"),
            )
            return

        started = time.perf_counter()
        first_token_at: float | None = None
        tokens = 0
        prompt_tokens, dropped = len(fitted.token_ids), fitted.dropped_messages
        prompt = fitted.engine_input or TokensPrompt(prompt_token_ids=fitted.token_ids)
        if request.resume_token_ids:
            prompt = continued_input(prompt, request.resume_token_ids)
        if request.cache_salt is not None:
            prompt = {**prompt, "cache_salt": request.cache_salt}
        with_ids = request.resumable
        # A resumable whole answer (CUMULATIVE outputs): what was reported, and when.
        whole = with_ids and not request.stream
        reported_ids = reported_chars = 0
        reported_at = time.monotonic()
        try:
            async for output in self._engine.generate(prompt, params, request.request_id):
                if whole:
                    if not output.finished and time.monotonic() - reported_at < (
                        PROGRESS_INTERVAL_S
                    ):
                        continue
                    reported_at = time.monotonic()
                    choices, reported_ids, reported_chars = _progress(
                        output.outputs[0], reported_ids, reported_chars
                    )
                else:
                    choices = tuple(
                        ChoiceDelta(
                            index=completion.index,
                            text=completion.text,
                            token_count=len(completion.token_ids),
                            finish_reason=completion.finish_reason,
                            token_ids=completion.token_ids if with_ids else (),
                        )
                        for completion in output.outputs
                    )
                step_tokens = sum(choice.token_count for choice in choices)
                tokens += step_tokens
                if first_token_at is None and step_tokens:
                    first_token_at = time.perf_counter()
                if not output.finished:
                    yield GenerationChunk(
                        choices=choices, prompt_tokens=prompt_tokens, dropped_messages=dropped
                    )
                    continue
                finished_at = time.perf_counter()
                yield GenerationChunk(
                    choices=choices,
                    finished=True,
                    metrics=GenerationMetrics(
                        queue_ms=_queue_ms(output),
                        ttft_ms=_ttft_ms(output, (first_token_at or finished_at) - started),
                        generation_ms=(finished_at - started) * 1000,
                    ),
                    prompt_tokens=prompt_tokens,
                    dropped_messages=dropped,
                )
        except _client_errors() as error:  # vLLM's verdict on the request
            yield GenerationChunk(finished=True, error=EngineError("invalid_request", str(error)))
        except Exception as error:
            if self.dead():
                message = (
                    f"the engine died while generating (after {tokens} tokens): "
                    "vLLM's engine process is gone and the replica is being replaced; "
                    "send the request again"
                )
            else:
                logger.exception("generation %s failed", request.request_id)
                message = f"{type(error).__name__}: {error}"
            yield GenerationChunk(finished=True, error=EngineError("engine_failure", message))

    def stats(self) -> EngineStats:
        """A live snapshot of this engine."""
        settings = self._settings
        errored = self.dead()
        unfinished = 0 if self._engine is None else self._engine.get_num_unfinished_requests()
        running = min(self._snapshot.running, unfinished)
        queries = self._snapshot.prefix_queries
        return EngineStats(
            engine_status="errored" if errored else "running",
            model_name=settings.model_name,
            running_requests=running,
            pending_requests=unfinished - running,
            kv_cache_usage=self._snapshot.kv_cache_usage if unfinished else 0.0,
            prefix_cache_hit_rate=(self._snapshot.prefix_hits / queries) if queries else None,
            prefix_cache_queries=queries,
            prefix_cache_hits=self._snapshot.prefix_hits,
            requests_finished=self._snapshot.requests_finished,
            tokens_generated=self._snapshot.tokens_generated,
            max_model_len=settings.VLLM_MAX_MODEL_LEN,
            max_num_seqs=settings.VLLM_MAX_NUM_SEQS,
            block_size=settings.VLLM_BLOCK_SIZE,
            tensor_parallel_size=settings.VLLM_TENSOR_PARALLEL_SIZE,
            gpu_memory_utilization=settings.VLLM_GPU_MEMORY_UTILIZATION,
            device=settings.ENGINE_DEVICE,
            uptime_s=time.monotonic() - self._started_at,
            gpus=self._gpus.read(),
        )

    async def check_health(self) -> None:
        """Raise if the engine is dead (Serve then replaces the replica)."""
        if self._engine is None:
            raise RuntimeError("vLLM engine is not started")
        await self._engine.check_health()

    def dead(self) -> bool:
        """Whether vLLM's engine died (its engine-core process gone) or was shut down."""
        return self._engine is None or bool(getattr(self._engine, "errored", False))

    def shutdown(self) -> None:
        """Stop the engine's processes."""
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None


def _progress(
    completion: Any, reported_ids: int, reported_chars: int
) -> tuple[tuple[ChoiceDelta, ...], int, int]:
    """A whole answer's output so far (CUMULATIVE) less what was reported before.

    Returns the new part as a choice, and how many ids and characters are reported now.
    """
    ids = list(completion.token_ids[reported_ids:])
    text = completion.text[reported_chars:]
    choice = ChoiceDelta(
        index=completion.index,
        text=text,
        token_count=len(ids),
        finish_reason=completion.finish_reason,
        token_ids=ids,
    )
    return (choice,), reported_ids + len(ids), reported_chars + len(text)


def _ttft_ms(output: Any, measured_s: float) -> float:
    """VLLM's own time to first token; ``measured_s`` where vLLM does not say.

    A non-streamed request (FINAL_ONLY) yields once, at the end, so only vLLM knows
    when its first token was made.
    """
    latency = getattr(getattr(output, "metrics", None), "first_token_latency", None)
    if isinstance(latency, float) and latency > 0:
        return latency * 1000
    return measured_s * 1000


def _queue_ms(output: Any) -> float:
    """Time the request waited in vLLM's scheduler queue (0 when vLLM does not say)."""
    metrics = getattr(output, "metrics", None)
    queued = getattr(metrics, "queued_ts", None)
    scheduled = getattr(metrics, "scheduled_ts", None)
    if isinstance(queued, float) and isinstance(scheduled, float) and scheduled >= queued:
        return (scheduled - queued) * 1000
    return 0.0
