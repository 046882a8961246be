"""Engine replica resources are derived from the settings, never hand-written."""

from __future__ import annotations

import pytest

from cloudllm_serve.engine.placement import engine_deployment_options, placement_bundles
from cloudllm_serve.engine.vllm_engine import engine_args_from_settings
from cloudllm_serve.settings import Settings


def test_cpu_reserves_no_gpu() -> None:
    options = engine_deployment_options(Settings(ENGINE_DEVICE="cpu", VLLM_BLOCK_SIZE=32))
    assert options == {"ray_actor_options": {"num_cpus": 1.0, "num_gpus": 0}}


def test_gpu_tp1_replica_holds_its_gpu() -> None:
    options = engine_deployment_options(Settings(ENGINE_DEVICE="gpu"))
    assert options["ray_actor_options"]["num_gpus"] == 1
    assert "placement_group_bundles" not in options


@pytest.mark.parametrize("tp", [2, 4])
def test_gpu_tensor_parallel_uses_one_bundle_per_rank(tp: int) -> None:
    settings = Settings(ENGINE_DEVICE="gpu", VLLM_TENSOR_PARALLEL_SIZE=tp)
    options = engine_deployment_options(settings)
    bundles = options["placement_group_bundles"]
    assert len(bundles) == tp
    assert all(bundle["GPU"] == 1 for bundle in bundles)
    assert bundles[0]["CPU"] == options["ray_actor_options"]["num_cpus"]
    assert options["ray_actor_options"]["num_gpus"] == 0
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert engine_args_from_settings(settings)["distributed_executor_backend"] == "ray"
    assert placement_bundles(tp) == bundles


def test_engine_args_follow_settings() -> None:
    settings = Settings(
        ENGINE_DEVICE="cpu",
        VLLM_BLOCK_SIZE=64,
        VLLM_MAX_NUM_SEQS=3,
        VLLM_MAX_MODEL_LEN=1024,
        VLLM_KV_CACHE_MEMORY_BYTES=1 << 30,
        VLLM_ENFORCE_EAGER=True,
    )
    args = engine_args_from_settings(settings)
    assert args["block_size"] == 64
    assert args["max_num_seqs"] == 3
    assert args["max_model_len"] == 1024
    assert args["kv_cache_memory_bytes"] == 1 << 30
    assert args["enforce_eager"] is True
    assert "distributed_executor_backend" not in args
