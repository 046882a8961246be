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

A conversation much hotter than the rest would pile onto its replica, so the preferred
replica's load is bounded (consistent hashing with bounded loads, Mirrokni, Thorup and
Zadeh 2018): when it carries at least ``ROUTING_LOAD_BOUND`` times the mean ongoing
requests (this one counted), the request goes to the next replica in the key's
rendezvous order that does not; that replica answers, is recorded, and keeps the
conversation from then on.

The preferred replica is the first rank, and all the others the second, while the
replica has a free batch slot: fewer ongoing requests than ``batch_size``
(``VLLM_MAX_NUM_SEQS``). Once its batch is full, all replicas form one rank with the
preferred one first, and Serve takes the least loaded: a request waits in a busy
replica's vLLM queue only when no other replica is less busy. "Full" is never judged
from Serve's queue-length cache alone: with several ingress replicas, each cache counts
only its own requests since its last look, so it can overstate a replica's load and
send turns away from an idle replica. A cached
"full" (or over the load bound) is checked with one probe of the replica before the
request goes elsewhere.
Requests without a key, and all requests when ``affinity`` is off, use
power-of-two-choices like Serve's default router. A request retried because an engine
died under it (``avoid_replicas``) passes over that replica while another one is there.

When no replica has room (each is at ``max_ongoing_requests``), Serve retries with
exponential backoff, and waiting requests are served first come, first served
(:class:`~ray.serve.request_router.FIFOMixin`), as with Serve's default router, except
that a replica never goes to a waiting request that avoids it. The
backoff has to be asked for (``routing_context.should_backoff``; Serve's own routers set
it in their locality step): without it every waiting request's routing task probed the
replicas' queue lengths back to back, hundreds of RPCs a second, and that CPU came out
of the engine (``docs/performance.md``, "Saturation").
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from cloudllm_serve.ray_serve_internals import AvoidingFIFOMixin

#: A preferred replica keeps its requests while its load stays under this many times the
#: mean (``ROUTING_LOAD_BOUND``).
LOAD_BOUND = 2.0

#: How long the router waits for a replica's answer to "how many requests do you have?"
#: (Serve's own first deadline for the same probe).
PROBE_DEADLINE_S = 0.1


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


def request_avoided_replicas(pending_request: PendingRequest | None) -> tuple[str, ...]:
    """The ``avoid_replicas`` of a request: replicas whose engine died under a try of it."""
    if pending_request is None or not pending_request.args:
        return ()
    avoided = getattr(pending_request.args[0], "avoid_replicas", ())
    return tuple(avoided) if isinstance(avoided, tuple) else ()


def without_avoided(
    candidates: list[RunningReplica], pending_request: PendingRequest | None
) -> list[RunningReplica]:
    """``candidates`` less the request's avoided replicas, unless that leaves none."""
    avoided = request_avoided_replicas(pending_request)
    if not avoided:
        return candidates
    kept = [r for r in candidates if r.replica_id.unique_id not in avoided]
    return kept or candidates


class ConversationAffinityRouter(AvoidingFIFOMixin, RequestRouter):
    """Serve request router: conversation affinity, else power of two choices."""

    def refuses(self, pending_request: PendingRequest, replica_id: str) -> bool:
        """A request retried because its engine died on a replica refuses that replica.

        Serve's :class:`FIFOMixin` gives a free replica to the oldest waiting request,
        whichever request's routing task found it; without this, such a request would be
        sent straight back to the replica that failed it.
        """
        return replica_id in request_avoided_replicas(pending_request)

    def initialize_state(
        self,
        affinity: bool = True,
        batch_size: int | None = None,
        load_bound: float = LOAD_BOUND,
        **_: Any,
    ) -> None:
        """Router settings (``request_router_kwargs``).

        ``batch_size``: ongoing requests at which a replica's batch is full (``None``:
        never treat the preferred replica as full before Serve does). ``load_bound``: see
        :meth:`within_load_bound`.
        """
        self._affinity = affinity
        self._batch_size = batch_size
        self._load_bound = load_bound

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """Ranks of replicas to try, most preferred first."""
        if pending_request is not None:
            # The ranks below always cover every replica: after them, back off.
            pending_request.routing_context.should_backoff = True
        candidate_replicas = without_avoided(candidate_replicas, pending_request)
        if not candidate_replicas:
            return []
        preferred = self.preferred(candidate_replicas, pending_request)
        if preferred is None:
            return [_two_random(candidate_replicas)]
        preferred = await self.within_load_bound(preferred, candidate_replicas, pending_request)
        others = [r for r in candidate_replicas if r is not preferred]
        if not others:
            return [[preferred]]
        if await self.batch_is_full(preferred):
            return [[preferred, *others]]
        return [[preferred], others]

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

    async def within_load_bound(
        self,
        preferred: RunningReplica,
        candidates: list[RunningReplica],
        pending_request: PendingRequest | None,
    ) -> RunningReplica:
        """``preferred``, or the next replica in the key's order if it is over the bound.

        Loads are the cached ongoing counts (unknown: 0); the preferred replica's count is
        probed before it is passed over, as in :meth:`batch_is_full`.
        """
        if len(candidates) < 2:
            return preferred
        cache = self.replica_queue_len_cache
        loads = {r.replica_id: cache.get(r.replica_id) or 0 for r in candidates}
        bound = math.ceil(self._load_bound * (sum(loads.values()) + 1) / len(candidates))
        if loads[preferred.replica_id] < bound or await self.probe(preferred) < bound:
            return preferred
        key = request_affinity_key(pending_request) or preferred.replica_id.unique_id
        order = sorted(
            candidates, key=lambda r: affinity_rank(key, r.replica_id.unique_id), reverse=True
        )
        return next((r for r in order if loads[r.replica_id] < bound), preferred)

    async def probe(self, replica: RunningReplica) -> int:
        """The replica's ongoing requests, asked now (into the cache); 0 if it does not answer."""
        try:
            ongoing = await asyncio.wait_for(
                replica.get_queue_len(deadline_s=PROBE_DEADLINE_S), PROBE_DEADLINE_S
            )
        except Exception:  # no answer in time, or the replica is going away
            return 0
        self.replica_queue_len_cache.update(replica.replica_id, ongoing)
        return int(ongoing)

    async def batch_is_full(self, replica: RunningReplica) -> bool:
        """Whether the replica runs a full batch (unknown or unanswered: no).

        A cached count under ``batch_size`` is trusted; a cached "full" is confirmed by
        probing the replica: the cache is the count at this router's last look, moved only
        by this router's own requests, so requests of other ingress replicas that have
        finished since are still in it. The probe's answer goes into the cache.
        """
        if self._batch_size is None:
            return False
        cached = self.replica_queue_len_cache.get(replica.replica_id)
        if cached is None or cached < self._batch_size:
            return False
        return await self.probe(replica) >= self._batch_size


def _two_random(replicas: list[RunningReplica]) -> list[RunningReplica]:
    if len(replicas) <= 2:
        return random.sample(replicas, len(replicas))
    return random.sample(replicas, 2)
