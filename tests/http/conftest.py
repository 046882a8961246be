from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from cloudllm_serve.conversations.store import ConversationStore
from cloudllm_serve.ingress.app import create_app
from cloudllm_serve.ingress.service import CloudLLMService
from cloudllm_serve.settings import Settings
from tests.fakes import FakeEngine
from tests.support import RedisServer


@dataclass
class App:
    client: TestClient
    engine: FakeEngine
    settings: Settings


@pytest.fixture
def app(redis_server: RedisServer) -> Iterator[App]:
    """The real FastAPI app over a real Redis (own key prefix) and the fake engine."""
    settings = Settings(
        REDIS_URL=redis_server.url, MAX_TOKENS_CAP=32, MAX_UPLOAD_BYTES=4096, REDIS_TIMEOUT_S=0.5
    )
    store = ConversationStore.from_url(
        settings.REDIS_URL,
        timeout_s=settings.REDIS_TIMEOUT_S,
        key_prefix=f"test-{uuid.uuid4().hex[:8]}:",
    )
    engine = FakeEngine()
    engine.model = settings.model_name
    with TestClient(create_app(CloudLLMService(settings, store, engine))) as client:
        yield App(client, engine, settings)
