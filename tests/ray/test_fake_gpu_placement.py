"""Tensor parallelism through placement groups, on a Ray cluster with 4 fake GPUs.

The real :class:`EngineServer` runs with the real derived deployment options; its
backend (:mod:`tests.ray.gpu_probe`) places one worker per rank the way vLLM's
Ray executor does and reports the GPU ids each rank got. The fleet view the ingress
uses (:class:`ServeEngineClient`) reads them back through Serve's controller.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from ray import serve

from cloudllm_serve.engine.protocol import EngineFleet
from cloudllm_serve.engine.server import EngineServer
from cloudllm_serve.ingress.engine_client import ServeEngineClient
from cloudllm_serve.placement import engine_deployment_options, placement_bundles
from cloudllm_serve.settings import Settings
from tests.ray.gpu_probe import GpuProbeBackend
from tests.support import wait_for

REPO = Path(__file__).resolve().parents[2]
CLUSTER_GPUS = 4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    temp = tmp_path_factory.mktemp("ray")
    os.environ["RAY_SERVE_SLOW_STARTUP_WARNING_S"] = "2"
    # Serve's first slow-start message comes one period after the deployment (30 s).
    os.environ["RAY_SERVE_SLOW_STARTUP_WARNING_PERIOD_S"] = "2"
    ray.init(
        address="local",
        num_cpus=8,
        num_gpus=CLUSTER_GPUS,
        include_dashboard=False,
        _temp_dir=str(temp),
        # Replicas import the probe backend from this repository's ``tests`` package.
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
    )
    serve.start()
    yield
    # The local cluster goes with Ray (serve.shutdown() would wait 30 s for the
    # replica that can never be placed).
    ray.shutdown()


def gpu_settings(tp: int, **extra: Any) -> Settings:
    return Settings(ENGINE_DEVICE="gpu", VLLM_TENSOR_PARALLEL_SIZE=tp, **extra)


def deploy(settings: Settings, name: str, *, wait: bool = True, **overrides: Any) -> Any:
    options = {**engine_deployment_options(settings), **overrides}
    app = serve.deployment(name="EngineServer", **options)(EngineServer).bind(
        settings, GpuProbeBackend
    )
    return serve._run(app, name=name, route_prefix=None, _blocking=wait)


def fleet(handle: Any, settings: Settings, app_name: str) -> EngineFleet:
    # The controller may take seconds to answer while it places or stops replicas of the
    # other apps here (the ingress's 3 s bound once timed out in CI): the status is what
    # these tests check, not how fast the controller answers.
    client = ServeEngineClient(handle, settings, app_name=app_name, stats_timeout_s=30.0)
    return asyncio.run(client.fleet())


def serve_groups() -> list[dict[str, Any]]:
    return [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_each_rank_gets_its_own_gpu(cluster: None, tp: int) -> None:
    settings = gpu_settings(tp)
    name = f"tp{tp}"
    handle = deploy(settings, name)
    try:
        view = fleet(handle, settings, name)
        (replica,) = view.replicas
        assert replica.state == "RUNNING"
        assert replica.stats is not None
        ranks = {gpu.name: gpu.index for gpu in replica.stats.gpus}
        print(f"TP={tp}: GPU ids per rank {ranks}; groups {serve_groups()}")
        assert sorted(ranks) == [f"rank {r}" for r in range(tp)]
        assert len(set(ranks.values())) == tp  # distinct GPUs
        assert set(ranks.values()) <= set(range(CLUSTER_GPUS))
        groups = serve_groups()
        if tp == 1:
            assert groups == []  # the replica reserves its GPU itself
        else:
            (group,) = groups
            bundles = [group["bundles"][i] for i in sorted(group["bundles"])]
            assert bundles == placement_bundles(tp)
            assert group["strategy"] == "STRICT_PACK"
    finally:
        serve.delete(name)
        wait_for(lambda: serve_groups() == [], timeout_s=60)


def test_too_few_gpus_give_a_clear_status(cluster: None) -> None:
    settings = gpu_settings(8)
    handle = deploy(settings, "tp8", wait=False)
    try:

        def waiting_with_message() -> bool:
            view = fleet(handle, settings, "tp8")
            return bool(view.replicas) and "taken more than" in view.message

        wait_for(waiting_with_message, timeout_s=60, interval_s=1)
        view = fleet(handle, settings, "tp8")
        print(f"status {view.status}; {view.capacity_problem}; Serve: {view.message}")
        assert view.running_stats == []
        assert all(r.state == "STARTING" for r in view.replicas)
        assert view.capacity_problem is not None
        assert "needs 8 GPU(s) on one node" in view.capacity_problem
        assert "at most 4" in view.capacity_problem
        assert '"GPU": 1.0' in view.message  # Serve's own line names the bundles
    finally:
        # A replica waiting for resources it can never get takes long to delete.
        serve.delete("tp8", _blocking=False)


def test_hand_written_bundles_are_refused(cluster: None) -> None:
    settings = gpu_settings(2)
    handle = deploy(
        settings,
        "handwritten",
        wait=False,
        placement_group_bundles=[{"CPU": 1, "GPU": 2}],
    )
    try:

        def failed() -> bool:
            return fleet(handle, settings, "handwritten").status == "DEPLOY_FAILED"

        wait_for(failed, timeout_s=120, interval_s=1)
        message = fleet(handle, settings, "handwritten").message
        print(message[:600])
        assert "placement_group_bundles" in message
        assert "VLLM_TENSOR_PARALLEL_SIZE" in message
    finally:
        serve.delete("handwritten")
