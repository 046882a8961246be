"""The conversation store against a real Redis: order, atomic appends, deletes, outages.

Tests taking ``store_redis`` run twice: on one Redis and on a Redis Cluster.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from cloudllm_serve.conversations.redis_connect import RedisTopology
from cloudllm_serve.conversations.store import ConversationStore, StorageQuota, StoredMessage
from cloudllm_serve.errors import (
    ConversationNotFoundError,
    StorageQuotaError,
    StoreUnavailableError,
)
from tests.http.conftest import App, StoreRedis
from tests.support import RedisServer, server_port


def make_store(
    target: StoreRedis | str, timeout_s: float = 5.0, **options: Any
) -> ConversationStore:
    """A store of its own key prefix on ``target`` (a Redis URL, a Redis or a cluster).

    ``timeout_s`` is long unless a test is about timeouts: beside make test's other chain
    (vLLM stacks starting) a cluster client once took over 1 s to connect to a node.
    """
    url = target if isinstance(target, str) else target.url
    cluster = not isinstance(target, str) and "REDIS_CLUSTER" in target.settings
    client = RedisTopology(url, timeout_s, cluster=cluster).client()
    return ConversationStore(client, key_prefix=f"t-{uuid.uuid4().hex[:8]}:", **options)


def test_turns_are_kept_in_order(store_redis: StoreRedis) -> None:
    async def scenario() -> None:
        store = make_store(store_redis)
        conversation_id = await store.create()
        for turn in range(5):
            await store.append(
                conversation_id,
                [
                    StoredMessage("user", f"q{turn}", turn),
                    StoredMessage("assistant", f"a{turn}", turn),
                ],
            )
        messages = (await store.get(conversation_id)).messages
        assert [m.content for m in messages] == [x for t in range(5) for x in (f"q{t}", f"a{t}")]
        conversation = await store.get(conversation_id)
        assert conversation.message_count == 10
        assert await store.count() == 1
        await store.close()

    asyncio.run(scenario())


def test_concurrent_turns_on_one_conversation_lose_nothing(store_redis: StoreRedis) -> None:
    async def scenario() -> None:
        store = make_store(store_redis)
        conversation_id = await store.create()

        async def turn(index: int) -> None:
            await store.append(
                conversation_id,
                [
                    StoredMessage("user", f"q{index}", 0.0),
                    StoredMessage("assistant", f"a{index}", 0.0),
                ],
            )

        await asyncio.gather(*(turn(i) for i in range(50)))
        messages = (await store.get(conversation_id)).messages
        assert len(messages) == 100
        # each user message is directly followed by its own answer
        for question, answer in zip(messages[::2], messages[1::2], strict=True):
            assert question.content[1:] == answer.content[1:]
        await store.close()

    asyncio.run(scenario())


def test_deleted_conversation_is_gone_and_not_revived(store_redis: StoreRedis) -> None:
    async def scenario() -> None:
        store = make_store(store_redis)
        conversation_id = await store.create()
        await store.delete(conversation_id)
        with pytest.raises(ConversationNotFoundError):
            await store.get(conversation_id)
        with pytest.raises(ConversationNotFoundError):
            await store.append(conversation_id, [StoredMessage("user", "late", 0.0)])
        with pytest.raises(ConversationNotFoundError):
            await store.delete(conversation_id)
        assert await store.count() == 0
        await store.close()

    asyncio.run(scenario())


def test_unreachable_redis_is_a_quick_store_error() -> None:
    async def scenario() -> None:
        store = make_store(f"redis://127.0.0.1:{server_port()}/0", timeout_s=0.5)
        for call in (store.create(), store.count(), store.get("x")):
            with pytest.raises(StoreUnavailableError):
                await asyncio.wait_for(call, 5)

    asyncio.run(scenario())


def test_frozen_redis_costs_one_timeout_and_a_restart_none(own_redis: RedisServer) -> None:
    """A frozen Redis answers within one ``timeout_s`` (no retry of a timeout); after a
    restart the pooled socket Redis closed is replaced on the spot (one retry)."""

    async def scenario() -> None:
        store = make_store(own_redis, timeout_s=1.0)
        conversation_id = await store.create()
        own_redis.freeze()
        try:
            for call in (store.count(), store.get(conversation_id)):
                started = time.monotonic()
                with pytest.raises(StoreUnavailableError):
                    await call
                assert time.monotonic() - started < 1.8
        finally:
            own_redis.thaw()
        # A thawed Redis first works off what it queued while stopped: on a loaded machine
        # (make test's other chain) that once took longer than the 1 s timeout.
        for attempt in range(10):
            try:
                assert (await store.get(conversation_id)).message_count == 0
                break
            except StoreUnavailableError:
                if attempt == 9:
                    raise
                await asyncio.sleep(0.5)
        own_redis.kill()
        own_redis.start()
        assert await store.count() == 1
        await store.close()

    asyncio.run(scenario())


def test_a_burst_beyond_the_pool_waits_for_a_connection(redis_server: RedisServer) -> None:
    # redis-py's default pool refuses a call past its size ("Too many connections"): a
    # flood of a few hundred requests on one ingress replica reached it. Ours waits.
    async def scenario() -> None:
        client = RedisTopology(redis_server.url, 3.0, max_connections=4).client()
        store = ConversationStore(client, key_prefix=f"t-{uuid.uuid4().hex[:8]}:")
        ids = await asyncio.gather(*(store.create() for _ in range(200)))
        assert len(set(ids)) == 200 and await store.count() == 200
        pool = client.connection_pool
        assert len(pool._available_connections) + len(pool._in_use_connections) <= 4
        await store.close()

    asyncio.run(scenario())


def test_the_answering_engine_replica_is_recorded(store_redis: StoreRedis) -> None:
    async def scenario() -> None:
        store = make_store(store_redis)
        conversation_id = await store.create()
        assert (await store.get(conversation_id)).engine_replica is None
        turn = [StoredMessage("user", "q", 1.0), StoredMessage("assistant", "a", 1.0)]
        await store.append(conversation_id, turn, engine_replica="replica-a")
        assert (await store.get(conversation_id)).engine_replica == "replica-a"
        await store.append(conversation_id, turn)  # unknown replica: keep the last one
        await store.append(conversation_id, turn, engine_replica="replica-b")
        conversation = await store.get(conversation_id)
        assert conversation.engine_replica == "replica-b"
        assert conversation.message_count == 6
        await store.close()

    asyncio.run(scenario())


def test_a_huge_offset_is_a_422_not_an_outage(app: App) -> None:
    response = app.client.get("/conversations?offset=75183055677885583693822558208&limit=56")
    assert response.status_code == 422
    assert response.json()["param"] == "query.offset"
    assert app.client.get("/conversations?offset=1000000000").status_code == 200


def test_listing_images_and_quotas(store_redis: StoreRedis) -> None:
    """Listing order and counts, images kept once and counted per tenant, quotas refused
    with nothing written, and deletion freeing what a conversation held."""

    async def scenario() -> None:
        quota = StorageQuota(conversations=3, messages_per_conversation=4, image_bytes=100)
        store = make_store(store_redis, quota=quota)
        ids = [await store.create() for _ in range(3)]
        with pytest.raises(StorageQuotaError):
            await store.create()
        image = {"d1": "x" * 60}
        turn = [StoredMessage("user", "look", 1.0, images=["d1"])]
        await store.append(ids[0], turn, images=image)
        await store.append(ids[0], turn, images=image)  # the same image: kept once
        conversation = await store.get(ids[0], with_images=True)
        assert conversation.images == image and conversation.message_count == 2
        with pytest.raises(StorageQuotaError):  # 60 + 60 new bytes > 100
            await store.append(ids[1], turn, images={"d2": "y" * 60})
        with pytest.raises(StorageQuotaError):  # 2 + 3 messages > 4
            await store.append(ids[0], [turn[0]] * 3)
        assert (await store.get(ids[1])).message_count == 0
        await store.append(ids[2], [StoredMessage("user", "latest", 2.0)])
        total, page = await store.list_page(limit=2)
        assert total == 3
        assert [c.conversation_id for c in page] == [ids[2], ids[0]]
        assert [c.message_count for c in page] == [1, 2]
        await store.delete(ids[0])  # frees a conversation and its image bytes
        await store.append(ids[1], turn, images={"d2": "y" * 60})
        await store.create()
        total, page = await store.list_page(offset=0, limit=10)
        assert total == 3 and ids[0] not in [c.conversation_id for c in page]
        assert await store.count() == 3
        await store.close()

    asyncio.run(scenario())


def test_old_layout_is_migrated(store_redis: StoreRedis, redis_server: RedisServer) -> None:
    """Keys without hash tags, moved by the migration command, are read by the store."""
    from cloudllm_serve.conversations.migrate import migrate

    root = f"m-{uuid.uuid4().hex[:8]}:"
    old = redis_server.client()
    tenant = f"{root}t:tenant-a:"
    old.hset(f"{tenant}conv:abc", mapping={"created_at": 1.0, "updated_at": 2.0})
    old.rpush(f"{tenant}conv:abc:messages", StoredMessage("user", "hi", 1.0).to_json())
    old.zadd(f"{tenant}conversations", {"abc": 2.0})
    old.hset(f"{tenant}image_bytes", "abc", 0)
    target = store_redis.client()
    assert migrate(old, target, root) == 4
    assert migrate(old, target, root) == 0
    assert not list(old.scan_iter(f"{root}*")) or store_redis is redis_server

    async def scenario() -> None:
        cluster = "REDIS_CLUSTER" in store_redis.settings
        client = RedisTopology(store_redis.url, 1.0, cluster=cluster).client()
        store = ConversationStore(client, key_prefix=root)
        view = store.for_tenant("tenant-a")
        total, page = await view.list_page()
        assert total == 1 and [c.conversation_id for c in page] == ["abc"]
        assert [m.content for m in (await view.get("abc")).messages or []] == ["hi"]
        await view.delete("abc")
        await store.close()

    asyncio.run(scenario())
