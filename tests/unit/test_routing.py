"""Conversation-affinity routing: which engine replica a request goes to.

The router is built as Serve builds it (Serve's ``RequestRouter`` machinery, our
``choose_replicas``); replicas are small fakes that report a queue length.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
from ray.serve.request_router import PendingRequest, ReplicaID

from cloudllm_serve.engine.protocol import GenerationRequest, SamplingOptions
from cloudllm_serve.engine.routing import (
    ConversationAffinityRouter,
    affinity_rank,
    request_affinity_key,
)
from cloudllm_serve.ingress.service import affinity_key

DEPLOYMENT = DeploymentID(name="EngineServer", app_name="test")


class FakeReplica:
    """What Serve's router reads of a running replica; ``queue_len`` is its load."""

    def __init__(self, name: str, *, max_ongoing: int = 8, queue_len: int = 0) -> None:
        self.replica_id = ReplicaID(unique_id=name, deployment_id=DEPLOYMENT)
        self.max_ongoing_requests = max_ongoing
        self.queue_len = queue_len
        self.probes = 0
        self.node_id = "node"
        self.availability_zone = None
        self.multiplexed_model_ids: set[str] = set()
        self.is_cross_language = False

    async def get_queue_len(self, *, deadline_s: float) -> int:
        self.probes += 1
        return self.queue_len


@dataclass
class FakePending:
    args: list[Any]


def make_router(
    *, affinity: bool = True, batch_size: int | None = None
) -> ConversationAffinityRouter:
    """Our router, constructed and configured the way Serve does it."""
    router = ConversationAffinityRouter(
        DEPLOYMENT, DeploymentHandleSource.UNKNOWN, use_replica_queue_len_cache=True
    )
    router.initialize_state(affinity=affinity, batch_size=batch_size)
    return router


REPLICAS = [FakeReplica(name) for name in ("a", "b", "c")]


def request(key: str | None) -> FakePending:
    generation = GenerationRequest(
        request_id="r",
        sampling=SamplingOptions(max_tokens=1),
        messages=[{"role": "user", "content": "x"}],
        affinity_key=key,
    )
    return FakePending([generation])


def ranks_for(
    router: ConversationAffinityRouter,
    key: str | None,
    recorded: str | None = None,
    avoid: tuple[str, ...] = (),
) -> list[list[str]]:
    """The ranks ``choose_replicas`` gives a request (built in a running loop)."""

    async def run() -> list[list[str]]:
        request = pending(key, recorded, avoid)
        ranks = await router.choose_replicas(list(REPLICAS), request)  # type: ignore[arg-type]
        return [[str(r.replica_id.unique_id) for r in rank] for rank in ranks]

    return asyncio.run(run())


def choose(router: ConversationAffinityRouter, key: str | None) -> list[list[str]]:
    return ranks_for(router, key)


def test_a_key_always_prefers_the_same_replica() -> None:
    router = make_router()
    first = choose(router, "conv:1")
    assert all(choose(router, "conv:1") == first for _ in range(20))
    assert len(first[0]) == 1 and sorted(first[0] + first[1]) == ["a", "b", "c"]


def test_keys_spread_over_replicas() -> None:
    router = make_router()
    preferred = Counter(choose(router, f"conv:{i}")[0][0] for i in range(300))
    assert set(preferred) == {"a", "b", "c"}
    assert min(preferred.values()) > 60  # roughly even


def test_a_new_replica_moves_only_its_share_of_conversations() -> None:
    keys = [f"conv:{i}" for i in range(300)]
    two = {k: max("ab", key=lambda r: affinity_rank(k, r)) for k in keys}
    three = {k: max("abc", key=lambda r: affinity_rank(k, r)) for k in keys}
    moved = [k for k in keys if two[k] != three[k]]
    assert all(three[k] == "c" for k in moved)  # only to the new replica
    assert len(moved) < 150


def test_the_others_come_next_when_the_preferred_one_is_full() -> None:
    ranks = choose(make_router(), "conv:7")
    assert len(ranks) == 2 and len(ranks[0]) == 1
    assert sorted(ranks[0] + ranks[1]) == ["a", "b", "c"]


def test_without_a_key_or_affinity_two_random_choices() -> None:
    assert len(choose(make_router(), None)) == 1
    assert len(choose(make_router(), None)[0]) == 2
    assert len(choose(make_router(affinity=False), "conv:1")[0]) == 2


def test_request_key_comes_from_the_generation_request() -> None:
    assert request_affinity_key(request("conv:9")) == "conv:9"  # type: ignore[arg-type]
    assert request_affinity_key(request(None)) is None  # type: ignore[arg-type]
    assert request_affinity_key(FakePending([])) is None  # type: ignore[arg-type]


def test_affinity_key_of_a_chat() -> None:
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    later = [*history, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "?"}]
    assert affinity_key("abc", later) == "conv:abc"
    assert affinity_key(None, history) == affinity_key(None, later)  # same opening
    other = [{"role": "user", "content": "Hi there"}]
    assert affinity_key(None, other) != affinity_key(None, history)


@pytest.mark.parametrize(
    ("key", "rank"), [("conv:1", 10562251054051389942), ("chat:ff", 2124948745251258015)]
)
def test_rank_is_the_same_in_every_process(key: str, rank: int) -> None:
    # Every ingress replica (another process) must rank a key the same way: a salted
    # hash (Python's hash()) or a changed digest would move every conversation.
    assert affinity_rank(key, "a") == rank


def choose_recorded(
    router: ConversationAffinityRouter, key: str | None, recorded: str | None
) -> list[list[str]]:
    return ranks_for(router, key, recorded)


def test_the_replica_of_the_previous_turn_wins_over_the_hash() -> None:
    hashed = choose(make_router(), "conv:5")[0][0]
    recorded = next(name for name in "abc" if name != hashed)
    assert choose_recorded(make_router(), "conv:5", recorded)[0] == [recorded]
    assert choose_recorded(make_router(), None, recorded)[0] == [recorded]


def test_a_gone_recorded_replica_falls_back() -> None:
    hashed = choose(make_router(), "conv:5")[0][0]
    assert choose_recorded(make_router(), "conv:5", "gone")[0] == [hashed]
    assert len(choose_recorded(make_router(), None, "gone")[0]) == 2
    assert len(choose_recorded(make_router(affinity=False), None, "b")[0]) == 2


def test_a_retried_request_passes_over_the_replica_whose_engine_died() -> None:
    hashed = choose(make_router(), "conv:5")[0][0]
    others = sorted(set("abc") - {hashed})
    ranks = ranks_for(make_router(), "conv:5", recorded=hashed, avoid=(hashed,))
    assert sorted(name for rank in ranks for name in rank) == others
    assert ranks_for(make_router(affinity=False), None, avoid=("a", "b")) == [["c"]]
    # Every replica avoided (one replica, dead): it is tried rather than nothing.
    (rank,) = ranks_for(make_router(), None, avoid=("a", "b", "c"))
    assert len(rank) == 2


def test_a_preferred_replica_with_a_full_batch_competes_with_the_others() -> None:
    router = make_router(batch_size=4)
    preferred = choose(router, "conv:7")[0][0]
    replica = next(r for r in REPLICAS if r.replica_id.unique_id == preferred)
    replica.queue_len = 4
    router.replica_queue_len_cache.update(replica.replica_id, 4)
    # The others busy too: the preferred one is full but not over the load bound.
    for other in REPLICAS:
        if other is not replica:
            router.replica_queue_len_cache.update(other.replica_id, 3)
    try:
        ranks = choose(router, "conv:7")
        assert len(ranks) == 1 and ranks[0][0] == preferred  # first, so it wins ties
        assert sorted(ranks[0]) == ["a", "b", "c"]
        # The cache still says 4 (other ingress replicas' requests finished since), the
        # replica has room: it is asked, and keeps the conversation.
        replica.queue_len = 1
        probes = replica.probes
        assert choose(router, "conv:7")[0] == [preferred]
        assert replica.probes == probes + 1
        assert router.replica_queue_len_cache.get(replica.replica_id) == 1
        # A cached count under the batch size is trusted: no probe.
        assert choose(router, "conv:7")[0] == [preferred]
        assert replica.probes == probes + 1
    finally:
        replica.queue_len = 0


def pending(
    key: str | None, recorded: str | None = None, avoid: tuple[str, ...] = ()
) -> PendingRequest:
    """A real pending request (its future needs a running event loop)."""
    generation = GenerationRequest(
        request_id="r",
        sampling=SamplingOptions(max_tokens=1),
        messages=[{"role": "user", "content": "x"}],
        affinity_key=key,
        preferred_replica=recorded,
        avoid_replicas=avoid,
    )
    return PendingRequest(
        args=[generation],
        kwargs={},
        metadata=RequestMetadata(request_id="r", internal_request_id=f"i-{time.monotonic()}"),
    )


def test_serve_passes_over_a_full_preferred_replica() -> None:
    replicas = [FakeReplica("a"), FakeReplica("b")]
    key = next(f"conv:{i}" for i in range(100) if choose(make_router(), f"conv:{i}")[0] == ["a"])

    async def run() -> tuple[str, str]:
        router = make_router(batch_size=4)
        router.update_replicas(replicas)  # type: ignore[arg-type]
        first = await router._choose_replica_for_request(pending(key))
        replicas[0].queue_len = replicas[0].max_ongoing_requests  # now full
        router.replica_queue_len_cache.invalidate_key(replicas[0].replica_id)
        second = await asyncio.wait_for(router._choose_replica_for_request(pending(key)), 5)
        return first.replica_id.unique_id, second.replica_id.unique_id

    assert asyncio.run(run()) == ("a", "b")


def test_a_request_waiting_for_a_full_replica_backs_off_and_then_gets_it() -> None:
    # Without backoff each waiting request's routing task probed the replicas' queue
    # lengths back to back (tens of thousands of probes a second here, hundreds a
    # second on the real stack), which took the engine's CPU at saturation.
    replica = FakeReplica("a", max_ongoing=4, queue_len=4)

    async def run() -> tuple[int, float]:
        router = make_router(batch_size=2)
        router.update_replicas([replica])  # type: ignore[arg-type]
        task = asyncio.create_task(router._choose_replica_for_request(pending("conv:1")))
        await asyncio.sleep(1.5)
        assert not task.done()
        probes = replica.probes
        replica.queue_len = 3
        freed = time.monotonic()
        await asyncio.wait_for(task, 5)
        return probes, time.monotonic() - freed

    probes, waited_s = asyncio.run(run())
    print(f"probes in 1.5 s while full: {probes}; routed {waited_s:.2f} s after room appeared")
    assert probes <= 20  # exponential backoff from 25 ms up to 0.5 s: about 9
    assert waited_s < 1.5  # at most one backoff period (0.5 s) late


def test_a_replica_chosen_for_another_request_never_goes_to_one_that_avoids_it() -> None:
    # Serve hands a replica that a routing task found to the oldest waiting request
    # (first come, first served). A request retried because its engine died there must
    # not be that one: the CI run that failed sent one try after another back to the
    # dead replica this way (3 tries, then a 503).
    dead, busy = FakeReplica("dead"), FakeReplica("busy", max_ongoing=4, queue_len=4)

    async def run() -> tuple[str, str]:
        router = make_router(batch_size=2)
        router.update_replicas([dead, busy])  # type: ignore[arg-type]
        retried = asyncio.create_task(
            router._choose_replica_for_request(pending(None, avoid=("dead",)))
        )
        await asyncio.sleep(0.3)  # waiting for "busy", the one replica it may use
        assert not retried.done()
        fresh = await asyncio.wait_for(router._choose_replica_for_request(pending(None)), 5)
        await asyncio.sleep(0.3)
        assert not retried.done(), "the retried request was given the replica it avoids"
        busy.queue_len = 0
        router.replica_queue_len_cache.invalidate_key(busy.replica_id)
        got = await asyncio.wait_for(retried, 5)
        return fresh.replica_id.unique_id, got.replica_id.unique_id

    assert asyncio.run(run()) == ("dead", "busy")


def test_a_hot_replica_passes_its_requests_to_the_next_in_the_key_order() -> None:
    router = make_router(batch_size=4)
    order = sorted(REPLICAS, key=lambda r: affinity_rank("conv:9", r.replica_id.unique_id))
    first, second = order[-1], order[-2]
    assert choose(router, "conv:9")[0] == [first.replica_id.unique_id]
    # 2 ongoing where the mean is 2/3: at the bound (ceil(1.25 * 3 / 3) = 2), and the probe
    # agrees. The next replica of this key's order takes the request.
    first.queue_len = 2
    router.replica_queue_len_cache.update(first.replica_id, 2)
    try:
        assert choose(router, "conv:9")[0] == [second.replica_id.unique_id]
        # The cache overstated it (requests of other ingress replicas finished): the probe
        # says 1, under the bound, and the request stays.
        first.queue_len = 1
        router.replica_queue_len_cache.update(first.replica_id, 2)
        assert choose(router, "conv:9")[0] == [first.replica_id.unique_id]
        # All equally busy: no replica is over the bound, the conversation stays.
        for replica in REPLICAS:
            replica.queue_len = 2
            router.replica_queue_len_cache.update(replica.replica_id, 2)
        assert choose(router, "conv:9")[0] == [first.replica_id.unique_id]
    finally:
        for replica in REPLICAS:
            replica.queue_len = 0
            router.replica_queue_len_cache.update(replica.replica_id, 0)
