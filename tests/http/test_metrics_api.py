"""Our metrics, counted by the real app over a real Redis (the fake engine behind it).

Outside a Ray worker the metrics count in memory (``cloudllm_serve.metrics``); the
stack tests (tests/stack/test_metrics.py) read the same through Ray's metrics agent.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from cloudllm_serve.metrics import IngressMetrics
from tests.http.conftest import App
from tests.http.test_overload_and_timeout import make_client
from tests.support import RedisServer


def metrics_of(client: TestClient) -> IngressMetrics:
    metrics: IngressMetrics = client.app.state.service.metrics  # type: ignore[attr-defined]
    return metrics


def test_requests_durations_tokens_and_store_operations(app: App) -> None:
    metrics = metrics_of(app.client)
    first = app.client.post("/generate", json={"message": "hello there", "max_tokens": 8})
    assert first.status_code == 200
    cid = first.json()["conversation_id"]
    second = app.client.post("/generate", json={"message": "again", "conversation_id": cid})
    app.client.post("/generate", json={"message": ""})
    app.client.get(f"/conversations/{cid}")
    app.client.get("/no/such/route")
    assert metrics.requests.total(api="seed", route="/generate", status="200") == 2
    assert metrics.requests.total(api="seed", route="/generate", status="422") == 1
    assert metrics.requests.total(route="/conversations/{conversation_id}", status="200") == 1
    assert metrics.requests.total(api="other", route="unmatched", status="404") == 1
    assert metrics.request_duration.counts[("seed", "/generate")] == 3
    answered = [first.json(), second.json()]
    generated = sum(a["model_info"]["timings"]["tokens_generated"] for a in answered)
    assert generated > 0
    assert metrics.tokens.total(kind="completion") == generated
    prompt = sum(a["model_info"]["timings"]["prompt_tokens"] for a in answered)
    assert metrics.tokens.total(kind="prompt") == prompt
    for operation in ("create", "get", "append"):
        assert metrics.store_duration.counts[(operation,)] >= 1, operation
    # the second turn was answered by the first turn's replica (the fake has one)
    assert metrics.affinity.total(outcome="hit") == 1
    assert metrics.affinity.total(outcome="miss") == 0


def test_streams_time_their_first_event(app: App) -> None:
    metrics = metrics_of(app.client)
    with app.client.stream("POST", "/generate", json={"message": "hi", "stream": True}) as r:
        assert r.status_code == 200
        list(r.iter_lines())
    body = {"model": app.engine.model, "messages": [{"role": "user", "content": "hi"}]}
    with app.client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        list(r.iter_lines())
    app.client.post("/v1/chat/completions", json=body)
    assert metrics.time_to_first_token.counts[("seed",)] == 1
    assert metrics.time_to_first_token.counts[("openai",)] == 1  # not the whole answer


def test_dropped_history_is_counted(app: App) -> None:
    metrics = metrics_of(app.client)
    app.engine.context_words = 30
    cid = app.client.post("/generate", json={"message": "w " * 20}).json()["conversation_id"]
    answer = app.client.post("/generate", json={"message": "w " * 10, "conversation_id": cid})
    dropped = answer.json()["dropped_history_messages"]
    assert metrics.dropped_history.total(api="seed") == dropped


@pytest.fixture
def full(redis_server: RedisServer) -> Iterator[TestClient]:
    for client, _, _ in make_client(redis_server, None, OVERLOAD_STATUS_CODE=429):
        yield client


def test_refusals_by_reason(full: TestClient) -> None:
    metrics = metrics_of(full)
    assert set(metrics.refusals.totals) == {
        ("queue_full",),
        ("deadline",),
        ("late",),
        ("tenant_share",),
        ("timeout",),
        ("rate_limit",),
        ("auth",),
    }  # exported at 0 from the start
    for _ in range(3):
        assert full.post("/generate", json={"message": "hi"}).status_code == 429
    assert metrics.refusals.total(reason="queue_full") == 3
    assert metrics.requests.total(status="429") == 3
