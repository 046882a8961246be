"""What anyone can reach: ``/health`` (cached, summarised) and the body read deadline.

``/health`` is public: many callers must not multiply engine and Redis calls, and a
failing one must not show where Redis or the engines live. A client that sends headers
and then stalls its body must not hold a connection past ``REQUEST_BODY_TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import uvicorn
from fastapi.testclient import TestClient

from cloudllm_serve.engine.protocol import EngineFleet, ReplicaStatus
from cloudllm_serve.errors import EngineUnavailableError
from cloudllm_serve.ingress.seed_api.status import HEALTH_CACHE_S
from tests.fakes import FakeEngine
from tests.http.conftest import App, build_app
from tests.support import RedisServer, server_port, wait_for

CALLERS = 8


class CountingEngine(FakeEngine):
    """The fake engine whose fleet answer takes a while and is counted."""

    def __init__(self) -> None:
        super().__init__()
        self.fleet_calls = 0
        self.fleet_error: Exception | None = None
        self.fleet_answer: EngineFleet | None = None

    async def fleet(self) -> EngineFleet:
        self.fleet_calls += 1
        await asyncio.sleep(0.2)  # long enough for every caller to arrive meanwhile
        if self.fleet_error is not None:
            raise self.fleet_error
        return self.fleet_answer or await super().fleet()


@pytest.fixture
def counted(own_redis: RedisServer) -> Iterator[tuple[App, CountingEngine]]:
    engine = CountingEngine()
    app, settings = build_app(own_redis, engine)
    with TestClient(app) as client:
        yield App(client, engine, settings), engine


def test_concurrent_health_calls_share_one_check(counted: tuple[App, CountingEngine]) -> None:
    app, engine = counted
    store = app.client.app.state.service.store  # type: ignore[attr-defined]
    round_trips = store.round_trips
    with ThreadPoolExecutor(CALLERS) as pool:
        answers = list(pool.map(lambda _: app.client.get("/health"), range(CALLERS)))
    assert [a.status_code for a in answers] == [200] * CALLERS
    assert engine.fleet_calls == 1
    assert store.round_trips - round_trips == 1
    assert app.client.get("/health").status_code == 200  # within the second: reused
    assert engine.fleet_calls == 1
    time.sleep(HEALTH_CACHE_S + 0.1)
    later = app.client.get("/health")
    assert engine.fleet_calls == 2
    assert later.json()["uptime"] >= answers[0].json()["uptime"] + HEALTH_CACHE_S


def test_a_failing_health_names_no_address(
    counted: tuple[App, CountingEngine], own_redis: RedisServer
) -> None:
    app, engine = counted
    where = f"10.1.2.3:{own_redis.port}"
    engine.fleet_error = EngineUnavailableError(f"engine unavailable: ConnectionError {where}")
    own_redis.stop()
    body = app.client.get("/health")
    assert body.status_code == 503
    assert body.json()["problems"] == [
        "engine: engine replicas unavailable",
        "redis: redis unavailable",
    ]
    assert body.json()["status"] == "unhealthy: engine unavailable; redis unavailable"

    engine.fleet_error = None
    engine.fleet_answer = EngineFleet(
        status="UNHEALTHY",
        target_replicas=1,
        message=f"replica failed: OSError at {where}",
        replicas=[ReplicaStatus("fake-1", "STARTING", error=f"Traceback ... {where}")],
    )
    time.sleep(HEALTH_CACHE_S + 0.1)
    text = app.client.get("/health").text
    assert "no engine replica running (deployment UNHEALTHY)" in text
    for detail in (where, "10.1.2.3", str(own_redis.port), "127.0.0.1", "Error", "Traceback"):
        assert detail not in text, (detail, text)


#: Long beside the pause of the body that arrives in pieces (a tenth of it): a busy host
#: (two pytest workers on 2 cores) once took more than the 0.33 s a 0.5 s limit left.
BODY_TIMEOUT_S = 1.5


@pytest.fixture
def served(redis_server: RedisServer) -> Iterator[int]:
    """The app under uvicorn on a loopback port (a real socket a client can stall)."""
    app, _ = build_app(redis_server, FakeEngine(), REQUEST_BODY_TIMEOUT_S=BODY_TIMEOUT_S)
    port = server_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 10, interval_s=0.05)
    yield port
    server.should_exit = True
    thread.join(10)


def _post_start(port: int, body: bytes, declared: int) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = (
        f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    )
    connection.sendall(head.encode() + body)
    return connection


def _read_all(connection: socket.socket) -> bytes:
    answer = b""
    while chunk := connection.recv(65536):
        answer += chunk
    return answer


def test_a_stalled_body_is_408_and_the_connection_closed(served: int) -> None:
    whole = b'{"message": "hi"}'
    started = time.monotonic()
    with _post_start(served, whole[:5], len(whole)) as stalled:
        answer = _read_all(stalled)  # returns once the server closes the connection
    took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert f"REQUEST_BODY_TIMEOUT_S ({BODY_TIMEOUT_S} s)".encode() in answer
    assert BODY_TIMEOUT_S <= took < BODY_TIMEOUT_S + 2, took
    # A body that arrives in time, in pieces, is answered as usual.
    with _post_start(served, whole[:5], len(whole)) as slow:
        time.sleep(BODY_TIMEOUT_S / 10)
        slow.sendall(whole[5:])
        assert slow.recv(65536).startswith(b"HTTP/1.1 200 ")
