"""``/generate`` with ``stream`` and ``json_schema`` over the fake engine and a real Redis."""

from __future__ import annotations

import json

from tests.http.conftest import App
from tests.http.test_openai_api import sse_events


def test_stream_sends_deltas_then_the_whole_response(app: App) -> None:
    response = app.client.post("/generate", json={"message": "say:one two three", "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    deltas = [e["delta"] for e in events if e["type"] == "delta"]
    assert deltas == ["one", " two", " three"]
    (final,) = [e for e in events if e["type"] == "final"]
    assert events[-1] is final
    result = final["response"]
    assert result["response"] == "one two three"
    assert result["model_info"]["timings"]["tokens_generated"] == 3
    assert result["model_info"]["timings"]["ttft_ms"] is not None
    stored = app.client.get(f"/conversations/{result['conversation_id']}").json()
    assert [m["content"] for m in stored["messages"]] == ["say:one two three", "one two three"]


def test_stream_errors_before_the_first_token_keep_their_status(app: App) -> None:
    unknown = app.client.post(
        "/generate", json={"message": "x", "stream": True, "conversation_id": "nope"}
    )
    assert unknown.status_code == 404
    too_long = app.client.post("/generate", json={"message": "w " * 500, "stream": True})
    assert too_long.status_code == 400
    assert too_long.json()["param"] == "message"
    app.engine.down = True
    down = app.client.post("/generate", json={"message": "x", "stream": True})
    assert down.status_code == 503
    assert down.headers["Retry-After"]
    app.engine.down = False
    listed = app.client.get("/conversations").json()
    assert listed["total"] == 0  # none of the failed requests left a conversation behind


def test_json_schema_fills_response_json(app: App) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string"}},
        "required": ["answer"],
    }
    body = app.client.post("/generate", json={"message": "hi", "json_schema": schema}).json()
    assert body["response_is_json"] is True
    assert body["response_json"] == {"answer": "hi"}
    assert json.loads(body["response"]) == body["response_json"]
    assert app.engine.requests[-1].sampling.json_schema == schema


def test_json_schema_that_the_answer_breaks_is_not_json(app: App) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}}
    body = app.client.post("/generate", json={"message": "hi", "json_schema": schema}).json()
    assert body["response_is_json"] is False  # {"answer": "hi"} does not validate
    assert body["response_json"] is None


def test_invalid_json_schema_is_400(app: App) -> None:
    response = app.client.post(
        "/generate", json={"message": "hi", "json_schema": {"type": "nonsense"}}
    )
    assert response.status_code == 400
    assert response.json()["param"] == "json_schema"
    assert "JSON Schema" in response.json()["detail"]
    not_an_object = app.client.post("/generate", json={"message": "hi", "json_schema": "x"})
    assert not_an_object.status_code == 422
