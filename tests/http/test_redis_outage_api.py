"""Redis frozen or killed under the HTTP layer: fast 503s, then recovery without restart.

Each test has a Redis of its own (``own_redis``): the session's is never stopped.
"""

from __future__ import annotations

import time

from tests.http.conftest import App
from tests.support import RedisServer, wait_for


def test_frozen_redis_gives_fast_503_then_recovers(own_app: App, own_redis: RedisServer) -> None:
    first = own_app.client.post("/generate", json={"message": "before"}).json()
    own_redis.freeze()
    try:
        started = time.monotonic()
        response = own_app.client.post("/generate", json={"message": "during"})
        assert response.status_code == 503
        assert "Redis" in response.json()["detail"]
        assert response.headers["Retry-After"]
        assert time.monotonic() - started < 5
        health = own_app.client.get("/health")
        assert health.status_code == 503
        assert "redis" in health.json()["status"]
    finally:
        own_redis.thaw()
    wait_for(lambda: own_app.client.get("/health").status_code == 200, 10)
    again = own_app.client.post(
        "/generate", json={"message": "after", "conversation_id": first["conversation_id"]}
    )
    assert again.status_code == 200
    stored = own_app.client.get(f"/conversations/{first['conversation_id']}").json()
    assert [m["content"] for m in stored["messages"]][::2] == ["before", "after"]


def test_killed_redis_gives_503_and_data_survives_restart(
    own_app: App, own_redis: RedisServer
) -> None:
    first = own_app.client.post("/generate", json={"message": "kept"}).json()
    own_redis.kill()
    try:
        started = time.monotonic()
        response = own_app.client.post(
            "/generate", json={"message": "lost?", "conversation_id": first["conversation_id"]}
        )
        assert response.status_code == 503
        assert time.monotonic() - started < 5
    finally:
        own_redis.start()
    wait_for(lambda: own_app.client.get("/health").status_code == 200, 10)
    stored = own_app.client.get(f"/conversations/{first['conversation_id']}").json()
    assert stored["messages"][0]["content"] == "kept"
    assert stored["message_count"] == 2
