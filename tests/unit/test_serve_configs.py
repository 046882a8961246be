"""The checked-in Serve configs are valid for Ray and for our settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from cloudllm_serve.app import ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT
from cloudllm_serve.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
CONFIGS = [REPO / "serve_config.yaml", *sorted((REPO / "deployments").glob("*.yaml"))]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_valid(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert app.import_path == "cloudllm_serve.app:build_app"
    assert {d.name for d in app.deployments} <= {ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT}
    load_settings(app.args)  # the args are valid settings
    for deployment in app.deployments:
        assert "placement_group_bundles" not in deployment.model_fields_set, (
            "bundles are derived from VLLM_TENSOR_PARALLEL_SIZE in code"
        )


def test_gpu_config_serves_the_seed_model_with_autoscaling() -> None:
    raw = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    app = raw["applications"][0]
    settings = load_settings(app["args"])
    assert settings.LLM_MODEL == "Qwen/Qwen2.5-VL-32B-Instruct"
    assert settings.ENGINE_DEVICE == "gpu"
    (engine,) = [d for d in app["deployments"] if d["name"] == ENGINE_DEPLOYMENT]
    autoscaling = engine["autoscaling_config"]
    assert autoscaling["min_replicas"] >= 1
    assert autoscaling["max_replicas"] > autoscaling["min_replicas"]
    assert raw["http_options"]["port"] == 8001


def test_gpu_config_carries_the_latency_tuning() -> None:
    from cloudllm_serve.launcher import LATENCY_TUNING

    raw = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    env_vars = raw["applications"][0]["runtime_env"]["env_vars"]
    assert {k: env_vars[k] for k in LATENCY_TUNING} == LATENCY_TUNING
