"""The checked-in Serve configs are valid for Ray and for our settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from cloudllm_serve.app import ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT
from cloudllm_serve.autoscaling import POLICY_PATH
from cloudllm_serve.devhost.launcher import profile_settings
from cloudllm_serve.errors import SettingsError
from cloudllm_serve.placement import refused_overrides
from cloudllm_serve.settings import Settings

REPO = Path(__file__).resolve().parents[2]
CONFIGS = [
    REPO / "serve_config.yaml",
    *sorted(  # deployments/ also holds Kubernetes manifests (a `kind`), not Serve configs
        path
        for path in (REPO / "deployments").glob("*.yaml")
        if "kind" not in yaml.safe_load(path.read_text())
    ),
]


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
    # Refused demand scales the engines only where the config names the policy.
    assert (app.autoscaling_policy or {}).get("policy_function") == POLICY_PATH
    assert {d.name for d in app.deployments} <= {ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT}
    profile_settings(raw)  # valid settings, and no engine option the settings derive
    for deployment in app.deployments:
        assert not refused_overrides(deployment.model_dump(exclude_unset=True))


def test_gpu_config_serves_the_seed_model_with_autoscaling() -> None:
    raw = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    settings = profile_settings(raw)
    assert settings.LLM_MODEL == "Qwen/Qwen2.5-VL-32B-Instruct"
    assert settings.ENGINE_DEVICE == "gpu"
    assert 1 <= settings.ENGINE_MIN_REPLICAS < settings.ENGINE_MAX_REPLICAS
    assert settings.INGRESS_REPLICAS >= 2
    assert not settings.SERVE_DIRECT_INGRESS
    assert raw["http_options"]["port"] == 8001


def test_engine_options_in_a_config_are_refused() -> None:
    raw = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    engine = {"name": ENGINE_DEPLOYMENT, "placement_group_bundles": [{"GPU": 2}]}
    raw["applications"][0]["deployments"] = [engine]
    with pytest.raises(SettingsError, match="placement_group_bundles"):
        profile_settings(raw)


def test_gpu_config_carries_the_latency_tuning() -> None:
    from cloudllm_serve.devhost.launcher import LATENCY_TUNING

    raw = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    env_vars = raw["applications"][0]["runtime_env"]["env_vars"]
    assert {k: env_vars[k] for k in LATENCY_TUNING} == LATENCY_TUNING
