"""The Serve application builder that ``serve_config.yaml`` points at.

``import_path: cloudllm_serve.app:build_app``. ``args`` in the config are settings
(the same names as the environment variables) that replace the built-in defaults;
an environment variable of the same name still wins.
Settings are validated here, so a bad value stops ``serve run`` before any replica
starts, with a message naming the variable.
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve
from ray.serve import Application

from cloudllm_serve.engine.server import EngineServer
from cloudllm_serve.engine.vllm_engine import check_engine_kwargs
from cloudllm_serve.ingress.deployment import Ingress
from cloudllm_serve.keys import KeyRegistry
from cloudllm_serve.placement import (
    ENGINE_DEPLOYMENT,
    INGRESS_DEPLOYMENT,
    cluster_capacity_problem,
    engine_deployment_options,
    node_resources,
)
from cloudllm_serve.settings import Settings, load_settings

logger = logging.getLogger("ray.serve")


def build_application(settings: Settings) -> Application:
    """The two-deployment application for already validated ``settings``.

    The key file is read here too, so a bad one stops ``serve run`` before any replica
    starts.
    """
    warn_if_engines_cannot_be_placed(settings)
    check_engine_kwargs(settings)
    KeyRegistry(settings)
    warn_if_open(settings)
    engine = serve.deployment(name=ENGINE_DEPLOYMENT, **engine_deployment_options(settings))(
        EngineServer
    ).bind(settings)
    ingress = serve.deployment(
        name=INGRESS_DEPLOYMENT,
        # A fixed number of replicas, given as autoscaling bounds: only a deployment with
        # an autoscaling config reports custom metrics, and the ingress reports the demand
        # it refused, which scales the engines (cloudllm_serve.autoscaling).
        autoscaling_config={
            "min_replicas": settings.INGRESS_REPLICAS,
            "max_replicas": settings.INGRESS_REPLICAS,
            "metrics_interval_s": 2.0,
            "look_back_period_s": 10.0,
        },
        max_ongoing_requests=settings.INGRESS_MAX_ONGOING_REQUESTS,
        # A stopping ingress replica waits for the generations it is streaming, as long
        # as the engine replicas let theirs finish.
        graceful_shutdown_timeout_s=settings.ENGINE_GRACEFUL_SHUTDOWN_S,
        ray_actor_options={
            "num_cpus": 0.25,
            "resources": node_resources(settings.INGRESS_NODE_RESOURCE),
        },
    )(Ingress)
    application: Application = ingress.bind(engine, settings)
    return application


def warn_if_engines_cannot_be_placed(settings: Settings) -> None:
    """Log a clear line when the connected cluster has too few GPUs for one replica."""
    problem = cluster_capacity_problem(settings)
    if problem:
        logger.warning("%s: %s", ENGINE_DEPLOYMENT, problem)


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def warn_if_open(settings: Settings) -> None:
    """Log a warning when no key is configured and the port is reachable from outside."""
    if not settings.auth_enabled and settings.LLM_HOST not in LOOPBACK_HOSTS:
        logger.warning(
            "no API key is configured (API_KEYS_FILE or API_KEYS) and the service listens on "
            "%s: anyone who reaches port %d can read and delete every conversation "
            "(docs/security.md)",
            settings.LLM_HOST,
            settings.LLM_PORT,
        )


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Serve's application builder: ``args`` as defaults, the environment on top."""
    return build_application(load_settings(args or {}))
