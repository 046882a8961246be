"""Serve options of the engine deployment, derived from the settings (never hand-written).

Resources:

* ``ENGINE_DEVICE=cpu``: half a CPU (see ``CPU_REPLICA_CPUS``), no GPU; the simulated
  engine (``LLM_MODEL=sim``) ``SIM_REPLICA_CPUS``.
* GPU, tensor parallel 1: the replica itself holds the GPU.
* GPU, tensor parallel N > 1: a placement group with one ``{GPU: 1}`` bundle per rank
  and the replica's CPU in bundle 0 (``ENGINE_PLACEMENT_STRATEGY``, ``STRICT_PACK`` by
  default). vLLM's Ray executor finds the replica's placement group and puts one
  worker on each bundle, so the replica itself reserves no GPU.
* ``ENGINE_NODE_RESOURCE``: one unit of that custom resource too (in bundle 0 with a
  placement group), so replicas run only on the nodes started with it.

Scaling: a replica is full at ``VLLM_MAX_NUM_SEQS`` sequences, so that is the
autoscaler's target of ongoing requests (queued ones included) per replica.
``max_ongoing_requests`` is twice that: a full batch running and a full batch waiting
in vLLM's own scheduler queue, which moves a waiting request into a freed batch slot at
the next engine step, at no cost to the engine (see ``docs/performance.md``,
"Saturation"). Past that, requests wait at the caller, at most
``ENGINE_MAX_QUEUED_REQUESTS`` per ingress replica; the next one is refused at once
with ``OVERLOAD_STATUS_CODE`` and ``Retry-After``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from cloudllm_serve.settings import Settings

#: The engine deployment's name in the application (configs' ``deployments`` entries).
ENGINE_DEPLOYMENT = "EngineServer"
#: The ingress deployment's name.
INGRESS_DEPLOYMENT = "Ingress"

REPLICA_CPUS = 1.0
#: On CPU the reservation is bookkeeping only (vLLM binds its own threads to the
#: cores), and half a core lets two engine replicas and two ingress replicas be
#: placed on a 2-core machine.
CPU_REPLICA_CPUS = 0.5

#: How often Serve's controller calls each engine replica's ``record_routing_stats``.
#: The ingress calls that method directly for live stats (``/health``); the controller's
#: copy is read by nothing (the router relies on Serve's queue probes), yet each new copy
#: (uptime and counters always change) is broadcast to every handle. So: rarely.
CONTROLLER_STATS_PERIOD_S = 3600.0

#: Import path of the request router (must be importable where handles live).
ROUTER_CLASS = "cloudllm_serve.engine.routing:ConversationAffinityRouter"

#: Deployment options computed here. A Serve config that sets one of them on the
#: engine deployment would silently replace a setting, so it is refused.
DERIVED_OPTIONS = (
    "num_replicas",
    "autoscaling_config",
    "max_ongoing_requests",
    "max_queued_requests",
    "backpressure_config",
    "placement_group_bundles",
    "placement_group_strategy",
    "ray_actor_options",
    "graceful_shutdown_timeout_s",
    "request_router_config",
)


def placement_bundles(tensor_parallel_size: int) -> list[dict[str, float]]:
    """One ``{GPU: 1}`` bundle per rank; bundle 0 also holds the replica's CPU."""
    if tensor_parallel_size < 1:
        raise ValueError("tensor_parallel_size must be at least 1")
    return [{"CPU": REPLICA_CPUS, "GPU": 1.0}] + [{"GPU": 1.0}] * (tensor_parallel_size - 1)


def expected_bundles(settings: Settings) -> list[dict[str, float]] | None:
    """The placement group an engine replica must run in (``None``: no group)."""
    if settings.ENGINE_DEVICE == "gpu" and settings.VLLM_TENSOR_PARALLEL_SIZE > 1:
        bundles = placement_bundles(settings.VLLM_TENSOR_PARALLEL_SIZE)
        bundles[0].update(node_resources(settings.ENGINE_NODE_RESOURCE))
        return bundles
    return None


def node_resources(name: str) -> dict[str, float]:
    """One unit of the custom resource ``name`` (none when empty): where a replica may run."""
    return {name: 1.0} if name else {}


def max_ongoing_requests(settings: Settings) -> int:
    """Requests one engine replica takes: a full batch running, a full batch waiting.

    Waiting in vLLM's scheduler queue refills every freed batch slot at the next engine
    step, even when a whole batch finishes at once; a request waiting at the caller's
    handle joins only when Serve's router retries (exponential backoff, up to 0.5 s).
    One batch of waiting room is enough for the handle to catch up, and keeps the share
    of requests committed to one replica (they cannot move to a replica added later)
    at one batch.
    """
    return 2 * settings.VLLM_MAX_NUM_SEQS


def autoscaling_config(settings: Settings) -> dict[str, Any]:
    """Serve's ``autoscaling_config``: one replica per ``VLLM_MAX_NUM_SEQS`` requests."""
    return {
        "min_replicas": settings.ENGINE_MIN_REPLICAS,
        "initial_replicas": settings.ENGINE_MIN_REPLICAS,
        "max_replicas": settings.ENGINE_MAX_REPLICAS,
        "target_ongoing_requests": settings.VLLM_MAX_NUM_SEQS,
        "upscale_delay_s": settings.ENGINE_UPSCALE_DELAY_S,
        "downscale_delay_s": settings.ENGINE_DOWNSCALE_DELAY_S,
        "look_back_period_s": settings.ENGINE_AUTOSCALING_LOOK_BACK_S,
        # Serve wants several load reports inside the look-back window.
        "metrics_interval_s": min(10.0, settings.ENGINE_AUTOSCALING_LOOK_BACK_S / 4),
    }


def resource_options(settings: Settings) -> dict[str, Any]:
    """Actor resources and, for tensor parallelism, the placement group."""
    bundles = expected_bundles(settings)
    if bundles is not None:
        return {
            "ray_actor_options": {"num_cpus": REPLICA_CPUS, "num_gpus": 0},
            "placement_group_bundles": bundles,
            "placement_group_strategy": settings.ENGINE_PLACEMENT_STRATEGY,
        }
    custom = node_resources(settings.ENGINE_NODE_RESOURCE)
    if settings.ENGINE_DEVICE == "cpu":
        cpus = settings.SIM_REPLICA_CPUS if settings.simulated else CPU_REPLICA_CPUS
        options: dict[str, Any] = {"num_cpus": cpus, "num_gpus": 0}
    else:
        options = {"num_cpus": REPLICA_CPUS, "num_gpus": 1}
    if custom:
        options["resources"] = custom
    return {"ray_actor_options": options}


def engine_deployment_options(settings: Settings) -> dict[str, Any]:
    """Serve ``.options()`` for the engine deployment (resources, scaling, queue)."""
    from ray.serve.config import BackpressureConfig, RequestRouterConfig

    backpressure: dict[str, Any] = {
        "status_code": settings.OVERLOAD_STATUS_CODE,
        "retry_after_s": settings.OVERLOAD_RETRY_AFTER_S,
    }
    router: dict[str, Any] = {
        "request_router_class": ROUTER_CLASS,
        "request_router_kwargs": {
            "affinity": settings.ROUTING_AFFINITY,
            "batch_size": settings.VLLM_MAX_NUM_SEQS,
            "load_bound": settings.ROUTING_LOAD_BOUND,
        },
        "request_routing_stats_period_s": CONTROLLER_STATS_PERIOD_S,
    }
    return {
        **resource_options(settings),
        "autoscaling_config": autoscaling_config(settings),
        "max_ongoing_requests": max_ongoing_requests(settings),
        "max_queued_requests": settings.ENGINE_MAX_QUEUED_REQUESTS,
        "backpressure_config": BackpressureConfig(**backpressure),
        "graceful_shutdown_timeout_s": settings.ENGINE_GRACEFUL_SHUTDOWN_S,
        "request_router_config": RequestRouterConfig(**router),
    }


def refused_overrides(deployment: Mapping[str, Any]) -> list[str]:
    """The options a Serve config's engine deployment entry sets that are derived here."""
    return [name for name in DERIVED_OPTIONS if name in deployment]


def bundle_mismatch(settings: Settings, actual: list[dict[str, float]] | None) -> str | None:
    """Why the replica's actual placement group is not the derived one, or ``None``."""
    expected = expected_bundles(settings)
    if _normalise(actual) == _normalise(expected):
        return None
    return (
        f"the engine replica runs with placement group bundles {actual}, but "
        f"VLLM_TENSOR_PARALLEL_SIZE={settings.VLLM_TENSOR_PARALLEL_SIZE} "
        f"(ENGINE_DEVICE={settings.ENGINE_DEVICE}) derives {expected}. Bundles are computed "
        "in code: remove placement_group_bundles (and placement_group_strategy) from the "
        "EngineServer entry of the Serve config and set VLLM_TENSOR_PARALLEL_SIZE instead"
    )


def _normalise(bundles: list[dict[str, float]] | None) -> list[dict[str, float]] | None:
    if not bundles:
        return None
    return [{k: float(v) for k, v in b.items() if float(v)} for b in bundles]


def capacity_problem(settings: Settings, nodes: Iterable[Mapping[str, float]]) -> str | None:
    """Why no engine replica can be placed on nodes with these resources, or ``None``.

    With ``STRICT_PACK`` (and for tensor parallel 1) all of a replica's GPUs must be
    on one node; with the other strategies they may be spread. With
    ``ENGINE_NODE_RESOURCE``, a live node must offer that resource.
    """
    nodes = list(nodes)
    resource = settings.ENGINE_NODE_RESOURCE
    if resource and not any(node.get(resource, 0) >= 1 for node in nodes):
        return (
            f"an engine replica needs the custom resource {resource} "
            f"(ENGINE_NODE_RESOURCE), which no live node offers; replicas wait until a node "
            f"started with it (ray start --resources '{{\"{resource}\": N}}') joins"
        )
    if settings.ENGINE_DEVICE != "gpu":
        return None
    needed = settings.VLLM_TENSOR_PARALLEL_SIZE
    per_node = [int(node.get("GPU", 0)) for node in nodes]
    one_node = needed == 1 or settings.ENGINE_PLACEMENT_STRATEGY == "STRICT_PACK"
    available = max(per_node, default=0) if one_node else sum(per_node)
    if available >= needed:
        return None
    where = "on one node" if one_node else "in the cluster"
    return (
        f"an engine replica needs {needed} GPU(s) {where} "
        f"(VLLM_TENSOR_PARALLEL_SIZE={needed}, ENGINE_PLACEMENT_STRATEGY="
        f"{settings.ENGINE_PLACEMENT_STRATEGY}), but the cluster has at most {available} "
        f"(GPUs per node: {per_node or [0]}); replicas wait until GPUs are added"
    )


def cluster_capacity_problem(settings: Settings) -> str | None:
    """:func:`capacity_problem` for the connected Ray cluster's live nodes (blocking)."""
    import ray

    if not ray.is_initialized():
        return None
    alive = [node for node in ray.nodes() if node.get("Alive")]  # type: ignore[no-untyped-call]
    nodes = [node.get("Resources", {}) for node in alive]
    return capacity_problem(settings, nodes)
