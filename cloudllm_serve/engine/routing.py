"""Conversation-affinity routing of requests to engine replicas.

Every turn of a conversation should reach the engine replica that served the previous
turn, because that replica's vLLM prefix cache already holds the conversation's
tokens. The ingress records which replica answered each stored turn (in the
conversation's Redis hash) and sends it along as ``preferred_replica``; every ingress
replica therefore routes a conversation the same way, and a replica that joins later
does not take conversations away from the one that has them cached.

Without a recorded replica (a conversation's first turn, or a stateless chat that
resends its history), replicas are ranked for the request's ``affinity_key`` (the
conversation id, or a hash of the chat's opening) by rendezvous hashing (highest
random weight), which needs no shared state and moves only a 1/N share of keys when
replicas come or go.

The preferred replica is the first rank and all the others the second, so Serve tries
the preferred one first and, when it is overloaded (at ``max_ongoing_requests``: a
full batch plus its small waiting room, which Serve learns by probing the replica, not
from a stale cache), sends the request to the least loaded other replica. Requests
without a key, and all requests when ``affinity`` is off, use power-of-two-choices
like Serve's default router.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


def affinity_rank(key: str, replica_id: str) -> int:
    """Rendezvous weight of a replica for a key (higher is preferred)."""
    digest = hashlib.blake2b(f"{key}\0{replica_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _request_field(pending_request: PendingRequest | None, name: str) -> str | None:
    if pending_request is None or not pending_request.args:
        return None
    value = getattr(pending_request.args[0], name, None)
    return value if isinstance(value, str) and value else None


def request_affinity_key(pending_request: PendingRequest | None) -> str | None:
    """The ``affinity_key`` of a ``generate`` call's :class:`GenerationRequest`."""
    return _request_field(pending_request, "affinity_key")


def request_preferred_replica(pending_request: PendingRequest | None) -> str | None:
    """The ``preferred_replica`` of a ``generate`` call's :class:`GenerationRequest`."""
    return _request_field(pending_request, "preferred_replica")


class ConversationAffinityRouter(RequestRouter):
    """Serve request router: conversation affinity, else power of two choices."""

    def initialize_state(self, affinity: bool = True, **_: Any) -> None:
        """Router settings (``request_router_kwargs``)."""
        self._affinity = affinity

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """Ranks of replicas to try, most preferred first."""
        if not candidate_replicas:
            return []
        preferred = self.preferred(candidate_replicas, pending_request)
        if preferred is None:
            return [_two_random(candidate_replicas)]
        others = [r for r in candidate_replicas if r is not preferred]
        return [[preferred], others] if others else [[preferred]]

    def preferred(
        self, candidates: list[RunningReplica], pending_request: PendingRequest | None
    ) -> RunningReplica | None:
        """The replica this request should go to, or ``None`` (no affinity)."""
        if not self._affinity:
            return None
        recorded = request_preferred_replica(pending_request)
        for replica in candidates:
            if recorded is not None and replica.replica_id.unique_id == recorded:
                return replica
        key = request_affinity_key(pending_request)
        if key is None:
            return None
        return max(candidates, key=lambda r: affinity_rank(key, r.replica_id.unique_id))


def _two_random(replicas: list[RunningReplica]) -> list[RunningReplica]:
    if len(replicas) <= 2:
        return random.sample(replicas, len(replicas))
    return random.sample(replicas, 2)
