"""``/v1/responses`` at the HTTP layer: kept responses, chains, tenants, bad input.

The real app over a real Redis with API keys on; the fake engine answers a response
with the number of input items it was given, so a chain's history is visible.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cloudllm_serve.conversations.store import ConversationStore
from cloudllm_serve.ingress.app import create_app
from cloudllm_serve.ingress.service import CloudLLMService
from tests.fakes import FakeEngine
from tests.http.test_tenants import TenantApp, make_app
from tests.support import RedisServer


@pytest.fixture
def app(redis_server: RedisServer, tmp_path: Path) -> Iterator[TenantApp]:
    yield from make_app(redis_server, tmp_path)


def _create(app: TenantApp, tenant: str = "tenant-a", **body: Any) -> dict[str, Any]:
    response = app.client.post("/v1/responses", json=body, headers=app.keys.auth(tenant))
    assert response.status_code == 200, response.text
    payload: dict[str, Any] = response.json()
    return payload


def test_responses_chain_by_previous_response_id_and_are_kept(app: TenantApp) -> None:
    first = _create(app, input="one")
    second = _create(app, input="two", previous_response_id=first["id"])
    third = _create(
        app,
        input=[{"role": "user", "content": "three"}],
        previous_response_id=second["id"],
    )
    # input items seen by the engine: 1, then 1 + 1 output + 1, then 2 x 2 + 1
    assert [r["usage"]["input_tokens"] for r in (first, second, third)] == [1, 3, 5]
    assert third["previous_response_id"] == second["id"]
    engine_input = app.engine.calls[-1].body["input"]
    assert [item.get("content") for item in engine_input if item.get("role") == "user"] == [
        "one",
        "two",
        "three",
    ]
    assert app.engine.calls[-1].preferred_replica == "fake-1"
    assert app.engine.calls[-1].affinity_key == f"resp:{first['id']}"

    auth = app.keys.auth("tenant-a")
    got = app.client.get(f"/v1/responses/{second['id']}", headers=auth)
    assert got.status_code == 200 and got.json() == second
    items = app.client.get(f"/v1/responses/{third['id']}/input_items", headers=auth).json()
    assert items["object"] == "list" and items["has_more"] is False
    assert items["data"][0]["content"] == [{"type": "input_text", "text": "three"}]


def test_input_items_paginate(app: TenantApp) -> None:
    texts = ["a", "b", "c"]
    made = _create(app, input=[{"role": "user", "content": t} for t in texts])
    auth = app.keys.auth("tenant-a")
    path = f"/v1/responses/{made['id']}/input_items"
    page = app.client.get(path, params={"limit": 2, "order": "asc"}, headers=auth).json()
    assert [i["content"][0]["text"] for i in page["data"]] == ["a", "b"]
    assert page["has_more"] is True
    rest = app.client.get(
        path, params={"limit": 2, "order": "asc", "after": page["last_id"]}, headers=auth
    ).json()
    assert [i["content"][0]["text"] for i in rest["data"]] == ["c"]
    assert rest["has_more"] is False


def test_delete_then_404_and_store_false_keeps_nothing(app: TenantApp) -> None:
    auth = app.keys.auth("tenant-a")
    made = _create(app, input="hi")
    deleted = app.client.delete(f"/v1/responses/{made['id']}", headers=auth)
    assert deleted.json() == {"id": made["id"], "object": "response", "deleted": True}
    assert app.client.get(f"/v1/responses/{made['id']}", headers=auth).status_code == 404
    assert app.client.delete(f"/v1/responses/{made['id']}", headers=auth).status_code == 404
    unkept = _create(app, input="hi", store=False)
    assert app.client.get(f"/v1/responses/{unkept['id']}", headers=auth).status_code == 404


def test_another_tenants_response_is_an_unknown_one(app: TenantApp) -> None:
    made = _create(app, "tenant-a", input="secret")
    never = "resp_" + "0" * 32
    other = app.keys.auth("tenant-b")
    for path in ("/v1/responses/{}", "/v1/responses/{}/input_items"):
        foreign = app.client.get(path.format(made["id"]), headers=other)
        unknown = app.client.get(path.format(never), headers=other)
        assert foreign.status_code == unknown.status_code == 404
        assert (
            foreign.json()["error"]["message"].replace(made["id"], never)
            == (unknown.json()["error"]["message"])
        )
        assert foreign.json()["error"]["type"] == unknown.json()["error"]["type"]
    assert app.client.delete(f"/v1/responses/{made['id']}", headers=other).status_code == 404
    chained = app.client.post(
        "/v1/responses",
        json={"input": "more", "previous_response_id": made["id"]},
        headers=other,
    )
    assert chained.status_code == 404
    assert chained.json()["error"]["param"] == "previous_response_id"
    # still there for its owner
    mine = app.client.get(f"/v1/responses/{made['id']}", headers=app.keys.auth("tenant-a"))
    assert mine.status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"input": 3}, 400, "input"),
        ({"input": []}, 400, "input"),
        ({"input": ["x"]}, 400, "input.0"),
        ({"input": "hi", "store": "yes"}, 400, "store"),
        ({"input": "hi", "previous_response_id": 7}, 400, "previous_response_id"),
        ({"input": "hi", "previous_response_id": "nope"}, 404, "previous_response_id"),
        ({"input": "hi", "background": "yes"}, 400, "background"),
        ({"input": "hi", "background": True, "store": False}, 400, "background"),
        ({"input": "hi", "background": True, "stream": True}, 501, "stream"),
        ({"input": "hi", "conversation": "conv_1"}, 404, "conversation"),
        ({"input": "hi", "conversation": 5}, 400, "conversation"),
        ({"input": "hi", "conversation": {"name": "x"}}, 400, "conversation"),
    ],
)
def test_bad_requests_name_the_problem(
    app: TenantApp, body: dict[str, Any], status: int, param: str
) -> None:
    response = app.client.post("/v1/responses", json=body, headers=app.keys.auth("tenant-a"))
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param
    assert app.engine.calls == []


def test_a_chain_goes_on_in_a_new_ingress_over_the_same_redis(app: TenantApp) -> None:
    """Another ingress replica, or this one restarted: the chain is read from Redis."""
    first = _create(app, input="one")
    settings = app.service.settings
    store = ConversationStore.from_settings(settings, key_prefix=app.prefix)  # its own client
    again = CloudLLMService(settings, store, FakeEngine())
    with TestClient(create_app(again)) as other:
        response = other.post(
            "/v1/responses",
            json={"input": "two", "previous_response_id": first["id"]},
            headers=app.keys.auth("tenant-a"),
        )
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["input_tokens"] == 3


def _poll(app: TenantApp, response_id: str, until: set[str], tenant: str = "tenant-a") -> Any:
    """GET the response until its status is in ``until`` (10 s at most)."""
    deadline = time.monotonic() + 10
    while True:
        got = app.client.get(f"/v1/responses/{response_id}", headers=app.keys.auth(tenant))
        assert got.status_code == 200, got.text
        if got.json()["status"] in until or time.monotonic() > deadline:
            return got.json()
        time.sleep(0.05)


def test_a_background_response_runs_apart_and_is_read_when_done(app: TenantApp) -> None:
    app.engine.response_delay_s = 0.3
    first = _create(app, input="one", background=True, metadata={"k": "v"})
    assert (first["status"], first["background"], first["output"]) == ("queued", True, [])
    assert first["metadata"] == {"k": "v"} and first["model"] == app.engine.model
    assert _poll(app, first["id"], {"in_progress"})["status"] == "in_progress"
    done = _poll(app, first["id"], {"completed", "failed"})
    assert done["status"] == "completed" and done["background"] is True, done
    assert done["id"] == first["id"] and done["usage"]["input_tokens"] == 1
    # A chain goes on from it; its input items are kept.
    second = _create(app, input="two", previous_response_id=first["id"])
    assert second["usage"]["input_tokens"] == 3
    items = app.client.get(
        f"/v1/responses/{first['id']}/input_items", headers=app.keys.auth("tenant-a")
    )
    assert [i["content"][0]["text"] for i in items.json()["data"]] == ["one"]
    # Its tokens were charged and counted once it ended.
    assert app.service.metrics.tokens.total(kind="completion") >= 3 + 3


def test_cancel_stops_a_background_response_in_the_engine(app: TenantApp) -> None:
    app.engine.response_delay_s = 60
    auth = app.keys.auth("tenant-a")
    made = _create(app, input="long", background=True)
    cancelled = app.client.post(f"/v1/responses/{made['id']}/cancel", headers=auth)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    deadline = time.monotonic() + 10
    while app.engine.cancelled == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert app.engine.cancelled == 1  # the engine request was aborted
    kept = app.client.get(f"/v1/responses/{made['id']}", headers=auth)
    assert kept.json()["status"] == "cancelled"
    again = app.client.post(f"/v1/responses/{made['id']}/cancel", headers=auth)
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    # Not cancellable: a finished one, a synchronous one, another tenant's, an unknown id.
    app.engine.response_delay_s = 0
    finished = _create(app, input="short", background=True)
    assert _poll(app, finished["id"], {"completed"})["status"] == "completed"
    late = app.client.post(f"/v1/responses/{finished['id']}/cancel", headers=auth)
    assert late.status_code == 400 and "completed" in late.json()["error"]["message"]
    plain = _create(app, input="sync")
    refused = app.client.post(f"/v1/responses/{plain['id']}/cancel", headers=auth)
    assert refused.status_code == 400 and "background" in refused.json()["error"]["message"]
    other = app.client.post(f"/v1/responses/{made['id']}/cancel", headers=app.keys.auth("tenant-b"))
    assert other.status_code == 404


def test_a_background_response_holds_its_concurrency_slot_until_it_ends(app: TenantApp) -> None:
    """Background is no way around max_concurrent_requests: the slot is the generation's."""
    app.engine.response_delay_s = 60
    auth = app.keys.auth("conc-1")
    made = _create(app, "conc-1", input="long", background=True)
    second = app.client.post("/v1/responses", json={"input": "more"}, headers=auth)
    assert second.status_code == 429, second.text
    app.client.post(f"/v1/responses/{made['id']}/cancel", headers=auth)
    app.engine.response_delay_s = 0
    deadline = time.monotonic() + 10
    while True:
        third = app.client.post("/v1/responses", json={"input": "more"}, headers=auth)
        if third.status_code != 429 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert third.status_code == 200, third.text


def test_a_background_response_left_by_a_stopped_replica_reads_as_failed(app: TenantApp) -> None:
    app.engine.response_delay_s = 60
    made = _create(app, input="long", background=True)
    # The replica running it stopped: its lease (the run key) is gone.
    client = app.redis.client()
    (run_key,) = [k for k in client.keys(f"{app.prefix}*{made['id']}*:run")]
    client.delete(run_key)
    got = _poll(app, made["id"], {"failed"})
    assert got["status"] == "failed" and "stopped" in got["error"]["message"]
    # The generation noticed too, and stopped in the engine.
    deadline = time.monotonic() + 10
    while app.engine.cancelled == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert app.engine.cancelled == 1
