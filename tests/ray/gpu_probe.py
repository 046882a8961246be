"""An engine backend that starts no model: it places one Ray worker per tensor-parallel
rank exactly as vLLM's Ray executor does, and reports the GPU ids each rank got.

It runs inside the real :class:`~cloudllm_serve.engine.server.EngineServer` with the
real derived deployment options, on a Ray cluster with fake GPUs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cloudllm_serve.engine.protocol import (
    EngineStats,
    GenerationChunk,
    GenerationRequest,
    GpuReading,
)
from cloudllm_serve.settings import Settings
from tests.fakes import engine_stats


@ray.remote(num_cpus=0, num_gpus=1)
class RankWorker:
    """One tensor-parallel rank (vLLM's ``RayWorkerWrapper`` takes one GPU likewise)."""

    def gpu_ids(self) -> list[int]:
        return [int(i) for i in ray.get_gpu_ids()]


class GpuProbeBackend:
    """Places ranks like vLLM's ``initialize_ray_cluster`` + Ray executor, then idles."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._ranks: list[tuple[int, list[int]]] = []
        self._workers: list[Any] = []

    async def start(self) -> None:
        group = ray.util.get_current_placement_group()
        if group is None:  # tensor parallel 1: the replica holds its GPU itself
            self._ranks = [(0, [int(i) for i in ray.get_gpu_ids()])]
            return
        gpu_bundles = [i for i, b in enumerate(group.bundle_specs) if b.get("GPU", 0)]
        for bundle_index in gpu_bundles[: self._settings.VLLM_TENSOR_PARALLEL_SIZE]:
            strategy = PlacementGroupSchedulingStrategy(
                placement_group=group,
                placement_group_capture_child_tasks=True,
                placement_group_bundle_index=bundle_index,
            )
            self._workers.append(RankWorker.options(scheduling_strategy=strategy).remote())
        ids = [await worker.gpu_ids.remote() for worker in self._workers]
        self._ranks = list(enumerate(ids))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        yield GenerationChunk(finished=True)

    def stats(self) -> EngineStats:
        gpus = [
            GpuReading(
                index=gpu,
                name=f"rank {rank}",
                memory_used_gb=0.0,
                memory_total_gb=0.0,
                utilization_percent=None,
            )
            for rank, ids in self._ranks
            for gpu in ids
        ]
        return engine_stats(
            model_name="gpu-probe",
            max_num_seqs=self._settings.VLLM_MAX_NUM_SEQS,
            block_size=self._settings.VLLM_BLOCK_SIZE,
            tensor_parallel_size=self._settings.VLLM_TENSOR_PARALLEL_SIZE,
            device="gpu",
            gpus=gpus,
        )

    async def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        for worker in self._workers:
            ray.kill(worker)
