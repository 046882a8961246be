"""The seed API over the fake engine and a real Redis: contract, validation, errors."""

from __future__ import annotations

import warnings

import pytest

from tests.http.conftest import App
from tests.support import MediaServer


def generate(app: App, **body: object) -> dict:
    response = app.client.post("/generate", json={"message": "hello there", **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_response_has_every_seed_field(app: App) -> None:
    body = generate(app, max_tokens=8, temperature=0.2)
    assert set(body) >= {
        "response",
        "conversation_id",
        "generation_time",
        "model_info",
        "response_json",
        "response_is_json",
    }
    info = body["model_info"]
    assert info["engine"] == "vLLM"
    assert info["max_tokens"] == 8
    assert info["temperature"] == 0.2
    assert set(info["timings"]) >= {
        "generation_ms",
        "total_ms",
        "tokens_generated",
        "tokens_per_second",
        "endpoint_total_ms",
        "json_parse_ms",
    }
    timings = info["timings"]
    assert timings["endpoint_total_ms"] >= timings["total_ms"] > 0
    assert body["response"].startswith("0 earlier messages")


def test_conversation_history_reaches_the_engine(app: App) -> None:
    first = generate(app)
    second = generate(app, conversation_id=first["conversation_id"], message="again")
    assert second["conversation_id"] == first["conversation_id"]
    assert second["response"].startswith("2 earlier messages")
    roles = [m["role"] for m in app.engine.requests[-1].messages]
    assert roles == ["user", "assistant", "user"]
    stored = app.client.get(f"/conversations/{first['conversation_id']}").json()
    assert [m["content"] for m in stored["messages"]] == [
        "hello there",
        first["response"],
        "again",
        second["response"],
    ]


def test_max_tokens_is_clamped_to_the_cap(app: App) -> None:
    body = generate(app, max_tokens=10_000, message="w " * 100)
    assert body["model_info"]["max_tokens"] == app.settings.MAX_TOKENS_CAP
    assert app.engine.requests[-1].sampling.max_tokens == app.settings.MAX_TOKENS_CAP


def test_an_integral_float_is_an_integer(app: App) -> None:
    # JSON Schema (so /openapi.json, and schemathesis) counts 3.0 as an integer.
    assert generate(app, max_tokens=3.0)["model_info"]["max_tokens"] == 3


def test_json_answers_fill_response_json(app: App) -> None:
    body = generate(app, message='say:Sure:\n```json\n{"k": [1, 2]}\n```')
    assert body["response_is_json"] is True
    assert body["response_json"] == {"k": [1, 2]}
    assert body["model_info"]["timings"]["json_parse_ms"] >= 0
    plain = generate(app, message="say:no json here")
    assert plain["response_is_json"] is False
    assert plain["response_json"] is None


@pytest.mark.parametrize(
    ("payload", "status", "named"),
    [
        (b"", 400, "body"),
        (b"not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b"{}", 422, "message"),
        (b'{"message": ""}', 422, "message"),
        (b'{"message": "   "}', 422, "message"),
        (b'{"message": 5}', 422, "message"),
        (b'{"message": "hi", "max_tokens": 0}', 422, "max_tokens"),
        (b'{"message": "hi", "max_tokens": -3}', 422, "max_tokens"),
        (b'{"message": "hi", "max_tokens": "abc"}', 422, "max_tokens"),
        (b'{"message": "hi", "max_tokens": "12"}', 422, "max_tokens"),
        (b'{"message": "hi", "max_tokens": 1.5}', 422, "max_tokens"),
        (b'{"message": "hi", "max_tokens": true}', 422, "max_tokens"),
        (b'{"message": "hi", "temperature": 2.5}', 422, "temperature"),
        (b'{"message": "hi", "temperature": -0.1}', 422, "temperature"),
        (b'{"message": "hi", "temperature": "hot"}', 422, "temperature"),
        (b'{"message": "hi", "conversation_id": ""}', 422, "conversation_id"),
        (b'{"message": "hi", "max_token": 5}', 422, "max_token"),
        # Found by tests/http/test_fuzz_openapi.py: each of these was a 500 (or unbounded).
        (b'{"message": "hi", "max_tokens": 2147483648}', 422, "max_tokens"),
        (b'{"message": "hi", "max_tokens": 100000000000000000000000000000}', 422, "max_tokens"),
        (b'{"message": "hi", "temperature": NaN}', 422, "temperature"),
        (b'{"message": "\\ud800"}', 422, "message"),
        (b'{"message": "hi", "conversation_id": "\\udfff"}', 422, "conversation_id"),
        (b'{"message": "hi", "json_schema": {"$schema": []}}', 400, "json_schema"),
        (
            b'{"message": "hi", "json_schema": ' + b'{"a":' * 101 + b"1" + b"}" * 102,
            422,
            "json_schema",
        ),
        (b'{"message": "hi", "json_schema": {"const": 100000000000000000000}}', 422, "json_schema"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_problem(
    app: App, payload: bytes, status: int, named: str
) -> None:
    response = app.client.post(
        "/generate", content=payload, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == status, response.text
    assert named in response.json()["detail"]


def test_json_schema_references_are_never_fetched(app: App) -> None:
    server = MediaServer(b"{}")
    try:
        for reference in ("#/$defs/missing", server.url("/schema.json")):
            body = generate(app, message="hi", json_schema={"$ref": reference})
            assert body["response_is_json"] is False  # unresolvable: not taken as valid
            assert body["response_json"] is None
        assert server.requests == []
    finally:
        server.close()


def test_an_unknown_json_schema_dialect_is_read_as_the_latest(app: App) -> None:
    # jsonschema only warns about an unknown $schema today, and will raise in the future.
    schema = {"$schema": "https://example.invalid/dialect", "type": "object"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        body = generate(app, message="hi", json_schema=schema)
    assert body["response_json"] == {"answer": "hi"}


def test_wrong_content_type_is_named(app: App) -> None:
    response = app.client.post(
        "/generate", content=b'{"message": "hi"}', headers={"Content-Type": "text/plain"}
    )
    assert response.status_code == 400
    assert "application/json" in response.json()["detail"]


def test_unknown_conversation_is_404(app: App) -> None:
    response = app.client.post("/generate", json={"message": "hi", "conversation_id": "nope"})
    assert response.status_code == 404
    assert "nope" in response.json()["detail"]
    assert app.client.get("/conversations/nope").status_code == 404
    assert app.client.delete("/conversations/nope").status_code == 404


def test_prompt_too_long_is_400(app: App) -> None:
    response = app.client.post("/generate", json={"message": "w " * 500})
    assert response.status_code == 400
    assert response.json()["param"] == "message"


def test_body_over_the_upload_limit_is_413(app: App) -> None:
    response = app.client.post("/generate", json={"message": "x" * 5000})
    assert response.status_code == 413
    assert "MAX_UPLOAD_BYTES" in response.json()["detail"]


def test_vision_and_multimodal_are_501(app: App) -> None:
    for path in ("/vision", "/multimodal"):
        response = app.client.post(path, json={"prompt": "what is this?"})
        assert response.status_code == 501
        body = response.json()
        assert "SmolLM2-135M-Instruct" in body["detail"], body
        assert "takes text only" in body["detail"], body


def test_engine_outage_is_503_with_retry_after(app: App) -> None:
    app.engine.down = True
    response = app.client.post("/generate", json={"message": "hi"})
    assert response.status_code == 503
    assert response.headers["Retry-After"]
    assert "engine" in response.json()["detail"]
    health = app.client.get("/health")
    assert health.status_code == 503
    assert "engine" in health.json()["status"]
    app.engine.down = False
    assert app.client.post("/generate", json={"message": "hi"}).status_code == 200
    # the failed request did not leave an empty conversation behind
    listed = app.client.get("/conversations").json()
    assert all(c["message_count"] > 0 for c in listed["conversations"])


def test_conversation_list_and_delete(app: App) -> None:
    ids = [generate(app)["conversation_id"] for _ in range(3)]
    listed = app.client.get("/conversations").json()
    assert listed["total"] == 3
    assert [c["conversation_id"] for c in listed["conversations"]] == ids[::-1]
    page = app.client.get("/conversations", params={"offset": 1, "limit": 1}).json()
    assert [c["conversation_id"] for c in page["conversations"]] == [ids[1]]
    assert app.client.get("/conversations", params={"limit": 0}).status_code == 422
    assert app.client.delete(f"/conversations/{ids[0]}").json()["deleted"] is True
    assert app.client.get(f"/conversations/{ids[0]}").status_code == 404
    assert app.client.get("/health").json()["active_conversations"] == 2


def test_detailed_status_reports_engine_and_store(app: App) -> None:
    generate(app)
    status = app.client.get("/status/detailed").json()
    (replica,) = status["engine"]["replicas"]
    assert replica["state"] == "RUNNING"
    assert replica["stats"]["max_num_seqs"] == 16
    assert status["engine"]["deployment"]["status"] == "HEALTHY"
    assert status["scaling"]["target_ongoing_requests"] == app.settings.VLLM_MAX_NUM_SEQS
    assert status["redis"]["ok"] is True
    assert status["ingress"]["requests_total"] >= 1
    assert status["config"]["max_tokens_cap"] == app.settings.MAX_TOKENS_CAP


def test_openapi_and_docs(app: App) -> None:
    schema = app.client.get("/openapi.json").json()
    assert {
        "/health",
        "/generate",
        "/vision",
        "/multimodal",
        "/conversations",
        "/conversations/{conversation_id}",
        "/status/detailed",
    } <= set(schema["paths"])
    assert app.client.get("/docs").status_code == 200


def test_each_turn_costs_two_redis_round_trips(app: App) -> None:
    def round_trips() -> int:
        return int(app.client.get("/status/detailed").json()["redis"]["round_trips"])

    before = round_trips()
    first = generate(app)  # create + append
    after_first = round_trips()
    second = generate(app, conversation_id=first["conversation_id"])  # load + append
    after_second = round_trips()
    # each /status/detailed read costs 2 round trips itself (PING, ZCARD)
    assert after_first - before - 2 == 2
    assert after_second - after_first - 2 == 2
    for body in (first, second):
        assert body["model_info"]["timings"]["store_ms"] > 0
