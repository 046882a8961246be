"""The application's autoscaling policy: engines scale on the demand the ingress refused too.

Serve's default policy scales the engine deployment on its requests in flight (running
plus queued at the handles), one replica per ``target_ongoing_requests``
(``VLLM_MAX_NUM_SEQS``). Deadline admission (:mod:`cloudllm_serve.ingress.admission`)
refuses at once the requests the engines cannot finish in time, so during a flood those
never reach a handle queue: the default policy would see a full but not overflowing
fleet and add nothing, however many clients are being turned away.

Each ingress replica therefore reports, as a Serve custom autoscaling metric
(``record_autoscaling_stats``), the requests it refused within the last
:data:`~cloudllm_serve.ingress.admission.DEMAND_WINDOW_S` seconds; this application-level
policy adds them to the engines' requests in flight, as if they were waiting. A refused
flood so scales the engines up to ``ENGINE_MAX_REPLICAS``; once refusals stop, they drop
out of the count within that window and the engine deployment's own delays
(``ENGINE_DOWNSCALE_DELAY_S``) bring it back down. Serve applies each deployment's
``autoscaling_config`` (bounds, delays, factors) to what this policy returns.

The Serve config names it per application::

    autoscaling_policy:
      policy_function: cloudllm_serve.autoscaling:scale_on_demand

Without it Serve falls back to each deployment's own (default) policy: everything works,
but refused demand adds no engine. Ray 2.60 documents application-level policies as
under development (the config field's description); ``tests/unit/test_autoscaling_policy.py``
runs this policy inside Serve's own wrapper, so a change there shows.
"""

from __future__ import annotations

from typing import Any

from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy
from ray.serve.config import AutoscalingContext

from cloudllm_serve.placement import ENGINE_DEPLOYMENT, INGRESS_DEPLOYMENT

#: Serve's key for a deployment (its ``DeploymentID``, kept opaque here).
DeploymentID = Any

#: The custom metric the ingress replicas report (refused requests, recent window).
REFUSED_DEMAND_METRIC = "refused_requests"
#: Import path of :func:`scale_on_demand`, as the Serve configs name it.
POLICY_PATH = "cloudllm_serve.autoscaling:scale_on_demand"


def refused_demand(contexts: dict[DeploymentID, AutoscalingContext]) -> float:
    """The requests the ingress replicas refused lately, summed over the replicas."""
    total = 0.0
    for context in contexts.values():
        if context.deployment_name != INGRESS_DEPLOYMENT:
            continue
        per_replica = (context.aggregated_metrics or {}).get(REFUSED_DEMAND_METRIC) or {}
        total += sum(per_replica.values())
    return total


def engine_replicas(context: AutoscalingContext, refused: float) -> float:
    """The engine replicas for its requests in flight plus ``refused`` ones."""
    if context.current_num_replicas == 0 or not refused or context.config is None:
        desired, _ = replica_queue_length_autoscaling_policy(context)
        return float(desired)
    target = float(context.config.get_target_ongoing_requests())
    return (float(context.total_num_requests) + refused) / target


def scale_on_demand(
    contexts: dict[DeploymentID, AutoscalingContext],
) -> tuple[dict[DeploymentID, float], dict[DeploymentID, dict[str, Any]]]:
    """Serve's application-level policy: each deployment's replicas (see the module doc).

    The engine deployment counts the refused demand; every other deployment gets Serve's
    default policy (the ingress's bounds pin it to ``INGRESS_REPLICAS``).
    """
    refused = refused_demand(contexts)
    decisions: dict[DeploymentID, float] = {}
    for deployment_id, context in contexts.items():
        if context.deployment_name == ENGINE_DEPLOYMENT:
            decisions[deployment_id] = engine_replicas(context, refused)
        else:
            decisions[deployment_id], _ = replica_queue_length_autoscaling_policy(context)
    return decisions, {}
