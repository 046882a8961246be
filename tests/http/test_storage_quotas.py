"""Storage quotas per tenant (conversations, messages, image bytes) and a full Redis.

The real app over a real Redis; the fake engine (declared a vision-language model).
A quota refusal is a 409 naming the quota and its limit, with nothing written; a Redis
at its ``maxmemory`` (``noeviction``) is a 503 saying it is full, the conversation intact.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from cloudllm_serve.conversations.store import ConversationStore, StorageQuota, StoredMessage
from cloudllm_serve.devhost.launcher import redis_server_command
from cloudllm_serve.errors import SettingsError, StorageQuotaError
from cloudllm_serve.ingress.app import create_app
from cloudllm_serve.ingress.images import ImageLimits, check_image
from cloudllm_serve.ingress.service import CloudLLMService
from cloudllm_serve.keys.registry import parse_key_file
from cloudllm_serve.settings import Settings
from tests.fakes import FakeEngine
from tests.support import RedisServer, image_bytes
from tests.tenants_support import TenantKeys, write_key_file

PNGS = [image_bytes(24, 24, seed=seed) for seed in (11, 12)]
#: Bytes one of PNGS takes in the store (its data URL after our re-encoding).
IMAGE_BYTES = max(
    len(check_image(png, field="image", limits=ImageLimits(1 << 20, 1 << 20, 64)).data_url())
    for png in PNGS
)
TENANTS: list[dict[str, Any]] = [
    {"id": "two-conversations", "keys": 1, "max_conversations": 2},
    {"id": "four-messages", "keys": 1, "max_messages_per_conversation": 4},
    {"id": "one-image", "keys": 1, "max_image_bytes": IMAGE_BYTES * 3 // 2, "max_conversations": 0},
    {"id": "unlimited", "keys": 1, "max_conversations": 0},
    {"id": "defaults", "keys": 1},
]


@dataclass
class QuotaApp:
    client: TestClient
    engine: FakeEngine
    keys: TenantKeys
    prefix: str
    redis: redis.Redis

    def post(self, tenant: str, path: str, body: dict[str, Any]) -> Any:
        return self.client.post(path, json=body, headers=self.keys.auth(tenant))

    def tenant_keys(self, tenant: str) -> list[str]:
        return sorted(self.redis.scan_iter(f"{self.prefix}t:{tenant}:*"))


def make_app(server: RedisServer, tmp_path: Path, **overrides: Any) -> Iterator[QuotaApp]:
    keys = write_key_file(tmp_path / "keys.yaml", TENANTS)
    settings = Settings(
        REDIS_URL=server.url,
        MAX_TOKENS_CAP=32,
        REDIS_TIMEOUT_S=1.0,
        API_KEYS_FILE=str(tmp_path / "keys.yaml"),
        AUDIT_LOG="off",
        MAX_IMAGE_SIDE=64,
        **overrides,
    )
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    store = ConversationStore.from_url(settings.REDIS_URL, timeout_s=1.0, key_prefix=prefix)
    engine = FakeEngine()
    engine.supports_images = True
    with TestClient(create_app(CloudLLMService(settings, store, engine))) as client:
        yield QuotaApp(client, engine, keys, prefix, server.client())


@pytest.fixture
def app(redis_server: RedisServer, tmp_path: Path) -> Iterator[QuotaApp]:
    yield from make_app(redis_server, tmp_path, MAX_CONVERSATIONS=1)


def assert_quota_refusal(response: Any, quota: str, limit: int) -> None:
    assert response.status_code == 409, response.text
    assert response.headers["x-should-retry"] == "false"
    body = response.json()
    assert body["error_type"] == "storage_quota"
    assert f"{quota} ({limit})" in body["detail"]


def test_conversations_quota_per_tenant_with_the_environment_as_default(app: QuotaApp) -> None:
    made = [app.post("two-conversations", "/generate", {"message": "hi"}) for _ in range(2)]
    assert [r.status_code for r in made] == [200, 200]
    before = app.tenant_keys("two-conversations")
    requests = len(app.engine.requests)
    refused = app.post("two-conversations", "/generate", {"message": "hi"})
    assert_quota_refusal(refused, "max_conversations", 2)
    assert app.tenant_keys("two-conversations") == before  # nothing written
    assert len(app.engine.requests) == requests  # refused before generating
    # The same on /v1 (OpenAI's body), and deleting one makes room.
    chat = {"messages": [{"role": "user", "content": "hi"}], "store": True}
    v1 = app.post("two-conversations", "/v1/chat/completions", chat)
    assert v1.status_code == 409 and v1.json()["error"]["code"] == "storage_quota_exceeded"
    gone = made[0].json()["conversation_id"]
    app.client.delete(f"/conversations/{gone}", headers=app.keys.auth("two-conversations"))
    assert app.post("two-conversations", "/generate", {"message": "hi"}).status_code == 200
    # A tenant the key file leaves to the environment gets MAX_CONVERSATIONS (1 here);
    # 0 in the key file is unlimited.
    assert app.post("defaults", "/generate", {"message": "hi"}).status_code == 200
    assert_quota_refusal(
        app.post("defaults", "/generate", {"message": "hi"}), "max_conversations", 1
    )
    statuses = [app.post("unlimited", "/generate", {"message": "hi"}).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]


def test_messages_quota_refuses_before_generating(app: QuotaApp) -> None:
    first = app.post("four-messages", "/generate", {"message": "one"})
    conversation_id = first.json()["conversation_id"]
    turn = {"message": "two", "conversation_id": conversation_id}
    assert app.post("four-messages", "/generate", turn).status_code == 200
    requests = len(app.engine.requests)
    refused = app.post("four-messages", "/generate", {**turn, "stream": True})
    assert_quota_refusal(refused, "max_messages_per_conversation", 4)
    assert refused.json()["param"] == "conversation_id"
    assert len(app.engine.requests) == requests
    key = f"{app.prefix}t:four-messages:conv:{{{conversation_id}}}:messages"
    assert app.redis.llen(key) == 4


def test_messages_quota_is_checked_atomically_by_the_append(redis_server: RedisServer) -> None:
    """Two turns that both passed the early check: the store's script refuses the second."""

    async def run() -> None:
        store = ConversationStore.from_url(
            redis_server.url, timeout_s=1.0, key_prefix=f"test-{uuid.uuid4().hex[:8]}:"
        ).for_tenant("t", StorageQuota(messages_per_conversation=3))
        conversation_id = await store.create()
        turn = [StoredMessage("user", "q", time.time()), StoredMessage("assistant", "a", 0.0)]
        await store.append(conversation_id, turn)
        with pytest.raises(StorageQuotaError) as refused:
            await store.append(conversation_id, turn)
        assert refused.value.status_code == 409
        assert "max_messages_per_conversation (3)" in refused.value.message
        assert (await store.get(conversation_id)).message_count == 2
        await store.close()

    asyncio.run(run())


def test_image_bytes_quota_counts_the_tenants_images_once(app: QuotaApp) -> None:
    image = [base64.b64encode(png).decode() for png in PNGS]
    first = app.post("one-image", "/vision", {"message": "a", "image": image[0]})
    assert first.status_code == 200, first.text
    kept = first.json()["conversation_id"]
    # The same image again, in the same conversation, takes no more room.
    again = {"message": "b", "image": image[0], "conversation_id": kept}
    assert app.post("one-image", "/vision", again).status_code == 200
    before = app.tenant_keys("one-image")
    refused = app.post("one-image", "/vision", {"message": "c", "image": image[1]})
    assert_quota_refusal(refused, "max_image_bytes", IMAGE_BYTES * 3 // 2)
    # The conversation the refused request started is gone again; nothing else changed.
    assert app.tenant_keys("one-image") == before
    app.client.delete(f"/conversations/{kept}", headers=app.keys.auth("one-image"))
    assert app.post("one-image", "/vision", {"message": "d", "image": image[1]}).status_code == 200


@pytest.fixture
def full_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of its own capped at 4 MB with noeviction (as make serve starts it)."""
    server = RedisServer(tmp_path / "full-redis", maxmemory="4mb")
    server.start()
    yield server
    server.stop()


def test_a_full_redis_is_a_503_that_says_so_and_keeps_the_conversation(
    full_redis: RedisServer, tmp_path: Path
) -> None:
    for app in make_app(full_redis, tmp_path):
        first = app.post("defaults", "/generate", {"message": "one"})
        conversation_id = first.json()["conversation_id"]
        filler = "x" * 100_000
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            for index in range(1000):
                app.redis.set(f"filler:{index}", filler)
        key = f"{app.prefix}t:defaults:conv:{{{conversation_id}}}:messages"
        turn = {"message": "two", "conversation_id": conversation_id}
        for response in (
            app.post("defaults", "/generate", turn),
            app.post("defaults", "/generate", {"message": "new"}),
        ):
            assert response.status_code == 503, response.text
            assert "Redis is full" in response.json()["detail"]
            assert response.headers["Retry-After"] == "30"
        assert app.redis.llen(key) == 2  # the turn was not half-written
        got = app.client.get(f"/conversations/{conversation_id}", headers=app.keys.auth("defaults"))
        assert got.status_code == 200, got.text
        assert got.json()["message_count"] == 2


def test_make_serve_starts_redis_with_maxmemory_and_noeviction() -> None:
    command = redis_server_command("redis-server", "127.0.0.1", 6380, Path("/x"), maxmemory="1gb")
    assert command[command.index("--maxmemory") + 1] == "1gb"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert Settings().REDIS_MAXMEMORY == "1gb"


@pytest.mark.parametrize("value", [-1, "10", 1.5, True])
def test_a_bad_quota_in_the_key_file_is_named(value: Any) -> None:
    entry = {"id": "t", "keys": [{"id": "k", "sha256": "0" * 64}], "max_image_bytes": value}
    with pytest.raises(SettingsError, match=r"tenants\[0\]\.max_image_bytes must be"):
        parse_key_file({"tenants": [entry]}, "keys.yaml")
