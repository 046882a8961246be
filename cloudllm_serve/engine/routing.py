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

The preferred replica is skipped while it is busy: when its queue (as this router
last saw it) holds ``full_at`` (``VLLM_MAX_NUM_SEQS``) requests or more, the request
goes to the least loaded other replica instead, so affinity never queues a turn
behind a full batch while another replica has room. Requests without a key, and all
requests when ``affinity`` is off, use power-of-two-choices like Serve's default.
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

    def initialize_state(self, affinity: bool = True, full_at: int = 16, **_: Any) -> None:
        """Router settings (``request_router_kwargs``)."""
        self._affinity = affinity
        self._full_at = max(1, int(full_at))

    def _queue_len(self, replica: RunningReplica) -> int | None:
        return self.replica_queue_len_cache.get(replica.replica_id)

    def _busy(self, replica: RunningReplica) -> bool:
        queue_len = self._queue_len(replica)
        return queue_len is not None and queue_len >= self._full_at

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """Ranks of replicas to try, most preferred first."""
        if not candidate_replicas:
            return []
        if not self._affinity or len(candidate_replicas) == 1:
            return [_two_random(candidate_replicas)]
        key = request_affinity_key(pending_request)
        recorded = request_preferred_replica(pending_request)
        ranked = candidate_replicas
        if key is not None:
            ranked = sorted(
                candidate_replicas,
                key=lambda r: affinity_rank(key, r.replica_id.unique_id),
                reverse=True,
            )
        ranked = sorted(ranked, key=lambda r: r.replica_id.unique_id != recorded)
        if key is None and recorded not in {r.replica_id.unique_id for r in ranked}:
            return [_two_random(candidate_replicas)]
        preferred, others = ranked[0], ranked[1:]
        if not self._busy(preferred):
            return [[preferred], others]
        free = [r for r in others if not self._busy(r)]
        return [free, [preferred]] if free else [others, [preferred]]


def _two_random(replicas: list[RunningReplica]) -> list[RunningReplica]:
    if len(replicas) <= 2:
        return random.sample(replicas, len(replicas))
    return random.sample(replicas, 2)
