"""Backpressure and the request timeout, through the real FastAPI app and a real Redis.

The engine side is a stand-in: a Serve handle whose queue is full (Serve raises
``BackPressureError`` at the caller) and a slow fake engine. The real stack's flood
test (tests/scale) shows the same answers from real Serve and vLLM.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from ray.serve.exceptions import BackPressureError

from cloudllm_serve.conversations.store import ConversationStore
from cloudllm_serve.engine.protocol import EngineClient, GenerationChunk
from cloudllm_serve.ingress.app import create_app
from cloudllm_serve.ingress.engine_client import ServeEngineClient
from cloudllm_serve.ingress.service import CloudLLMService
from cloudllm_serve.settings import Settings
from tests.fakes import FakeEngine
from tests.support import RedisServer


class FullQueueHandle:
    """A ``DeploymentHandle`` whose deployment queue is full."""

    deployment_name = "EngineServer"

    def options(self, **_: Any) -> FullQueueHandle:
        return self

    @property
    def generate(self) -> FullQueueHandle:
        return self

    @property
    def openai(self) -> FullQueueHandle:
        return self

    async def remote(self, request: Any) -> AsyncIterator[GenerationChunk]:
        raise BackPressureError(num_queued_requests=4, max_queued_requests=4)
        yield GenerationChunk()  # pragma: no cover  (makes this an async generator)


def make_client(
    redis_server: RedisServer, engine: EngineClient | None, **settings: Any
) -> Iterator[tuple[TestClient, Settings, EngineClient]]:
    config = Settings(REDIS_URL=redis_server.url, MAX_TOKENS_CAP=32, **settings)
    store = ConversationStore.from_url(
        config.REDIS_URL, timeout_s=1.0, key_prefix=f"test-{uuid.uuid4().hex[:8]}:"
    )
    engine = engine or ServeEngineClient(FullQueueHandle(), config, app_name="cloudllm")
    with TestClient(create_app(CloudLLMService(config, store, engine))) as client:
        yield client, config, engine


@pytest.fixture
def full(redis_server: RedisServer) -> Iterator[TestClient]:
    for client, _, _ in make_client(
        redis_server, None, OVERLOAD_STATUS_CODE=429, OVERLOAD_RETRY_AFTER_S=3
    ):
        yield client


def test_full_queue_is_refused_at_once_with_retry_after(full: TestClient) -> None:
    conversations = full.get("/conversations").json()["total"]
    response = full.post("/generate", json={"message": "hi"})
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "3"
    body = response.json()
    assert body["error_type"] == "engine_overloaded"
    assert "ENGINE_MAX_QUEUED_REQUESTS" in body["detail"]
    assert full.get("/conversations").json()["total"] == conversations  # nothing left behind


def test_full_queue_on_the_openai_api(full: TestClient) -> None:
    response = full.post(
        "/v1/chat/completions",
        json={"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "3"
    assert response.json()["error"]["type"] == "rate_limit_error"
    streamed = full.post("/generate", json={"message": "hi", "stream": True})
    assert streamed.status_code == 429  # refused before any header of the stream


def test_overload_status_defaults_to_503(redis_server: RedisServer) -> None:
    for client, _, _ in make_client(redis_server, None):
        response = client.post("/generate", json={"message": "hi"})
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "2"


def test_a_stuck_generation_ends_with_a_timeout(redis_server: RedisServer) -> None:
    # About 5 s for its answer, its first token after 0.5 s: a 2 s timeout ends it after the
    # first token even while stack tests load the CPU beside these tests (make test).
    slow = FakeEngine(delay_s=0.5)
    for client, _, _ in make_client(redis_server, slow, REQUEST_TIMEOUT_S=2.0):
        conversations = client.get("/conversations").json()["total"]
        response = client.post("/generate", json={"message": "tell me everything"})
        assert response.status_code == 504
        assert "REQUEST_TIMEOUT_S" in response.json()["detail"]
        assert slow.cancelled == 1  # the engine request was stopped, not left running
        assert slow.running == 0
        assert client.get("/conversations").json()["total"] == conversations
        streamed = client.post(
            "/v1/completions", json={"prompt": "go on and on and on", "stream": True}
        )
        assert streamed.status_code == 200  # the first token came in time; then it stopped
        events = [line for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert "timeout_error" in events[-2] and "REQUEST_TIMEOUT_S" in events[-2]
        assert events[-1] == "data: [DONE]"
        assert slow.cancelled == 2 and slow.running == 0
