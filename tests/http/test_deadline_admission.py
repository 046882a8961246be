"""Deadline-aware admission through the real FastAPI app and a real Redis.

The fake engine reports a slow, busy fleet (a full batch of 4 at 0.1 s a token, 100
requests waiting): every generating route refuses a request at once, with
``OVERLOAD_STATUS_CODE``, a ``Retry-After`` from the estimate and a message naming it,
streams before any byte; ``/status/detailed`` shows the estimate.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from fastapi.testclient import TestClient

from cloudllm_serve.engine.protocol import (
    EngineFleet,
    GenerationChunk,
    GenerationRequest,
    ReplicaStatus,
)
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


class SlowingFleet(FakeEngine):
    """A full batch of 4 with 4 more waiting, at ``rate`` tokens/s.

    With ``hold``, what it is sent waits for a batch slot that never frees (cancelled
    when given up); lowering ``rate`` is the engines slowing down after the admission.
    """

    rate = 40.0

    def __init__(self) -> None:
        super().__init__()
        self._tokens = 0.0
        self._at = time.monotonic()

    async def fleet(self) -> EngineFleet:
        now = time.monotonic()
        self._tokens += self.rate * (now - self._at)
        self._at = now
        stats = engine_stats(
            replica_id="slowing",
            max_num_seqs=4,
            running_requests=4,
            pending_requests=4,
            tokens_generated=int(self._tokens),
            requests_finished=int(self._tokens / 20),
        )
        return EngineFleet("HEALTHY", replicas=[ReplicaStatus("slowing", "RUNNING", stats=stats)])

    hold = False

    async def generate(self, request: GenerationRequest) -> AsyncIterator[list[GenerationChunk]]:
        if not self.hold:
            async for batch in super().generate(request):
                yield batch
            return
        self.requests.append(request)
        try:
            await asyncio.sleep(3600)  # waiting for a slot
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        yield []


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_that_can_no_longer_finish_is_refused_before_it_starts(
    redis_server: RedisServer, stream: bool
) -> None:
    engine = SlowingFleet()
    app, _ = build_app(redis_server, engine, REQUEST_TIMEOUT_S=10.0, ADMISSION_POLL_INTERVAL_S=0.05)
    with TestClient(app) as client:
        client.post("/generate", json={"message": "hi"})  # starts the poll (no stats: admitted)
        wait_for(
            lambda: client.get("/status/detailed").json()["admission"]["seconds_per_token"],
            timeout_s=10,
        )
        engine.hold = True
        served = len(engine.requests)

        def slow_down() -> None:
            time.sleep(0.5)  # admitted by then, waiting for a slot
            engine.rate = 4.0  # a token every second a sequence: 8 tokens no longer fit

        threading.Thread(target=slow_down).start()
        started = time.perf_counter()
        body = {"message": "hi", "max_tokens": 8, "stream": stream}
        response = client.post("/generate", json=body)
        took = time.perf_counter() - started
    assert len(engine.requests) == served + 1  # admitted: it went to the engine
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert int(response.headers["Retry-After"]) >= 1
    assert "has not started" in response.text and "REQUEST_TIMEOUT_S (10 s)" in response.text
    assert took < 6.0  # well before the timeout
    assert engine.cancelled >= 1  # given up in the engine's queue
    metrics = app.state.service.metrics
    assert metrics.refusals.total(reason="late") == 1
