"""Deadline-aware admission through the real FastAPI app and a real Redis.

The fake engine reports a slow, busy fleet (a full batch of 4 at 0.1 s a token, 100
requests waiting): every generating route refuses a request at once, with
``OVERLOAD_STATUS_CODE``, a ``Retry-After`` from the estimate and a message naming it,
streams before any byte; ``/status/detailed`` shows the estimate.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from cloudllm_serve.engine.protocol import EngineFleet, ReplicaStatus
from tests.fakes import FakeEngine, engine_stats
from tests.http.conftest import build_app
from tests.support import RedisServer, wait_for

TIMEOUT_S = 5.0


class BusyFleet(FakeEngine):
    """Reports a full batch of 4 decoding 40 tokens/s and ``waiting`` requests behind it."""

    waiting = 100

    async def fleet(self) -> EngineFleet:
        now = time.monotonic()
        stats = engine_stats(
            replica_id="busy",
            max_num_seqs=4,
            running_requests=4,
            pending_requests=self.waiting,
            tokens_generated=int(now * 40),
            requests_finished=int(now * 2),
        )
        return EngineFleet("HEALTHY", replicas=[ReplicaStatus("busy", "RUNNING", stats=stats)])


@pytest.fixture
def busy(redis_server: RedisServer) -> Iterator[tuple[TestClient, BusyFleet]]:
    engine = BusyFleet()
    app, _ = build_app(
        redis_server, engine, REQUEST_TIMEOUT_S=TIMEOUT_S, ADMISSION_POLL_INTERVAL_S=0.05
    )
    with TestClient(app) as client:
        # The first request starts the poll; admitted while there are no stats yet.
        assert client.post("/generate", json={"message": "hi"}).status_code == 200
        wait_for(
            lambda: client.get("/status/detailed").json()["admission"]["seconds_per_token"],
            timeout_s=10,
        )
        yield client, engine


def test_every_generating_route_refuses_what_would_miss_the_deadline(
    busy: tuple[TestClient, BusyFleet],
) -> None:
    client, engine = busy
    served = len(engine.requests)
    calls = [
        ("/generate", {"message": "hi", "max_tokens": 8}),
        ("/generate", {"message": "hi", "max_tokens": 8, "stream": True}),
        ("/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": "x"}]}),
        (
            "/v1/chat/completions",
            {"model": "fake", "messages": [{"role": "user", "content": "x"}], "stream": True},
        ),
        ("/v1/completions", {"model": "fake", "prompt": "x", "max_tokens": 4}),
    ]
    for path, body in calls:
        started = time.perf_counter()
        response = client.post(path, json=body)
        assert time.perf_counter() - started < 1.0
        assert response.status_code == 503, (path, response.text)
        assert response.headers["content-type"].startswith("application/json")
        assert int(response.headers["Retry-After"]) >= 1
        text = response.text
        assert "REQUEST_TIMEOUT_S (5 s)" in text and "behind" in text, text
    assert len(engine.requests) == served  # nothing reached the engine
    status = client.get("/status/detailed").json()["admission"]
    assert status["enabled"] and status["batch_slots"] == 4
    assert status["seconds_per_token_full_batch"] == pytest.approx(0.1, rel=0.3)
    assert status["estimate_max_tokens_cap"]["would_admit"] is False, json.dumps(status)
    metrics = client.app.state.service.metrics  # type: ignore[attr-defined]
    assert metrics.refusals.total(reason="deadline") == len(calls)


def test_the_same_fleet_with_room_admits(busy: tuple[TestClient, BusyFleet]) -> None:
    client, engine = busy
    engine.waiting = 0
    time.sleep(0.2)  # a few polls
    assert client.post("/generate", json={"message": "hi", "max_tokens": 8}).status_code == 200
