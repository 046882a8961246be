"""API keys, tenant isolation, rate limits, retention and the audit log (HTTP layer).

The real app over a real Redis, and again over a Redis Cluster (``store_redis``); the
fake engine counts the requests that reach it. ``tests/tenants`` proves the same on the
real stack with two ingress replicas.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from cloudllm_serve.conversations.store import ConversationStore
from cloudllm_serve.ingress.access import PUBLIC_PATHS, PUBLIC_PREFIX
from cloudllm_serve.ingress.app import create_app
from cloudllm_serve.ingress.service import CloudLLMService
from cloudllm_serve.settings import Settings
from tests.fakes import FakeEngine
from tests.http.conftest import StoreRedis
from tests.support import RedisServer, wait_for
from tests.tenants_support import TenantKeys, redis_dump, write_key_file


@dataclass
class TenantApp:
    client: TestClient
    engine: FakeEngine
    service: CloudLLMService
    keys: TenantKeys
    prefix: str
    audit_path: Path
    redis: StoreRedis

    def audit_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]


def make_app(redis_server: StoreRedis, tmp_path: Path, **settings: Any) -> Iterator[TenantApp]:
    keys = write_key_file(tmp_path / "keys.yaml")
    audit_path = tmp_path / "audit.jsonl"
    config = Settings(
        **redis_server.settings,
        MAX_TOKENS_CAP=32,
        REDIS_TIMEOUT_S=1.0,
        API_KEYS_FILE=str(tmp_path / "keys.yaml"),
        AUDIT_LOG=str(audit_path),
        **settings,
    )
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    store = ConversationStore.from_settings(config, key_prefix=prefix)
    engine = FakeEngine()
    service = CloudLLMService(config, store, engine)
    with TestClient(create_app(service)) as client:
        yield TenantApp(client, engine, service, keys, prefix, audit_path, redis_server)


@pytest.fixture
def app(store_redis: StoreRedis, tmp_path: Path) -> Iterator[TenantApp]:
    yield from make_app(store_redis, tmp_path)


UNKNOWN = "0" * 32

#: One request per protected route: (method, path, JSON body).
ROUTE_CALLS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/generate", {"message": "hi"}),
    ("POST", "/vision", None),
    ("POST", "/multimodal", None),
    ("GET", "/conversations", None),
    ("GET", f"/conversations/{UNKNOWN}", None),
    ("DELETE", f"/conversations/{UNKNOWN}", None),
    ("GET", "/status/detailed", None),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/x", None),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/v1/completions", {"prompt": "hi"}),
    ("POST", "/v1/responses", {"input": "hi"}),
    ("GET", f"/v1/responses/resp_{UNKNOWN}", None),
    ("DELETE", f"/v1/responses/resp_{UNKNOWN}", None),
    ("GET", f"/v1/responses/resp_{UNKNOWN}/input_items", None),
    ("POST", f"/v1/responses/resp_{UNKNOWN}/cancel", None),
    ("POST", "/v1/conversations", {}),
    ("GET", f"/v1/conversations/{UNKNOWN}", None),
    ("POST", f"/v1/conversations/{UNKNOWN}", {"metadata": {}}),
    ("DELETE", f"/v1/conversations/{UNKNOWN}", None),
    ("GET", f"/v1/conversations/{UNKNOWN}/items", None),
    ("POST", f"/v1/conversations/{UNKNOWN}/items", {"items": [{"role": "user", "content": "x"}]}),
    ("GET", f"/v1/conversations/{UNKNOWN}/items/msg_1", None),
    ("DELETE", f"/v1/conversations/{UNKNOWN}/items/msg_1", None),
]
BAD_HEADERS: dict[str, dict[str, str]] = {
    "no header": {},
    "malformed": {"Authorization": "Basic dXNlcjpwYXNz"},
    "bearer without key": {"Authorization": "Bearer "},
    "wrong key": {"Authorization": "Bearer sk-cllm-not-a-key"},
}


def test_every_route_is_covered_by_the_matrix(app: TenantApp) -> None:
    """Deny by default: each route is either public or in ROUTE_CALLS (so tested below)."""
    templated = {path.replace(UNKNOWN, "{conversation_id}") for _, path, _ in ROUTE_CALLS}
    templated |= {"/v1/models/{model_id:path}"}
    templated |= {p.replace("resp_{conversation_id}", "{response_id}") for p in templated}
    templated |= {p.replace("/msg_1", "/{item_id}") for p in templated}
    for route in app.client.app.routes:  # type: ignore[attr-defined]
        if route.path in PUBLIC_PATHS or f"{route.path}/" == PUBLIC_PREFIX:
            continue
        assert isinstance(route, APIRoute), route.path
        assert route.path in templated, f"{route.path} is protected but not in the matrix"


@pytest.mark.parametrize("case", list(BAD_HEADERS))
@pytest.mark.parametrize(("method", "path", "body"), ROUTE_CALLS)
def test_protected_route_refuses_without_a_valid_key(
    app: TenantApp, method: str, path: str, body: dict[str, Any] | None, case: str
) -> None:
    response = app.client.request(method, path, json=body, headers=BAD_HEADERS[case])
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"] == "Bearer"
    payload = response.json()
    if path.startswith("/v1/"):
        assert payload["error"]["code"] == "invalid_api_key"
        assert payload["error"]["type"] == "invalid_request_error"
        message = payload["error"]["message"]
    else:
        assert payload["error_type"] == "authentication"
        assert payload["param"] == "Authorization"
        message = payload["detail"]
    expected = {
        "no header": "didn't provide an API key",
        "malformed": "Malformed Authorization header",
        "bearer without key": "Malformed Authorization header",
        "wrong key": "Incorrect API key",
    }[case]
    assert expected in message
    assert app.engine.requests == []


@pytest.mark.parametrize(("method", "path", "body"), ROUTE_CALLS)
def test_protected_route_answers_a_valid_key(
    app: TenantApp, method: str, path: str, body: dict[str, Any] | None
) -> None:
    response = app.client.request(method, path, json=body, headers=app.keys.auth("ops"))
    expected = {"/vision": 501, "/multimodal": 501, "/v1/models/x": 404}.get(path, 200)
    if UNKNOWN in path:
        expected = 404
    assert response.status_code == expected, response.text
    assert response.headers["x-request-id"]


def test_unknown_paths_and_methods_need_a_key_too(app: TenantApp) -> None:
    assert app.client.get("/no-such-route").status_code == 401
    assert app.client.get("/no-such-route", headers=app.keys.auth("tenant-a")).status_code == 404
    assert app.client.get("/generate").status_code == 401
    assert app.client.options("/generate").status_code != 401


def test_public_routes_need_no_key_and_health_hides_cross_tenant_counts(app: TenantApp) -> None:
    for path in ("/docs", "/openapi.json", "/redoc", "/docs/static/swagger-ui.css"):
        assert app.client.get(path).status_code == 200, path
    assert app.client.get("/docs/static/../keys.yaml").status_code in (401, 404)
    health = app.client.get("/health")
    assert health.status_code == 200, health.text
    assert health.json()["active_conversations"] is None
    assert health.json()["redis_ok"] is True


def test_detailed_status_needs_an_admin_key(app: TenantApp) -> None:
    refused = app.client.get("/status/detailed", headers=app.keys.auth("tenant-a"))
    assert refused.status_code == 403
    assert refused.json()["error_type"] == "permission_denied"
    allowed = app.client.get("/status/detailed", headers=app.keys.auth("ops"))
    assert allowed.status_code == 200
    assert allowed.json()["security"]["auth"] is True


def test_bearer_scheme_is_case_insensitive(app: TenantApp) -> None:
    key = app.keys.key("tenant-a")
    for header in (f"bearer {key}", f"BEARER {key}", f"Bearer  {key} "):
        response = app.client.get("/conversations", headers={"Authorization": header})
        assert response.status_code == 200, header


def _without_id(body: dict[str, Any], conversation_id: str) -> str:
    return json.dumps(body).replace(conversation_id, "<id>")


def test_a_foreign_conversation_is_exactly_an_unknown_one(app: TenantApp) -> None:
    a, a2, b = app.keys.auth("tenant-a"), app.keys.auth("tenant-a", 1), app.keys.auth("tenant-b")
    created = app.client.post("/generate", json={"message": "secret of A"}, headers=a).json()
    cid = created["conversation_id"]
    before = app.client.get(f"/conversations/{cid}", headers=a).json()
    engine_calls = len(app.engine.requests)
    unknown = uuid.uuid4().hex

    calls = [
        ("GET", "/conversations/{}", None),
        ("DELETE", "/conversations/{}", None),
        ("POST", "/generate", {"message": "let me in", "conversation_id": "{}"}),
        (
            "POST",
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "conversation_id": "{}"},
        ),
    ]
    for method, path, body in calls:
        results = []
        for target in (cid, unknown):
            filled = json.loads(json.dumps(body).replace("{}", target)) if body else None
            response = app.client.request(method, path.format(target), json=filled, headers=b)
            results.append((response.status_code, _without_id(response.json(), target)))
        assert results[0] == results[1], (method, path, results)
        assert results[0][0] == 404
    assert len(app.engine.requests) == engine_calls
    assert app.client.get(f"/conversations/{cid}", headers=a).json() == before
    assert app.client.get(f"/conversations/{cid}", headers=a2).json() == before

    b_conv = app.client.post("/generate", json={"message": "B's"}, headers=b).json()
    a_list = app.client.get("/conversations", headers=a2).json()
    b_list = app.client.get("/conversations", headers=b).json()
    assert [c["conversation_id"] for c in a_list["conversations"]] == [cid]
    assert [c["conversation_id"] for c in b_list["conversations"]] == [b_conv["conversation_id"]]
    assert a_list["total"] == 1 and b_list["total"] == 1


def test_conversations_live_under_their_tenants_prefix(app: TenantApp) -> None:
    created = app.client.post(
        "/generate", json={"message": "hello"}, headers=app.keys.auth("tenant-b")
    ).json()
    client = app.redis.client()
    cid = created["conversation_id"]
    keys = sorted(client.scan_iter(f"{app.prefix}*conv:{{{cid}}}*"))
    assert keys == [
        f"{app.prefix}t:tenant-b:conv:{{{cid}}}",
        f"{app.prefix}t:tenant-b:conv:{{{cid}}}:messages",
    ]
    index = f"{app.prefix}t:tenant-b:{{{app.prefix}t:tenant-b}}:conversations"
    assert client.zscore(index, cid) is not None


def _ratelimit_headers(response: Any, kind: str) -> tuple[str, str, str]:
    h = response.headers
    return (
        h[f"x-ratelimit-limit-{kind}"],
        h[f"x-ratelimit-remaining-{kind}"],
        h[f"x-ratelimit-reset-{kind}"],
    )


def test_requests_per_minute_exactly_then_429_with_openai_headers(app: TenantApp) -> None:
    limited = app.keys.auth("rpm-3")
    body = {"messages": [{"role": "user", "content": "hi"}]}
    remaining = []
    for _ in range(3):
        response = app.client.post("/v1/chat/completions", json=body, headers=limited)
        assert response.status_code == 200, response.text
        limit, left, reset = _ratelimit_headers(response, "requests")
        assert limit == "3"
        assert reset.endswith("s")
        remaining.append(int(left))
    assert remaining == [2, 1, 0]
    refused = app.client.post("/v1/chat/completions", json=body, headers=limited)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert error["type"] == "rate_limit_error"
    assert "requests per minute (3)" in error["message"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert 1 <= int(refused.headers["retry-after-ms"]) <= 60_000
    assert _ratelimit_headers(refused, "requests")[:2] == ("3", "0")
    # A stream is refused with the status, before any byte of it.
    streamed = app.client.post(
        "/v1/chat/completions", json={**body, "stream": True}, headers=limited
    )
    assert streamed.status_code == 429
    assert streamed.headers["content-type"].startswith("application/json")
    # The seed API too, in its own body; other tenants are not affected.
    seed = app.client.post("/generate", json={"message": "x"}, headers=limited)
    assert seed.status_code == 429 and seed.json()["error_type"] == "rate_limit"
    other = app.client.post("/v1/chat/completions", json=body, headers=app.keys.auth("tenant-b"))
    assert other.status_code == 200
    assert "x-ratelimit-limit-requests" not in other.headers  # tenant-b has no limits


def test_window_resets(app: TenantApp) -> None:
    app.service.limiter.window_s = 2.0
    limited = app.keys.auth("rpm-3")
    statuses = [app.client.get("/v1/models", headers=limited).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    retry_ms = int(app.client.get("/v1/models", headers=limited).headers["retry-after-ms"])
    assert retry_ms <= 2000
    time.sleep(retry_ms / 1000 + 0.05)
    assert app.client.get("/v1/models", headers=limited).status_code == 200


def test_tokens_per_minute_charge_estimate_then_settle(app: TenantApp) -> None:
    limited = app.keys.auth("tpm-100")
    # Never fits: max_tokens alone is over the limit once n=4 (4 x 32 > 100).
    never = app.client.post(
        "/v1/completions", json={"prompt": "hi", "n": 4, "max_tokens": 32}, headers=limited
    )
    assert never.status_code == 429
    assert never.headers["x-should-retry"] == "false"
    assert "Retry-After" not in never.headers
    # Each request is charged ~1 + 32 tokens at admission, then its real count (the fake
    # engine's prompt words + completion words: a handful), so many more than 3 pass.
    passed = 0
    for _ in range(8):
        response = app.client.post(
            "/v1/completions", json={"prompt": "say:a b", "max_tokens": 32}, headers=limited
        )
        if response.status_code != 200:
            break
        passed += 1
        time.sleep(0.05)  # settling runs right after the answer, in the background
    assert passed == 8
    used = int(response.headers["x-ratelimit-limit-tokens"]) - int(
        response.headers["x-ratelimit-remaining-tokens"]
    )
    assert used < 100


def test_concurrent_requests_limit(app: TenantApp) -> None:
    import threading

    app.engine.delay_s = 0.2
    limited = app.keys.auth("conc-1")
    results: list[int] = []

    def slow() -> None:
        results.append(
            app.client.post(
                "/v1/completions", json={"prompt": "one two three four"}, headers=limited
            ).status_code
        )

    thread = threading.Thread(target=slow)
    thread.start()
    wait_for(lambda: app.engine.running == 1, 5, 0.01)
    refused = app.client.post("/v1/completions", json={"prompt": "x"}, headers=limited)
    thread.join()
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "1"
    assert "concurrent requests (1)" in refused.json()["error"]["message"]
    assert results == [200]
    wait_for(
        lambda: (
            app.client.post("/v1/completions", json={"prompt": "x"}, headers=limited).status_code
            == 200
        ),
        5,
    )


def test_no_plaintext_key_in_redis_or_the_audit_log(app: TenantApp) -> None:
    for tenant in ("tenant-a", "rpm-3", "tpm-100", "conc-1"):
        auth = app.keys.auth(tenant)
        app.client.post("/generate", json={"message": f"hello from {tenant}"}, headers=auth)
        app.client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "store": True},
            headers=auth,
        )
    app.client.get("/conversations", headers={"Authorization": "Bearer sk-cllm-guess"})
    dump = redis_dump(app.redis.client(), f"{app.prefix}*")
    text = "\n".join(dump) + app.audit_path.read_text()
    assert dump
    for key in [*app.keys.all_keys(), "sk-cllm-guess"]:
        assert key not in text


def test_audit_log_has_one_line_per_request_without_content(app: TenantApp) -> None:
    auth = app.keys.auth("tenant-a")
    created = app.client.post(
        "/generate", json={"message": "private words"}, headers={**auth, "X-Request-Id": "req-1"}
    )
    assert created.headers["x-request-id"] == "req-1"
    cid = created.json()["conversation_id"]
    app.client.get(f"/conversations/{cid}", headers=auth)
    app.client.get("/conversations")
    app.client.get("/status/detailed", headers=auth)
    app.client.get("/health")
    lines = app.audit_lines()
    assert [(x["route"], x["status"], x["decision"]) for x in lines] == [
        ("/generate", 200, "allowed"),
        ("/conversations/{conversation_id}", 200, "allowed"),
        ("(no route)", 401, "unauthenticated"),
        ("/status/detailed", 403, "forbidden"),
        ("/health", 200, "public"),
    ]
    first = lines[0]
    assert first["request_id"] == "req-1"
    assert first["tenant"] == "tenant-a" and first["key_id"] == "tenant-a-k0"
    assert first["conversation_id"] == cid
    assert first["prompt_tokens"] > 0 and first["completion_tokens"] > 0
    assert first["client"] and first["method"] == "POST" and first["latency_ms"] > 0
    assert lines[1]["conversation_id"] == cid
    assert "private words" not in app.audit_path.read_text()


def test_key_file_changes_apply_without_restart(app: TenantApp, tmp_path: Path) -> None:
    old = app.keys.key("tenant-a")
    new_keys = write_key_file(tmp_path / "keys.yaml", [{"id": "tenant-a", "keys": 1}])
    registry = app.service.registry
    registry.refresh(now=time.monotonic() + 60)
    new = {"Authorization": f"Bearer {new_keys.key('tenant-a')}"}
    assert app.client.get("/conversations", headers=new).status_code == 200
    assert (
        app.client.get("/conversations", headers={"Authorization": f"Bearer {old}"}).status_code
        == 401
    )
    # A broken file keeps the tenants in force.
    (tmp_path / "keys.yaml").write_text("tenants: [oops")
    registry.refresh(now=time.monotonic() + 120)
    assert app.client.get("/conversations", headers=new).status_code == 200
    assert registry.reload_error is not None and "not valid YAML" in registry.reload_error


#: The retention of ``ttl_app``: long enough for one request and a Redis read on a loaded
#: machine (the key's TTL is read in milliseconds; Redis rounds TTL to whole seconds).
RETENTION_S = 2


@pytest.fixture
def ttl_app(store_redis: StoreRedis, tmp_path: Path) -> Iterator[TenantApp]:
    yield from make_app(store_redis, tmp_path, CONVERSATION_TTL_S=RETENTION_S)


def test_retention_deletes_untouched_conversations(ttl_app: TenantApp) -> None:
    auth = ttl_app.keys.auth("tenant-a")
    cid = ttl_app.client.post("/generate", json={"message": "x"}, headers=auth).json()[
        "conversation_id"
    ]
    client = ttl_app.redis.client()
    assert (
        0 < client.pttl(f"{ttl_app.prefix}t:tenant-a:conv:{{{cid}}}:messages") <= RETENTION_S * 1000
    )
    assert ttl_app.client.get("/conversations", headers=auth).json()["total"] == 1
    wait_for(
        lambda: ttl_app.client.get(f"/conversations/{cid}", headers=auth).status_code == 404,
        timeout_s=RETENTION_S + 3,
        interval_s=0.2,
    )
    listed = ttl_app.client.get("/conversations", headers=auth).json()
    assert listed["total"] == 0 and listed["conversations"] == []
    assert list(client.scan_iter(f"{ttl_app.prefix}t:tenant-a:*")) == []


@pytest.fixture
def own_redis_app(own_redis: RedisServer, tmp_path: Path) -> Iterator[TenantApp]:
    """The tenants' app over a Redis of its own, which the test may freeze."""
    yield from make_app(own_redis, tmp_path)


def test_redis_down_limits_stateless_requests_in_memory(own_redis_app: TenantApp) -> None:
    app = own_redis_app
    limited = app.keys.auth("rpm-3")
    body = {"prompt": "x"}
    # Mid-window, so that the frozen calls (a timeout each) cannot cross into the next one.
    mid_window = (time.time() // 60) * 60 + 30
    app.service.limiter.clock = lambda: mid_window
    app.redis.freeze()
    try:
        statuses = [
            app.client.post("/v1/completions", json=body, headers=limited).status_code
            for _ in range(4)
        ]
        stored = app.client.post("/generate", json={"message": "x"}, headers=limited)
    finally:
        app.redis.thaw()
    assert statuses == [200, 200, 200, 429]
    assert stored.status_code == 503
    assert app.service.limiter.fallback_decisions >= 4
