"""``/v1/responses`` at the HTTP layer: kept responses, chains, tenants, bad input.

The real app over a real Redis with API keys on; the fake engine answers a response
with the number of input items it was given, so a chain's history is visible.
"""

from __future__ import annotations

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
        ({"input": "hi", "background": True}, 501, "background"),
        ({"input": "hi", "conversation": "conv_1"}, 501, "conversation"),
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
