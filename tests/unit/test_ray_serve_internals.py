"""The Ray Serve internals ``cloudllm_serve/ray_serve_internals.py`` relies on still exist.

Fast and without a cluster: each check looks the private name up in the installed Ray.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import ray

from cloudllm_serve import ray_serve_internals


def _changed(what: str) -> str:
    return (
        f"Ray {ray.__version__} changed {what}: "
        "cloudllm_serve/ray_serve_internals.py must be updated "
        f"(written for Ray {ray_serve_internals.RAY_VERSION_WRITTEN_FOR})"
    )


def _router_class() -> Any:
    from ray.serve._private.request_router.request_router import RequestRouter

    return RequestRouter


def test_fifo_mixin_hand_out_method() -> None:
    from ray.serve.request_router import FIFOMixin

    method = getattr(FIFOMixin, "_fulfill_next_pending_request", None)
    assert method is not None, _changed("FIFOMixin._fulfill_next_pending_request")
    params = list(inspect.signature(method).parameters)
    assert params == ["self", "replica", "request_metadata"], _changed(
        f"FIFOMixin._fulfill_next_pending_request's parameters (now {params})"
    )


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("_get_pending_request_matching_internal_request_id", ["self", "request_metadata"]),
        ("_cancel_routing_task_for_pending_request", ["self", "pending_request"]),
        ("_record_queue_wait_time", ["self", "pending_request"]),
        ("_remove_pending_request_from_indices", ["self", "pending_request"]),
    ],
)
def test_request_router_private_methods(name: str, params: list[str]) -> None:
    method = getattr(_router_class(), name, None)
    assert method is not None, _changed(f"RequestRouter.{name} (gone)")
    found = list(inspect.signature(method).parameters)
    assert found == params, _changed(f"RequestRouter.{name}'s parameters (now {found})")


def test_request_router_pending_queue() -> None:
    source = inspect.getsource(_router_class().__init__)
    assert "self._pending_requests_to_fulfill" in source, _changed(
        "RequestRouter._pending_requests_to_fulfill (no longer set in __init__)"
    )


def test_controller_lookup() -> None:
    from ray.serve import context
    from ray.serve._private.client import ServeControllerClient
    from ray.serve._private.controller import ServeController

    assert callable(getattr(context, "_get_global_client", None)), _changed(
        "ray.serve.context._get_global_client"
    )
    assert "self._controller" in inspect.getsource(ServeControllerClient.__init__), _changed(
        "ServeControllerClient._controller"
    )
    assert hasattr(ServeController, "get_serve_instance_details"), _changed(
        "ServeController.get_serve_instance_details"
    )


def test_serve_namespace() -> None:
    from ray.serve._private.constants import SERVE_NAMESPACE

    assert SERVE_NAMESPACE == "serve", _changed(f"SERVE_NAMESPACE (now {SERVE_NAMESPACE!r})")


def test_replica_actor_name_format() -> None:
    from ray.serve._private.common import DeploymentID, ReplicaID

    replica = ReplicaID("abc123", DeploymentID(name="engine", app_name="app"))
    name = replica.to_full_id_str()
    message = f"The actor died. name: {name}, pid: 1"
    assert ray_serve_internals.replica_id_in_error(RuntimeError(message)) == "abc123", _changed(
        f"a replica's actor name (now {name!r})"
    )
