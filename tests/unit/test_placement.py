"""Engine deployment options are derived from the settings, never hand-written."""

from __future__ import annotations

import pytest
from ray.serve.config import BackpressureConfig, RequestRouterConfig

from cloudllm_serve.engine.vllm_engine import engine_args_from_settings
from cloudllm_serve.placement import (
    ROUTER_CLASS,
    bundle_mismatch,
    capacity_problem,
    engine_deployment_options,
    max_ongoing_requests,
    placement_bundles,
    refused_overrides,
)
from cloudllm_serve.settings import Settings


def test_cpu_reserves_no_gpu() -> None:
    options = engine_deployment_options(Settings(ENGINE_DEVICE="cpu", VLLM_BLOCK_SIZE=32))
    assert options["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0}
    assert "placement_group_bundles" not in options


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


def test_placement_strategy_is_a_setting() -> None:
    settings = Settings(
        ENGINE_DEVICE="gpu", VLLM_TENSOR_PARALLEL_SIZE=2, ENGINE_PLACEMENT_STRATEGY="PACK"
    )
    assert engine_deployment_options(settings)["placement_group_strategy"] == "PACK"


def test_autoscaling_follows_batch_size_and_settings() -> None:
    settings = Settings(
        VLLM_MAX_NUM_SEQS=16,
        ENGINE_MIN_REPLICAS=2,
        ENGINE_MAX_REPLICAS=5,
        ENGINE_UPSCALE_DELAY_S=3,
        ENGINE_DOWNSCALE_DELAY_S=42,
        ENGINE_MAX_QUEUED_REQUESTS=7,
        ENGINE_GRACEFUL_SHUTDOWN_S=11,
        OVERLOAD_STATUS_CODE=429,
        OVERLOAD_RETRY_AFTER_S=9,
    )
    options = engine_deployment_options(settings)
    scaling = options["autoscaling_config"]
    assert scaling["target_ongoing_requests"] == 16  # a replica is full at its batch size
    assert (scaling["min_replicas"], scaling["max_replicas"]) == (2, 5)
    assert (scaling["upscale_delay_s"], scaling["downscale_delay_s"]) == (3, 42)
    assert options["max_ongoing_requests"] == 32  # a batch running, a batch waiting in vLLM
    assert options["max_queued_requests"] == 7
    assert options["graceful_shutdown_timeout_s"] == 11
    assert options["backpressure_config"] == BackpressureConfig(status_code=429, retry_after_s=9)
    router = options["request_router_config"]
    assert isinstance(router, RequestRouterConfig)
    assert router.request_router_kwargs == {"affinity": True, "batch_size": 16, "load_bound": 2.0}
    assert "num_replicas" not in options


@pytest.mark.parametrize(("seqs", "ongoing"), [(1, 2), (4, 8), (16, 32), (256, 512)])
def test_max_ongoing_is_a_batch_running_and_a_batch_waiting(seqs: int, ongoing: int) -> None:
    assert max_ongoing_requests(Settings(VLLM_MAX_NUM_SEQS=seqs)) == ongoing


def test_router_class_is_importable() -> None:
    from importlib import import_module

    module, name = ROUTER_CLASS.split(":")
    assert getattr(import_module(module), name).__name__ == "ConversationAffinityRouter"


def test_hand_written_options_are_named() -> None:
    entry = {"name": "EngineServer", "placement_group_bundles": [{"GPU": 1}], "num_replicas": 2}
    assert refused_overrides(entry) == ["num_replicas", "placement_group_bundles"]
    assert refused_overrides({"name": "EngineServer", "health_check_period_s": 5}) == []


def test_bundle_mismatch_explains_what_to_change() -> None:
    tp2 = Settings(ENGINE_DEVICE="gpu", VLLM_TENSOR_PARALLEL_SIZE=2)
    assert bundle_mismatch(tp2, placement_bundles(2)) is None
    assert bundle_mismatch(Settings(ENGINE_DEVICE="gpu"), None) is None
    problem = bundle_mismatch(tp2, [{"CPU": 1, "GPU": 2}])
    assert problem is not None
    assert "placement_group_bundles" in problem and "VLLM_TENSOR_PARALLEL_SIZE=2" in problem
    assert bundle_mismatch(Settings(ENGINE_DEVICE="gpu"), [{"GPU": 1}]) is not None


def test_capacity_problem_names_gpus_needed_and_available() -> None:
    tp4 = Settings(ENGINE_DEVICE="gpu", VLLM_TENSOR_PARALLEL_SIZE=4)
    assert capacity_problem(tp4, [{"GPU": 4.0}]) is None
    problem = capacity_problem(tp4, [{"GPU": 2.0}, {"GPU": 2.0}])
    assert problem is not None and "needs 4 GPU(s) on one node" in problem
    assert "at most 2" in problem
    spread = Settings(
        ENGINE_DEVICE="gpu", VLLM_TENSOR_PARALLEL_SIZE=4, ENGINE_PLACEMENT_STRATEGY="SPREAD"
    )
    assert capacity_problem(spread, [{"GPU": 2.0}, {"GPU": 2.0}]) is None
    assert capacity_problem(Settings(ENGINE_DEVICE="cpu", VLLM_BLOCK_SIZE=32), []) is None


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
