"""Ray Serve LLM's vLLM engine over the project's simulated engine core.

Ray Serve LLM builds its engine from the class named by ``RAYLLM_VLLM_ENGINE_CLS``
(``LLMServer._get_default_engine_class``); ``benchmarks/ray_serve_llm_app.py
--simulated`` sets it to ``benchmarks.ray_serve_llm_sim:SimulatedVLLMEngine``.

:class:`SimulatedVLLMEngine` is Ray's own ``VLLMEngine`` with one change: where Ray
constructs vLLM's ``AsyncLLM`` it constructs
:class:`~cloudllm_serve.engine.simulated.SimulatedAsyncLLM`, with the same arguments
(the ``VllmConfig`` Ray built from the ``LLMConfig``, the executor class, Ray's
``RayPrometheusStatLogger`` when ``log_engine_metrics`` is on, ``log_requests`` and
``log_stats``). Everything else of ``VLLMEngine.start`` runs as it does for a real
model: the node initialization (a local model folder: nothing is downloaded), the
engine config (created in the replica, on CPU no remote task), the checkpoint info
(the prepared SmolLM2's config), vLLM's ``init_app_state`` and the routing stats. The
placement group Ray makes for the replica is handed to the config and never used: the
simulated core starts no workers.

The simulation's time model comes from the ``SIM_*`` environment variables of the
replica (:func:`cloudllm_serve.settings.load_settings`); ``max_num_seqs`` and the
block size come from the engine's ``VllmConfig`` (``engine_kwargs``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray.llm._internal.serve.constants import RAY_SERVE_LLM_ENABLE_DECODE_BLOCK_PROGRESS
from ray.llm._internal.serve.engines.vllm.vllm_engine import (
    VLLMEngine,
    _clear_current_platform_cache,
)
from ray.llm._internal.serve.observability.logging import get_logger
from ray.llm._internal.serve.routing_policies.kv_aware.kv_aware_router import is_kv_aware
from ray.llm._internal.serve.routing_policies.kv_aware.vllm.kv_events import (
    enable_native_kv_offload_events,
)
from ray.llm._internal.serve.routing_policies.kv_aware.vllm.token_tracking import (
    enable_token_tracking,
)

if TYPE_CHECKING:
    from ray.util.placement_group import PlacementGroup

logger = get_logger(__name__)

#: The value of ``RAYLLM_VLLM_ENGINE_CLS`` that selects this engine.
ENGINE_CLS_PATH = "benchmarks.ray_serve_llm_sim:SimulatedVLLMEngine"


class SimulatedVLLMEngine(VLLMEngine):
    """Ray Serve LLM's ``VLLMEngine`` whose ``AsyncLLM`` is the simulated one."""

    def _start_async_llm_engine(
        self,
        vllm_engine_args: Any,
        vllm_engine_config: Any,
        placement_group: PlacementGroup,
    ) -> Any:
        """Build a ``SimulatedAsyncLLM`` as Ray's method builds ``AsyncLLM`` (same arguments)."""
        from vllm.v1.executor.abstract import Executor

        from cloudllm_serve.engine.simulated import SimulatedAsyncLLM

        vllm_engine_config.parallel_config.placement_group = placement_group
        if is_kv_aware(self.llm_config):
            enable_native_kv_offload_events(vllm_engine_config)

        _clear_current_platform_cache()  # type: ignore[no-untyped-call]

        custom_stat_loggers = None
        if self.llm_config.log_engine_metrics:
            from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

            custom_stat_loggers = [RayPrometheusStatLogger]

        executor_class = Executor.get_class(vllm_engine_config)
        engine_cls: Any = SimulatedAsyncLLM
        if is_kv_aware(self.llm_config):
            engine_cls = enable_token_tracking(
                SimulatedAsyncLLM,
                report_decode_progress=RAY_SERVE_LLM_ENABLE_DECODE_BLOCK_PROGRESS,
            )
        engine = engine_cls(
            vllm_config=vllm_engine_config,
            executor_class=executor_class,
            log_requests=vllm_engine_args.enable_log_requests,
            log_stats=not vllm_engine_args.disable_log_stats,
            stat_loggers=custom_stat_loggers,
        )
        config = engine.simulated_core.config
        logger.info(
            "SimulatedVLLMEngine: simulated engine core, no weights (ttft_ms=%s, "
            "step_ms=%s, step_ms_per_seq=%s, max_num_seqs=%s, block_size=%s)",
            config.ttft_ms,
            config.step_ms,
            config.step_ms_per_seq,
            config.max_num_seqs,
            config.block_size,
        )
        return engine


__all__ = ["ENGINE_CLS_PATH", "SimulatedVLLMEngine"]
