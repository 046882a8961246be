"""Conversation ids from clients are ``[A-Za-z0-9_-]{1,128}``; anything else is unknown.

A conversation lives under several Redis keys (``conv:<id>``, ``conv:<id>:messages``,
``conv:<id>:images``), so an id ending in ``:messages`` once named another key of a real
conversation: a GET gave a 503 (``WRONGTYPE``), a DELETE emptied the history, and
``:images`` gave a 500. The real app over a real Redis; the fake engine takes images.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

import cloudllm_serve.conversations.store as store_module
from tests.fakes import FakeEngine
from tests.http.conftest import App, build_app
from tests.support import RedisServer, data_url, image_bytes


@pytest.fixture
def vlm_app(redis_server: RedisServer) -> Iterator[App]:
    """The app over the shared Redis, its fake engine declared a vision-language model."""
    engine = FakeEngine()
    engine.supports_images = True
    app, settings = build_app(redis_server, engine, MAX_UPLOAD_BYTES=64 * 1024)
    with TestClient(app) as client:
        yield App(client, engine, settings)


#: What a client sends with ``{}`` standing for the id: the three reported requests, and
#: the body fields that take an id.
CALLS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/conversations/{}:messages", None),
    ("DELETE", "/conversations/{}:messages", None),
    ("GET", "/conversations/{}:images", None),
    ("DELETE", "/conversations/{}:images", None),
    ("POST", "/generate", {"message": "hello", "conversation_id": "{}:messages"}),
    ("POST", "/multimodal", {"message": "hello", "conversation_id": "{}:images"}),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "conversation_id": "{}:messages"},
    ),
]


def _fill(template: Any, value: str) -> Any:
    return json.loads(json.dumps(template).replace("{}", value)) if template else None


def _plain(template: Any) -> Any:
    """``template`` with its id's suffix taken away (a plain id there)."""
    if template is None:
        return None
    text = json.dumps(template) if not isinstance(template, str) else template
    text = text.replace("{}:messages", "{}").replace("{}:images", "{}")
    return text if isinstance(template, str) else json.loads(text)


@pytest.mark.parametrize(("method", "path", "body"), CALLS)
def test_another_key_of_a_conversation_is_an_unknown_id(
    vlm_app: App, method: str, path: str, body: dict[str, Any] | None
) -> None:
    client = vlm_app.client
    image = data_url(image_bytes(16, 16, seed=3))
    created = client.post("/multimodal", json={"message": "keep me", "images": [image]})
    assert created.status_code == 200, created.text
    cid = created.json()["conversation_id"]
    before = client.get(f"/conversations/{cid}").json()
    assert before["messages"][0]["images"]
    engine_calls = len(vlm_app.engine.requests) + len(vlm_app.engine.calls)

    # The same request with the whole id replaced by one never made.
    plain_path, plain_body = _plain(path), _plain(body)
    answers = []
    for sent_path, sent_body, value in (
        (path, body, cid),
        (plain_path, plain_body, uuid.uuid4().hex),
    ):
        answer = client.request(method, sent_path.format(value), json=_fill(sent_body, value))
        filled = _fill(sent_body, value)
        sent = filled["conversation_id"] if filled else sent_path.format(value).split("/")[-1]
        answers.append((answer.status_code, answer.text.replace(sent, "<id>")))

    assert answers[0] == answers[1], answers
    assert answers[0][0] == 404
    assert client.get(f"/conversations/{cid}").json() == before
    assert len(vlm_app.engine.requests) + len(vlm_app.engine.calls) == engine_calls


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("a" * 32, True),
        ("Az09_-", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("", False),
        ("a:b", False),
        ("a b", False),
        ("a\n", False),
        ("é", False),
        ("a*", False),
    ],
)
def test_conversation_id_pattern(value: str, valid: bool) -> None:
    assert store_module.is_conversation_id(value) is valid
