from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cloudllm_serve.conversations.store import ConversationStore
from cloudllm_serve.ingress.app import create_app
from cloudllm_serve.ingress.service import CloudLLMService
from cloudllm_serve.launcher import REDIS_APPENDFSYNC
from cloudllm_serve.settings import Settings
from tests.fakes import FakeEngine
from tests.support import RedisServer


@dataclass
class App:
    client: TestClient
    engine: FakeEngine
    settings: Settings


def build_app(
    redis_server: RedisServer, engine: FakeEngine, **overrides: Any
) -> tuple[FastAPI, Settings]:
    """The real FastAPI app over ``redis_server`` (own key prefix) and ``engine``.

    Settings of the HTTP-layer tests, with ``overrides``; the engine serves their model.
    """
    defaults: dict[str, Any] = {
        "MAX_TOKENS_CAP": 32,
        "MAX_UPLOAD_BYTES": 4096,
        # 1 s, not less: the app runs inside pytest, which shares the CPU with the stacks
        # starting beside it (make test starts them with the session); 0.5 s once gave a
        # 503 to a request sent before Redis was frozen.
        "REDIS_TIMEOUT_S": 1.0,
    }
    settings = Settings(REDIS_URL=redis_server.url, **{**defaults, **overrides})
    store = ConversationStore.from_url(
        settings.REDIS_URL,
        timeout_s=settings.REDIS_TIMEOUT_S,
        key_prefix=f"test-{uuid.uuid4().hex[:8]}:",
    )
    engine.model = settings.model_name
    return create_app(CloudLLMService(settings, store, engine)), settings


@contextlib.contextmanager
def running_app(redis_server: RedisServer) -> Iterator[App]:
    """The real FastAPI app over ``redis_server`` (own key prefix) and the fake engine."""
    engine = FakeEngine()
    app, settings = build_app(redis_server, engine)
    with TestClient(app) as client:
        yield App(client, engine, settings)


@pytest.fixture
def app(redis_server: RedisServer) -> Iterator[App]:
    """The real FastAPI app over the session's Redis (own key prefix) and the fake engine."""
    with running_app(redis_server) as running:
        yield running


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own (fresh data folder), for tests that freeze or kill it.

    The session's ``redis_server`` is shared by every other test: an outage there
    would be felt by whichever test runs next. Started as ``make serve`` starts its
    Redis (same command line, same fsync policy).
    """
    server = RedisServer(tmp_path / "own-redis", appendfsync=REDIS_APPENDFSYNC)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_app(own_redis: RedisServer) -> Iterator[App]:
    """The ``app`` fixture's app over ``own_redis``."""
    with running_app(own_redis) as running:
        yield running
