"""The conversation store against a real Redis: order, atomic appends, deletes, outages."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from cloudllm_serve.conversations.store import ConversationStore, StoredMessage
from cloudllm_serve.errors import ConversationNotFoundError, StoreUnavailableError
from tests.http.conftest import App
from tests.support import RedisServer, free_port


def make_store(url: str, timeout_s: float = 1.0) -> ConversationStore:
    return ConversationStore.from_url(
        url, timeout_s=timeout_s, key_prefix=f"t-{uuid.uuid4().hex[:8]}:"
    )


def test_turns_are_kept_in_order(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        store = make_store(redis_server.url)
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


def test_concurrent_turns_on_one_conversation_lose_nothing(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        store = make_store(redis_server.url)
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


def test_deleted_conversation_is_gone_and_not_revived(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        store = make_store(redis_server.url)
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
        store = make_store(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
        for call in (store.create(), store.count(), store.get("x")):
            with pytest.raises(StoreUnavailableError):
                await asyncio.wait_for(call, 5)

    asyncio.run(scenario())


def test_frozen_redis_costs_one_timeout_and_a_restart_none(own_redis: RedisServer) -> None:
    """A frozen Redis answers within one ``timeout_s`` (no retry of a timeout); after a
    restart the pooled socket Redis closed is replaced on the spot (one retry)."""

    async def scenario() -> None:
        store = make_store(own_redis.url, timeout_s=1.0)
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


def test_the_answering_engine_replica_is_recorded(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        store = make_store(redis_server.url)
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
