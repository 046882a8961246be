"""The OpenAI-compatible API over the fake engine and a real Redis: wire format and errors."""

from __future__ import annotations

import json
from typing import Any

import pytest

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


def test_models(app: App) -> None:
    listed = app.client.get("/v1/models").json()
    name = app.settings.model_name
    assert listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == [name]
    assert listed["data"][0]["max_model_len"] == app.settings.VLLM_MAX_MODEL_LEN
    assert app.client.get(f"/v1/models/{name}").json()["id"] == name
    missing = app.client.get("/v1/models/gpt-4")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


def test_chat_completion_body(app: App) -> None:
    response = chat(app, max_tokens=20, temperature=0.5, top_p=0.9, seed=7)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == app.settings.model_name
    (choice,) = body["choices"]
    assert choice["message"] == {
        "role": "assistant",
        "content": "0 earlier messages; you said: hello",
    }
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert "X-Conversation-Id" not in response.headers  # nothing stored unless asked
    sampling = app.engine.requests[-1].sampling
    assert (sampling.temperature, sampling.top_p, sampling.seed) == (0.5, 0.9, 7)


def test_chat_stream_with_usage(app: App) -> None:
    response = chat(app, stream=True, stream_options={"include_usage": True})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "0 earlier messages; you said: hello"
    finishing = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishing[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == len(text.split(" "))


def test_stream_without_usage_has_no_usage_chunk(app: App) -> None:
    events = sse_events(chat(app, stream=True).text)
    assert all("usage" not in e for e in events[:-1])


def test_text_completion(app: App) -> None:
    body = app.client.post("/v1/completions", json={"prompt": "say:Paris is nice"}).json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "Paris is nice"
    ids = app.client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 5})
    assert ids.status_code == 200
    assert app.engine.requests[-1].prompt == [1, 2, 3]
    batch_of_one = app.client.post("/v1/completions", json={"prompt": ["say:x"]})
    assert batch_of_one.json()["choices"][0]["text"] == "x"


def test_text_completion_stream(app: App) -> None:
    raw = app.client.post(
        "/v1/completions",
        json={
            "prompt": "say:one two three",
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ).text
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])
    assert text == "one two three"
    assert events[-2]["usage"]["completion_tokens"] == 3


def test_parameters_reach_the_engine(app: App) -> None:
    chat(
        app,
        max_completion_tokens=7,
        max_tokens=99,
        stop=["x"],
        n=2,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        ignore_eos=True,
    )
    sampling = app.engine.requests[-1].sampling
    assert sampling.max_tokens == 7  # max_completion_tokens wins
    assert sampling.stop == ("x",)
    assert (sampling.n, sampling.presence_penalty, sampling.frequency_penalty) == (2, 0.5, -0.5)
    assert sampling.ignore_eos is True
    chat(app, max_tokens=10_000)
    assert app.engine.requests[-1].sampling.max_tokens == app.settings.MAX_TOKENS_CAP


def test_n_choices_and_stop(app: App) -> None:
    """n choices come back in order; stop strings reach the engine (which applies them:
    vLLM's truncation is tested on the stack by openai_sdk_script.py's stop check)."""
    body = chat(app, content="say:alpha beta", n=2, stop=["gamma", "delta"]).json()
    assert app.engine.requests[-1].sampling.stop == ("gamma", "delta")
    assert app.engine.requests[-1].sampling.n == 2
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in body["choices"]] == [
        "alpha beta [0]",
        "alpha beta [1]",
    ]
    assert body["usage"]["completion_tokens"] == 6


def test_json_schema_response_format(app: App) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string"}},
        "required": ["answer"],
    }
    body = chat(
        app, response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    ).json()
    assert json.loads(body["choices"][0]["message"]["content"]) == {"answer": "hello"}
    assert app.engine.requests[-1].sampling.json_schema == schema
    chat(app, response_format={"type": "json_object"})
    assert app.engine.requests[-1].sampling.json_object is True


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": -3}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"stop": [""]}, "stop"),
        ({"logprobs": True}, "logprobs"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
                }
            },
            "response_format.json_schema.schema",
        ),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ],
)
def test_bad_parameters_are_400_in_openai_format(
    app: App, body: dict[str, Any], param: str
) -> None:
    payload = {"messages": [{"role": "user", "content": "hi"}], **body}
    response = app.client.post(CHAT, json=payload)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


def test_unknown_model_is_404(app: App) -> None:
    response = chat(app, model="gpt-4")
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "The model `gpt-4` does not exist."
    assert chat(app, model=app.settings.model_name).status_code == 200


def test_body_errors_in_openai_format(app: App) -> None:
    broken = app.client.post(CHAT, content=b"{", headers={"Content-Type": "application/json"})
    assert broken.status_code == 400
    assert "not valid JSON" in broken.json()["error"]["message"]
    huge = app.client.post(CHAT, json={"messages": [{"role": "user", "content": "x" * 5000}]})
    assert huge.status_code == 413
    assert "MAX_UPLOAD_BYTES" in huge.json()["error"]["message"]


def test_completion_refuses_what_it_cannot_do(app: App) -> None:
    for extra, param in [
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"echo": True}, "echo"),
        ({"logprobs": 2}, "logprobs"),
        ({"suffix": "x"}, "suffix"),
    ]:
        response = app.client.post("/v1/completions", json={"prompt": "x", **extra})
        assert response.status_code == 400, (extra, response.text)
        assert response.json()["error"]["param"] == param


def test_unknown_fields_are_ignored_like_vllm(app: App) -> None:
    response = chat(app, user="u1", repetition_penalty=1.0, metadata={"k": "v"})
    assert response.status_code == 200


def test_server_side_conversation(app: App) -> None:
    first = chat(app, content="first", store=True)
    cid = first.headers["X-Conversation-Id"]
    assert first.json()["conversation_id"] == cid
    second = chat(app, content="second", conversation_id=cid)
    assert second.headers["X-Conversation-Id"] == cid
    assert second.json()["choices"][0]["message"]["content"].startswith("2 earlier messages")
    streamed = chat(app, content="third", conversation_id=cid, stream=True)
    assert streamed.headers["X-Conversation-Id"] == cid
    stored = app.client.get(f"/conversations/{cid}").json()
    assert [m["content"] for m in stored["messages"]][::2] == ["first", "second", "third"]
    # the seed API continues the same conversation
    seed = app.client.post("/generate", json={"message": "fourth", "conversation_id": cid})
    assert seed.json()["response"].startswith("6 earlier messages")


def test_conversation_rules(app: App) -> None:
    assert chat(app, conversation_id="nope").status_code == 404
    assert chat(app, conversation_id="nope").json()["error"]["param"] == "conversation_id"
    cid = chat(app, store=True).headers["X-Conversation-Id"]
    assert chat(app, conversation_id=cid, n=2).json()["error"]["param"] == "n"
    assert chat(app, conversation_id=cid, store=True).json()["error"]["param"] == "store"


def test_engine_outage_is_503_in_openai_format(app: App) -> None:
    app.engine.down = True
    for stream in (False, True):
        response = chat(app, stream=stream)
        assert response.status_code == 503
        assert response.headers["Retry-After"]
        assert response.json()["error"]["type"] == "service_unavailable_error"


def test_prompt_too_long_is_400_also_when_streaming(app: App) -> None:
    for stream in (False, True):
        response = chat(app, content="w " * 500, stream=stream)
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "messages"
    raw = app.client.post("/v1/completions", json={"prompt": "w " * 500, "stream": True})
    assert raw.status_code == 400
    assert raw.json()["error"]["param"] == "prompt"


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
