"""Redis frozen or killed under the HTTP layer: fast 503s, then recovery without restart."""

from __future__ import annotations

import time

from tests.http.conftest import App
from tests.support import RedisServer, wait_for


def test_frozen_redis_gives_fast_503_then_recovers(app: App, redis_server: RedisServer) -> None:
    first = app.client.post("/generate", json={"message": "before"}).json()
    redis_server.freeze()
    try:
        started = time.monotonic()
        response = app.client.post("/generate", json={"message": "during"})
        assert response.status_code == 503
        assert "Redis" in response.json()["detail"]
        assert response.headers["Retry-After"]
        assert time.monotonic() - started < 5
        health = app.client.get("/health")
        assert health.status_code == 503
        assert "redis" in health.json()["status"]
    finally:
        redis_server.thaw()
    wait_for(lambda: app.client.get("/health").status_code == 200, 10)
    again = app.client.post(
        "/generate", json={"message": "after", "conversation_id": first["conversation_id"]}
    )
    assert again.status_code == 200
    stored = app.client.get(f"/conversations/{first['conversation_id']}").json()
    assert [m["content"] for m in stored["messages"]][::2] == ["before", "after"]


def test_killed_redis_gives_503_and_data_survives_restart(
    app: App, redis_server: RedisServer
) -> None:
    first = app.client.post("/generate", json={"message": "kept"}).json()
    redis_server.kill()
    try:
        started = time.monotonic()
        response = app.client.post(
            "/generate", json={"message": "lost?", "conversation_id": first["conversation_id"]}
        )
        assert response.status_code == 503
        assert time.monotonic() - started < 5
    finally:
        redis_server.start()
    wait_for(lambda: app.client.get("/health").status_code == 200, 10)
    stored = app.client.get(f"/conversations/{first['conversation_id']}").json()
    assert stored["messages"][0]["content"] == "kept"
    assert stored["message_count"] == 2
