"""Ray resources of an engine replica, derived from the settings (never hand-written).

* ``ENGINE_DEVICE=cpu``: one CPU, no GPU.
* GPU, tensor parallel 1: the replica itself holds the GPU.
* GPU, tensor parallel N > 1: a placement group with one ``{GPU: 1}`` bundle per rank
  and the replica's CPU in bundle 0; vLLM's Ray executor puts one worker on each
  bundle, so the replica itself reserves no GPU.
"""

from __future__ import annotations

from typing import Any

from cloudllm_serve.settings import Settings

REPLICA_CPUS = 1.0


def placement_bundles(tensor_parallel_size: int) -> list[dict[str, float]]:
    """One ``{GPU: 1}`` bundle per rank; bundle 0 also holds the replica's CPU."""
    if tensor_parallel_size < 1:
        raise ValueError("tensor_parallel_size must be at least 1")
    return [{"CPU": REPLICA_CPUS, "GPU": 1.0}] + [{"GPU": 1.0}] * (tensor_parallel_size - 1)


def engine_deployment_options(settings: Settings) -> dict[str, Any]:
    """Serve ``.options()`` for the engine deployment: actor resources and placement group."""
    if settings.ENGINE_DEVICE == "cpu":
        return {"ray_actor_options": {"num_cpus": REPLICA_CPUS, "num_gpus": 0}}
    tensor_parallel = settings.VLLM_TENSOR_PARALLEL_SIZE
    if tensor_parallel == 1:
        return {"ray_actor_options": {"num_cpus": REPLICA_CPUS, "num_gpus": 1}}
    return {
        "ray_actor_options": {"num_cpus": REPLICA_CPUS, "num_gpus": 0},
        "placement_group_bundles": placement_bundles(tensor_parallel),
        "placement_group_strategy": "STRICT_PACK",
    }
