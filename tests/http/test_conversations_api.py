"""``/v1/conversations`` at the HTTP layer: OpenAI's Conversations API on our store.

The real app over a real Redis with API keys on; the fake engine answers a response with
the number of input items it was given, so a conversation's history is visible.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.http.test_tenants import TenantApp, make_app
from tests.support import RedisServer


@pytest.fixture
def app(redis_server: RedisServer, tmp_path: Path) -> Iterator[TenantApp]:
    yield from make_app(redis_server, tmp_path)


def _call(
    app: TenantApp, method: str, path: str, body: Any = None, tenant: str = "tenant-a"
) -> Any:
    return app.client.request(method, path, json=body, headers=app.keys.auth(tenant))


def _ok(app: TenantApp, method: str, path: str, body: Any = None) -> Any:
    response = _call(app, method, path, body)
    assert response.status_code == 200, response.text
    return response.json()


def _texts(listing: dict[str, Any]) -> list[str]:
    return [item["content"][0]["text"] for item in listing["data"] if item["type"] == "message"]


def test_a_conversation_is_created_read_updated_listed_and_deleted(app: TenantApp) -> None:
    made = _ok(
        app,
        "POST",
        "/v1/conversations",
        {"items": [{"type": "message", "role": "user", "content": "one"}], "metadata": {"k": "v"}},
    )
    assert made["object"] == "conversation" and made["metadata"] == {"k": "v"}
    path = f"/v1/conversations/{made['id']}"
    assert _ok(app, "GET", path) == made
    added = _ok(
        app,
        "POST",
        f"{path}/items",
        {
            "items": [
                {"role": "assistant", "content": [{"type": "output_text", "text": "two"}]},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "42"},
            ]
        },
    )
    assert [i["type"] for i in added["data"]] == [
        "message",
        "function_call",
        "function_call_output",
    ]
    listing = _ok(app, "GET", f"{path}/items")  # newest first
    assert [i["type"] for i in listing["data"]][:2] == ["function_call_output", "function_call"]
    asc = _ok(app, "GET", f"{path}/items?order=asc&limit=2")
    assert _texts(asc) == ["one", "two"] and asc["has_more"] is True
    rest = _ok(app, "GET", f"{path}/items?order=asc&after={asc['last_id']}")
    assert [i["output"] for i in rest["data"] if i["type"] == "function_call_output"] == ["42"]
    first_id = asc["first_id"]
    assert _ok(app, "GET", f"{path}/items/{first_id}")["content"][0]["text"] == "one"
    assert _ok(app, "DELETE", f"{path}/items/{first_id}")["id"] == made["id"]
    assert _call(app, "GET", f"{path}/items/{first_id}").status_code == 404
    assert _texts(_ok(app, "GET", f"{path}/items?order=asc")) == ["two"]
    assert _ok(app, "POST", path, {"metadata": {"k": "w"}})["metadata"] == {"k": "w"}
    deleted = _ok(app, "DELETE", path)
    assert deleted == {"id": made["id"], "object": "conversation.deleted", "deleted": True}
    assert _call(app, "GET", path).status_code == 404


def test_a_response_in_a_conversation_sees_its_items_and_adds_to_them(app: TenantApp) -> None:
    made = _ok(app, "POST", "/v1/conversations", {"items": [{"role": "user", "content": "one"}]})
    answer = _ok(app, "POST", "/v1/responses", {"input": "two", "conversation": made["id"]})
    assert answer["conversation"] == {"id": made["id"]}
    assert answer["usage"]["input_tokens"] == 2  # the conversation's item, then the input
    again = _ok(
        app, "POST", "/v1/responses", {"input": "three", "conversation": {"id": made["id"]}}
    )
    assert again["usage"]["input_tokens"] == 4  # one, two, the answer, three
    items = _ok(app, "GET", f"/v1/conversations/{made['id']}/items?order=asc")
    assert [i["role"] for i in items["data"]] == ["user", "user", "assistant", "user", "assistant"]
    assert app.engine.calls[-1].affinity_key == f"resp:conv:{made['id']}"
    # The same conversation on the seed API: /generate continues it and sees its messages.
    turn = _ok(app, "POST", "/generate", {"message": "four", "conversation_id": made["id"]})
    assert turn["response"].startswith("5 earlier messages")
    assert len(_ok(app, "GET", f"/v1/conversations/{made['id']}/items")["data"]) == 7
    both = _call(
        app,
        "POST",
        "/v1/responses",
        {"input": "x", "conversation": made["id"], "previous_response_id": answer["id"]},
    )
    assert both.status_code == 400 and both.json()["error"]["param"] == "conversation"


def test_another_tenants_conversation_is_an_unknown_one(app: TenantApp) -> None:
    made = _ok(app, "POST", "/v1/conversations", {"items": [{"role": "user", "content": "secret"}]})
    item = _ok(app, "GET", f"/v1/conversations/{made['id']}/items")["data"][0]["id"]
    never = "0" * 32
    for method, path, body in (
        ("GET", "/v1/conversations/{}", None),
        ("POST", "/v1/conversations/{}", {"metadata": {}}),
        ("GET", "/v1/conversations/{}/items", None),
        ("POST", "/v1/conversations/{}/items", {"items": [{"role": "user", "content": "x"}]}),
        ("GET", "/v1/conversations/{}/items/" + item, None),
        ("DELETE", "/v1/conversations/{}/items/" + item, None),
        ("DELETE", "/v1/conversations/{}", None),
    ):
        foreign = _call(app, method, path.format(made["id"]), body, tenant="tenant-b")
        unknown = _call(app, method, path.format(never), body, tenant="tenant-b")
        assert foreign.status_code == unknown.status_code == 404, (method, path, foreign.text)
        assert (
            foreign.json()["error"]["message"].replace(made["id"], never)
            == (unknown.json()["error"]["message"])
        )
    refused = _call(
        app, "POST", "/v1/responses", {"input": "x", "conversation": made["id"]}, tenant="tenant-b"
    )
    assert refused.status_code == 404 and refused.json()["error"]["param"] == "conversation"
    assert len(_ok(app, "GET", f"/v1/conversations/{made['id']}/items")["data"]) == 1


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"items": "x"}, "items"),
        ({"items": [{"role": "robot", "content": "x"}]}, "items.0"),
        ({"items": [{"type": "input_image", "image_url": "data:"}]}, "items.0"),
        ({"items": [{"role": "user", "content": [{"type": "input_image"}]}]}, "items.0.content.0"),
        ({"items": [{"type": "function_call", "name": "f"}]}, "items.0"),
        ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k": 1}}, "metadata.k"),
        ({"items": [{"role": "user", "content": "x"}] * 21}, "items"),
    ],
)
def test_bad_conversations_name_the_problem(app: TenantApp, body: Any, param: str) -> None:
    response = _call(app, "POST", "/v1/conversations", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
