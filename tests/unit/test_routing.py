"""Conversation-affinity routing: which engine replica a request goes to."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest

from cloudllm_serve.engine.protocol import GenerationRequest, SamplingOptions
from cloudllm_serve.engine.routing import (
    ConversationAffinityRouter,
    affinity_rank,
    request_affinity_key,
)
from cloudllm_serve.ingress.service import affinity_key


@dataclass(frozen=True)
class FakeId:
    unique_id: str


@dataclass(frozen=True)
class FakeReplica:
    replica_id: FakeId


@dataclass
class FakePending:
    args: list[Any]


class Router(ConversationAffinityRouter):
    """The real ranking, without Serve's router machinery around it."""

    def __init__(self, *, affinity: bool = True) -> None:
        self.initialize_state(affinity=affinity)


REPLICAS = [FakeReplica(FakeId(name)) for name in ("a", "b", "c")]


def request(key: str | None) -> FakePending:
    generation = GenerationRequest(
        request_id="r", sampling=SamplingOptions(max_tokens=1), prompt="x", affinity_key=key
    )
    return FakePending([generation])


def choose(router: Router, key: str | None) -> list[list[str]]:
    ranks = asyncio.run(router.choose_replicas(list(REPLICAS), request(key)))  # type: ignore[arg-type]
    return [[r.replica_id.unique_id for r in rank] for rank in ranks]


def test_a_key_always_prefers_the_same_replica() -> None:
    router = Router()
    first = choose(router, "conv:1")
    assert all(choose(router, "conv:1") == first for _ in range(20))
    assert len(first[0]) == 1 and sorted(first[0] + first[1]) == ["a", "b", "c"]


def test_keys_spread_over_replicas() -> None:
    router = Router()
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
    ranks = choose(Router(), "conv:7")
    assert len(ranks) == 2 and len(ranks[0]) == 1
    assert sorted(ranks[0] + ranks[1]) == ["a", "b", "c"]


def test_without_a_key_or_affinity_two_random_choices() -> None:
    assert len(choose(Router(), None)) == 1
    assert len(choose(Router(), None)[0]) == 2
    assert len(choose(Router(affinity=False), "conv:1")[0]) == 2


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


@pytest.mark.parametrize("key", ["conv:1", "chat:ff"])
def test_rank_is_stable(key: str) -> None:
    assert affinity_rank(key, "a") == affinity_rank(key, "a")


def request_for(key: str | None, recorded: str | None) -> FakePending:
    generation = GenerationRequest(
        request_id="r",
        sampling=SamplingOptions(max_tokens=1),
        prompt="x",
        affinity_key=key,
        preferred_replica=recorded,
    )
    return FakePending([generation])


def choose_recorded(router: Router, key: str | None, recorded: str | None) -> list[list[str]]:
    pending = request_for(key, recorded)
    ranks = asyncio.run(router.choose_replicas(list(REPLICAS), pending))  # type: ignore[arg-type]
    return [[r.replica_id.unique_id for r in rank] for rank in ranks]


def test_the_replica_of_the_previous_turn_wins_over_the_hash() -> None:
    hashed = choose(Router(), "conv:5")[0][0]
    recorded = next(name for name in "abc" if name != hashed)
    assert choose_recorded(Router(), "conv:5", recorded)[0] == [recorded]
    assert choose_recorded(Router(), None, recorded)[0] == [recorded]


def test_a_gone_recorded_replica_falls_back() -> None:
    hashed = choose(Router(), "conv:5")[0][0]
    assert choose_recorded(Router(), "conv:5", "gone")[0] == [hashed]
    assert len(choose_recorded(Router(), None, "gone")[0]) == 2
    assert len(choose_recorded(Router(affinity=False), None, "b")[0]) == 2
