"""The application's autoscaling policy on Serve's own context objects (no cluster).

What Serve hands a policy is built here as the controller builds it; the decisions are
then bounded by each deployment's ``autoscaling_config`` (Serve's wrapper, also run here).
"""

from __future__ import annotations

from typing import Any

import pytest
from ray.serve._private.common import DeploymentID
from ray.serve.autoscaling_policy import _apply_app_level_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from cloudllm_serve.app import build_application
from cloudllm_serve.autoscaling import REFUSED_DEMAND_METRIC, scale_on_demand
from cloudllm_serve.placement import (
    ENGINE_DEPLOYMENT,
    INGRESS_DEPLOYMENT,
    autoscaling_config,
)
from cloudllm_serve.settings import Settings

ENGINE = DeploymentID(name=ENGINE_DEPLOYMENT, app_name="cloudllm")
INGRESS = DeploymentID(name=INGRESS_DEPLOYMENT, app_name="cloudllm")


def settings() -> Settings:
    return Settings(ENGINE_MIN_REPLICAS=1, ENGINE_MAX_REPLICAS=8, ENGINE_UPSCALE_DELAY_S=0)


def context(
    deployment: DeploymentID,
    config: dict[str, Any],
    *,
    replicas: int,
    in_flight: float = 0.0,
    refused: list[float] | None = None,
) -> AutoscalingContext:
    """The context Serve's controller gives a policy for ``deployment`` now."""
    autoscaling = AutoscalingConfig(**config)
    metrics = {REFUSED_DEMAND_METRIC: {f"r{i}": v for i, v in enumerate(refused or [])}}
    return AutoscalingContext(
        deployment_id=deployment,
        deployment_name=deployment.name,
        app_name=deployment.app_name,
        current_num_replicas=replicas,
        target_num_replicas=replicas,
        running_replicas=[],
        total_num_requests=in_flight,
        total_queued_requests=0.0,
        aggregated_metrics=metrics if refused is not None else {},
        raw_metrics={},
        capacity_adjusted_min_replicas=autoscaling.min_replicas,
        capacity_adjusted_max_replicas=autoscaling.max_replicas,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=None,
        config=autoscaling,
    )


def decide(in_flight: float, refused: list[float], engines: int = 1) -> dict[DeploymentID, int]:
    """Serve's decisions: its app-level wrapper around our policy, then each bound."""
    ingress_config = {"min_replicas": 2, "max_replicas": 2}
    contexts = {
        ENGINE: context(
            ENGINE, autoscaling_config(settings()), replicas=engines, in_flight=in_flight
        ),
        INGRESS: context(INGRESS, ingress_config, replicas=2, refused=refused),
    }
    decisions, _ = _apply_app_level_autoscaling_config(scale_on_demand)(contexts)
    return {
        deployment: max(
            contexts[deployment].capacity_adjusted_min_replicas,
            min(contexts[deployment].capacity_adjusted_max_replicas, replicas),
        )
        for deployment, replicas in decisions.items()
    }


def test_a_refused_flood_adds_engine_replicas() -> None:
    slots = settings().VLLM_MAX_NUM_SEQS
    # A full engine and nothing refused: Serve's own policy keeps one replica.
    assert decide(in_flight=slots, refused=[0.0, 0.0])[ENGINE] == 1
    # The same engine while the two ingress replicas refuse 3 batches' worth.
    assert decide(in_flight=slots, refused=[2.0 * slots, 1.0 * slots])[ENGINE] == 4
    # A flood larger than the bounds: the deployment's ENGINE_MAX_REPLICAS.
    assert decide(in_flight=slots, refused=[100.0 * slots, 0.0])[ENGINE] == 8


def test_without_refusals_the_default_policy_decides() -> None:
    slots = settings().VLLM_MAX_NUM_SEQS
    assert decide(in_flight=3 * slots, refused=[0.0, 0.0])[ENGINE] == 3
    assert decide(in_flight=3 * slots, refused=[])[ENGINE] == 3


@pytest.mark.parametrize("refused", [[0.0, 0.0], [500.0, 500.0]])
def test_the_ingress_keeps_its_fixed_number(refused: list[float]) -> None:
    assert decide(in_flight=0.0, refused=refused)[INGRESS] == 2


def test_the_ingress_reports_the_metric_under_fixed_bounds() -> None:
    app = build_application(Settings(INGRESS_REPLICAS=3))
    ingress = app._bound_deployment
    config = ingress._deployment_config.autoscaling_config
    assert (config.min_replicas, config.max_replicas) == (3, 3)
    assert callable(getattr(ingress.func_or_class, "record_autoscaling_stats", None))
