"""The ``/v1`` ingress over the fake engine and a real Redis: relaying, conversations, errors.

What vLLM's serving layer answers is proven against raw vLLM in
``tests/stack/test_openai_differential.py``; here the fake stands in for it, so these
tests check only what the ingress itself does with the body and the answer.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from cloudllm_serve.ingress.cache_salt import cache_salt
from tests.http.conftest import App

CHAT = "/v1/chat/completions"


def sse_events(raw: str) -> list[Any]:
    events = []
    for block in raw.split("\n\n"):
        if block.startswith("data: "):
            payload = block.removeprefix("data: ")
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def chat(app: App, content: str = "hello", **body: Any) -> Any:
    return app.client.post(CHAT, json={"messages": [{"role": "user", "content": content}], **body})


def test_models_come_from_the_engine(app: App) -> None:
    listed = app.client.get("/v1/models").json()
    name = app.settings.model_name
    assert [m["id"] for m in listed["data"]] == [name]
    assert app.client.get(f"/v1/models/{name}").json()["id"] == name
    missing = app.client.get("/v1/models/gpt-4")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


def test_the_body_reaches_the_engine_as_sent(app: App) -> None:
    """As sent, but for ``cache_salt``: the tenant's (tests/http/test_server_ids_and_salts.py)."""
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "logprobs": True,
        "top_logprobs": 2,
        "repetition_penalty": 1.1,
        "chat_template_kwargs": {"x": 1},
    }
    response = app.client.post(CHAT, json=body)
    assert response.status_code == 200, response.text
    call = app.engine.calls[-1]
    assert call.kind == "chat"
    assert call.body == {**body, "cache_salt": cache_salt(None)}
    assert call.droppable_messages == 0 and not call.collect
    assert call.affinity_key is not None and call.affinity_key.startswith("chat:")
    assert "X-Conversation-Id" not in response.headers  # nothing stored unless asked
    assert response.json()["choices"][0]["message"]["content"] == "0 earlier messages; you said: hi"


def test_a_stream_is_relayed_and_its_end_kept_back(app: App) -> None:
    response = chat(app, stream=True)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"]["content"] for e in events[:-1])
    assert text == "0 earlier messages; you said: hello"
    assert all("usage" not in e for e in events[:-1])
    with_usage = sse_events(chat(app, stream=True, stream_options={"include_usage": True}).text)
    assert with_usage[-2]["choices"] == [] and with_usage[-2]["usage"]["completion_tokens"] == 6


def test_engine_answers_keep_their_status_and_body(app: App) -> None:
    for stream in (False, True):
        response = chat(app, model="gpt-4", stream=stream)
        assert response.status_code == 404
        assert response.json()["error"]["type"] == "NotFoundError"
        bad = chat(app, temperature="hot", stream=stream)
        assert bad.status_code == 400
        assert bad.json()["error"]["type"] == "Bad Request"


@pytest.mark.parametrize(
    ("content", "content_type", "words"),
    [
        (b"{", "application/json", "JSON decode error"),
        (b"[1, 2]", "application/json", "JSON object"),
        (b'{"prompt": "x"}', "text/plain", "Unsupported Media Type"),
    ],
)
def test_bodies_vllm_would_not_parse_are_400(
    app: App, content: bytes, content_type: str, words: str
) -> None:
    for path in (CHAT, "/v1/completions"):
        response = app.client.post(path, content=content, headers={"Content-Type": content_type})
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["type"] == "Bad Request" and words in error["message"]
    assert not app.engine.calls


@pytest.mark.parametrize(
    ("content", "param", "words"),
    [
        # Found by tests/http/test_fuzz_openapi.py: each of these was a 500 (or unbounded).
        (
            b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
            "messages.0.content",
            "Unicode",
        ),
        (b'{"prompt": "hi", "n": 100000000000000000000}', "n", "out of range"),
        (b'{"prompt": "hi", "x": ' + b"[" * 1500 + b"]" * 1500 + b"}", "body", "nested deeper"),
        (b'{"prompt": "hi", "x": ' + b"[" * 120 + b"]" * 120 + b"}", "x.0.0.0", "nested deeper"),
    ],
)
def test_json_outside_the_ingress_limits_is_400_naming_where(
    app: App, content: bytes, param: str, words: str
) -> None:
    for path in (CHAT, "/v1/completions"):
        response = app.client.post(
            path, content=content, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"].startswith(param) and words in error["message"], error
    assert not app.engine.calls


def test_a_body_over_the_upload_limit_is_413(app: App) -> None:
    huge = chat(app, content="x" * 5000)
    assert huge.status_code == 413
    assert "MAX_UPLOAD_BYTES" in huge.json()["error"]["message"]


def test_server_side_conversation(app: App) -> None:
    first = chat(app, content="first", store=True)
    cid = first.headers["X-Conversation-Id"]
    assert first.json()["conversation_id"] == cid
    assert "store" not in app.engine.calls[-1].body
    second = chat(app, content="second", conversation_id=cid)
    assert second.headers["X-Conversation-Id"] == cid
    assert second.json()["choices"][0]["message"]["content"].startswith("2 earlier messages")
    call = app.engine.calls[-1]
    assert "conversation_id" not in call.body
    assert call.droppable_messages == 2 and call.collect
    assert call.body["max_tokens"] == app.settings.MAX_TOKENS_CAP  # the fitting budget
    assert call.affinity_key == f"conv:{cid}"
    streamed = chat(app, content="third", conversation_id=cid, stream=True)
    assert streamed.headers["X-Conversation-Id"] == cid
    stored = app.client.get(f"/conversations/{cid}").json()
    assert [m["content"] for m in stored["messages"]][::2] == ["first", "second", "third"]
    assert stored["messages"][-1]["content"] == "4 earlier messages; you said: third"
    # the seed API continues the same conversation
    seed = app.client.post("/generate", json={"message": "fourth", "conversation_id": cid})
    assert seed.json()["response"].startswith("6 earlier messages")


def test_tool_calls_and_tool_messages_are_stored(app: App) -> None:
    cid = chat(app, content="weather?", store=True).headers["X-Conversation-Id"]
    call = {"id": "call-1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    turn = [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call-1", "content": "18 C"},
    ]
    response = app.client.post(CHAT, json={"messages": turn, "conversation_id": cid})
    assert response.status_code == 200, response.text
    stored = app.client.get(f"/conversations/{cid}").json()["messages"]
    assert stored[2]["tool_calls"] == [call] and stored[2]["content"] == ""
    assert stored[3]["tool_call_id"] == "call-1"
    assert "tool_calls" not in stored[0]  # plain messages keep the seed's three keys
    sent = app.engine.calls[-1].body["messages"]
    assert sent[2] == turn[0]  # this turn goes as sent; stored, content None is ""
    assert sent[3] == turn[1]


def test_conversation_rules(app: App) -> None:
    unknown = chat(app, conversation_id="nope")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["param"] == "conversation_id"
    cid = chat(app, store=True).headers["X-Conversation-Id"]
    for body, param in [
        ({"conversation_id": cid, "n": 2}, "n"),
        ({"conversation_id": cid, "store": True}, "store"),
        ({"store": "yes"}, "store"),
        ({"conversation_id": 7}, "conversation_id"),
    ]:
        response = chat(app, **body)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["param"] == param
    refusal = [{"type": "refusal", "refusal": "no"}]  # text to vLLM, but not storable
    refused = app.client.post(
        CHAT, json={"messages": [{"role": "user", "content": refusal}], "conversation_id": cid}
    )
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "messages.0.content"
    image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]
    text_only = app.client.post(CHAT, json={"messages": [{"role": "user", "content": image}]})
    assert text_only.status_code == 501, text_only.text
    assert "SmolLM2-135M-Instruct" in text_only.json()["error"]["message"]
    completion = app.client.post("/v1/completions", json={"prompt": "x", "store": True})
    assert completion.status_code == 400


def test_history_that_does_not_fit_drops_the_oldest_turns(app: App) -> None:
    cid = chat(app, content="w " * 90, store=True).headers["X-Conversation-Id"]
    response = chat(app, content="w " * 90, conversation_id=cid)
    assert response.status_code == 200, response.text
    # The history messages the engine left out (one, here) are counted.
    metrics = app.client.app.state.service.metrics  # type: ignore[attr-defined]
    assert metrics.dropped_history.total(api="openai") == 1
    alone = chat(app, content="w " * 500, conversation_id=cid)
    assert alone.status_code == 400
    assert app.client.get(f"/conversations/{cid}").json()["message_count"] == 4


def test_a_failed_first_turn_leaves_no_conversation(app: App) -> None:
    before = app.client.get("/conversations").json()["total"]
    for stream in (False, True):
        assert chat(app, model="gpt-4", store=True, stream=stream).status_code == 404
        failed = chat(app, content="say:one FAIL", store=True, stream=stream)
        if stream:
            events = sse_events(failed.text)
            assert "error" in events[-2] and events[-1] == "[DONE]"
    assert app.client.get("/conversations").json()["total"] == before + 0


def test_engine_outage_is_503_in_openai_format(app: App) -> None:
    app.engine.down = True
    for stream in (False, True):
        response = chat(app, stream=stream)
        assert response.status_code == 503
        assert response.headers["Retry-After"]
        assert response.json()["error"]["type"] == "service_unavailable_error"
    assert app.client.get("/v1/models").status_code == 503


def test_unknown_v1_routes_and_methods_answer_in_openai_body(app: App) -> None:
    """As vllm serve: the error body is OpenAI's, its type the HTTP phrase."""
    wrong_method = app.client.get("/v1/chat/completions")
    assert wrong_method.status_code == 405
    assert wrong_method.json() == {
        "error": {
            "message": "Method Not Allowed",
            "type": "Method Not Allowed",
            "param": None,
            "code": 405,
        }
    }
    unknown = app.client.post("/v1/embeddings", json={})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["type"] == "Not Found"
    assert app.client.get("/nope").json()["error_type"] == "not_found"  # seed API's body
