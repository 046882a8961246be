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
from cloudllm_serve.devhost.launcher import REDIS_APPENDFSYNC
from cloudllm_serve.ingress.app import create_app
from cloudllm_serve.ingress.service import CloudLLMService
from cloudllm_serve.settings import Settings
from tests.fakes import FakeEngine
from tests.support import RedisClusterNodes, RedisServer, SentinelGroup

#: Where a test's conversations are kept: one Redis, a Redis Cluster, or Sentinel's primary.
StoreRedis = RedisServer | RedisClusterNodes | SentinelGroup


@dataclass
class App:
    client: TestClient
    engine: FakeEngine
    settings: Settings


def build_app(
    redis_server: StoreRedis, engine: FakeEngine, **overrides: Any
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
    settings = Settings(**redis_server.settings, **{**defaults, **overrides})
    store = ConversationStore.from_settings(settings, key_prefix=f"test-{uuid.uuid4().hex[:8]}:")
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


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    """A Redis Cluster of three primaries (each with a replica) that tests share.

    Each test keeps to its own key prefix; none stops a node of it (the failover test
    makes a cluster of its own).
    """
    # Redis's default node timeout: none of these tests stops a node, and with 1 s a node
    # that a loaded 2-core host kept from answering was failed over mid-test (a 503 "The
    # cluster is down" in one make test).
    cluster = RedisClusterNodes(tmp_path_factory.mktemp("redis-cluster"), node_timeout_ms=15_000)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["redis", pytest.param("cluster", marks=pytest.mark.redis_ha)])
def store_redis(request: pytest.FixtureRequest, redis_server: RedisServer) -> StoreRedis:
    """The session's Redis, then the session's Redis Cluster: a test using it runs on both."""
    if request.param == "cluster":
        cluster: RedisClusterNodes = request.getfixturevalue("redis_cluster")
        return cluster
    return redis_server


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
