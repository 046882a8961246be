"""Everything this app uses from Ray Serve's private or alpha surface, in one place.

Written for Ray 2.60.0. ``tests/unit/test_ray_serve_internals.py`` checks that the
installed Ray still has each name below and fails with "Ray <version> changed X" when it
does not; update this module then. Per item, why a public API does not do:

- :class:`AvoidingFIFOMixin` overrides ``FIFOMixin._fulfill_next_pending_request`` (the
  mixin is public but alpha; the method is private) and calls five private members of
  ``RequestRouter``: ``_pending_requests_to_fulfill``,
  ``_get_pending_request_matching_internal_request_id``,
  ``_cancel_routing_task_for_pending_request``, ``_record_queue_wait_time``,
  ``_remove_pending_request_from_indices``. The public router API
  (``choose_replicas``) ranks replicas for one request; which waiting request a free
  replica goes to is decided only in this private method.
- :func:`serve_instance_details` asks Serve's controller through
  ``ray.serve.context._get_global_client()._controller``: the public ``serve.status()``
  is blocking and carries no replica ids, actor names, pids or nodes.
- :data:`SERVE_NAMESPACE` comes from ``ray.serve._private.constants``: Ray exports no
  public name for the namespace replica actors are named in.
- :func:`replica_id_in_error` parses a ``RayActorError``'s text: the public exception
  types (``ray.exceptions.ActorDiedError``, ``ActorUnavailableError``) carry an actor id
  but not the Serve replica id, which only appears in the actor's name in the message.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from ray.serve._private.constants import SERVE_NAMESPACE
from ray.serve.request_router import FIFOMixin, PendingRequest, RunningReplica

if TYPE_CHECKING:
    from ray.serve._private.common import RequestMetadata

__all__ = [
    "RAY_VERSION_WRITTEN_FOR",
    "SERVE_NAMESPACE",
    "AvoidingFIFOMixin",
    "replica_id_in_error",
    "serve_instance_details",
]

#: The Ray version this module was written and checked against.
RAY_VERSION_WRITTEN_FOR = "2.60.0"

#: A Serve replica's actor name in Ray's messages; group 1 is the replica's id.
_REPLICA_ACTOR_NAME = re.compile(r"SERVE_REPLICA::[^\s#]+#[^\s#]+#(\w+)")


class AvoidingFIFOMixin(FIFOMixin):
    """Serve's first-come-first-served hand-out, skipping requests that refuse a replica.

    Subclasses say which waiting request refuses which replica in :meth:`refuses`.
    """

    def refuses(self, pending_request: PendingRequest, replica_id: str) -> bool:
        """Whether ``pending_request`` must not be given the replica ``replica_id``."""
        return False

    def _fulfill_next_pending_request(
        self, replica: RunningReplica, request_metadata: RequestMetadata | None = None
    ) -> None:
        """Give ``replica`` to the oldest waiting request that does not refuse it.

        When every waiting request refuses it, the request it was found for takes it
        (that request's ranks fell back to a refused replica because no other is left).
        """
        replica_id = replica.replica_id.unique_id
        waiting = self._pending_requests_to_fulfill
        while waiting and waiting[0].future.done():
            waiting.popleft()
        chosen = next(
            (
                request
                for request in waiting
                if not request.future.done() and not self.refuses(request, replica_id)
            ),
            None,
        )
        if chosen is None:
            # Defined on RequestRouter, which every user of this mixin also subclasses.
            match = self._get_pending_request_matching_internal_request_id  # type: ignore[attr-defined]
            chosen = match(request_metadata)
            if chosen is None:
                return
        self._cancel_routing_task_for_pending_request(chosen)
        self._record_queue_wait_time(chosen)
        chosen.future.set_result(replica)
        self._remove_pending_request_from_indices(chosen)


async def serve_instance_details() -> dict[str, Any] | None:
    """Serve's controller's instance details (applications, deployments, replicas).

    ``None`` when this process is not connected to Ray or Serve.
    """
    import ray
    from ray.serve.context import _get_global_client

    if not ray.is_initialized():
        # Serve's client would start a local Ray instance here, blocking the loop.
        return None
    client = _get_global_client()
    if client is None:
        return None
    details: dict[str, Any] = await client._controller.get_serve_instance_details.remote()
    return details


def replica_id_in_error(error: BaseException) -> str:
    """The Serve replica id named in a ``RayActorError``'s message, else ``""``."""
    named = _REPLICA_ACTOR_NAME.search(str(error))
    return named.group(1) if named else ""
