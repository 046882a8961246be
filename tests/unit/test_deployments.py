"""The deployment files match serve_config.yaml: the KubeRay manifest and the TP=2 profile."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from cloudllm_serve.devhost.launcher import profile_settings
from cloudllm_serve.placement import engine_deployment_options
from cloudllm_serve.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
SERVE_CONFIG = REPO / "serve_config.yaml"
RAYSERVICE = REPO / "deployments" / "kuberay-rayservice.yaml"
GPU_TP2 = REPO / "deployments" / "gpu-tp2.yaml"

GPU = "nvidia.com/gpu"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path.name} is not a YAML mapping"
    return data


def cluster() -> dict[str, Any]:
    config: dict[str, Any] = load(RAYSERVICE)["spec"]["rayClusterConfig"]
    return config


def head_container() -> dict[str, Any]:
    containers: list[dict[str, Any]] = cluster()["headGroupSpec"]["template"]["spec"]["containers"]
    (container,) = containers
    return container


def gpu_worker_group() -> dict[str, Any]:
    groups = [
        group
        for group in cluster()["workerGroupSpecs"]
        if any(
            GPU in c.get("resources", {}).get("limits", {})
            for c in group["template"]["spec"]["containers"]
        )
    ]
    assert len(groups) == 1, "expected exactly one GPU worker group"
    group: dict[str, Any] = groups[0]
    return group


def worker_container() -> dict[str, Any]:
    containers: list[dict[str, Any]] = gpu_worker_group()["template"]["spec"]["containers"]
    (container,) = containers
    return container


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


def serve_port(container: dict[str, Any]) -> int:
    (port,) = [p["containerPort"] for p in container["ports"] if p.get("name") == "serve"]
    return int(port)


# --- deployments/kuberay-rayservice.yaml ---------------------------------------------


def test_rayservice_embeds_serve_config() -> None:
    serve_config_v2 = load(RAYSERVICE)["spec"]["serveConfigV2"]
    assert isinstance(serve_config_v2, str), "serveConfigV2 must be a YAML block string"
    assert yaml.safe_load(serve_config_v2) == load(SERVE_CONFIG)


def test_rayservice_kind_and_version() -> None:
    manifest = load(RAYSERVICE)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == "RayService"
    assert manifest["metadata"]["name"]
    assert cluster()["rayVersion"] == ray.__version__


def test_rayservice_autoscales_gpu_workers() -> None:
    assert cluster()["enableInTreeAutoscaling"] is True
    group = gpu_worker_group()
    resources = worker_container()["resources"]
    gpus = int(resources["limits"][GPU])
    assert int(resources["requests"][GPU]) == gpus >= 1
    # Enough GPU pods for the serve config's replicas, each VLLM_TENSOR_PARALLEL_SIZE GPUs
    # on one pod.
    settings = profile_settings(load(SERVE_CONFIG))
    assert gpus >= settings.VLLM_TENSOR_PARALLEL_SIZE
    per_pod = gpus // settings.VLLM_TENSOR_PARALLEL_SIZE
    assert group["minReplicas"] * per_pod >= settings.ENGINE_MIN_REPLICAS
    assert group["maxReplicas"] * per_pod >= settings.ENGINE_MAX_REPLICAS
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_rayservice_head_has_no_gpus() -> None:
    head = cluster()["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert GPU not in head_container().get("resources", {}).get("limits", {})


def test_rayservice_serve_port_is_the_configs_http_port() -> None:
    port = load(SERVE_CONFIG)["http_options"]["port"]
    assert serve_port(head_container()) == port
    assert serve_port(worker_container()) == port


def test_rayservice_containers_get_redis_url() -> None:
    for container in (head_container(), worker_container()):
        url = env_of(container)["REDIS_URL"]
        assert url.startswith("redis://")
        assert url == load_settings({"REDIS_URL": url}).REDIS_URL


# --- deployments/gpu-tp2.yaml --------------------------------------------------------


def test_tp2_profile_packs_two_gpus_per_replica() -> None:
    settings = profile_settings(load(GPU_TP2))
    assert settings.VLLM_TENSOR_PARALLEL_SIZE == 2
    assert settings.ENGINE_DEVICE == "gpu"
    assert settings.LLM_MODEL == "Qwen/Qwen2.5-VL-32B-Instruct"
    assert (settings.ENGINE_MIN_REPLICAS, settings.ENGINE_MAX_REPLICAS) == (1, 2)
    assert settings.INGRESS_REPLICAS == 2
    options = engine_deployment_options(settings)
    bundles = options["placement_group_bundles"]
    assert len(bundles) == 2
    assert all(bundle["GPU"] == 1 for bundle in bundles)
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert options["ray_actor_options"]["num_gpus"] == 0  # the bundles hold the GPUs


def test_tp2_profile_is_serve_config_otherwise() -> None:
    tp2, gpu = load(GPU_TP2), load(SERVE_CONFIG)
    assert tp2["proxy_location"] == gpu["proxy_location"] == "EveryNode"
    assert tp2["http_options"] == gpu["http_options"]
    (tp2_app,), (gpu_app,) = tp2["applications"], gpu["applications"]
    assert tp2_app["import_path"] == gpu_app["import_path"]
    assert tp2_app["runtime_env"]["env_vars"] == gpu_app["runtime_env"]["env_vars"]


def test_rayservice_exports_metrics_on_a_named_port() -> None:
    cluster_spec = cluster()
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    for group in groups:
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
        ports = group["template"]["spec"]["containers"][0]["ports"]
        assert {"containerPort": 8080, "name": "metrics"} in ports
    monitor = load(REPO / "deployments" / "kuberay-podmonitor.yaml")
    assert monitor["kind"] == "PodMonitor"
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_the_cluster_demo_finds_its_profile() -> None:
    from cloudllm_serve.devhost import cluster_demo

    assert cluster_demo.PROFILE.is_file(), cluster_demo.PROFILE
