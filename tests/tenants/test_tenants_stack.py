"""API keys and tenants on the real stack: two ingress replicas, vLLM, Redis.

One stack started like ``make serve`` with a key file (tenants of
``tests/tenants_support.py``), two ingress replicas behind the Serve proxy sharing the
rate limits through Redis, and the audit log in a file. Each test prints what it saw.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from tests.conftest import Stack, running_stack
from tests.support import RedisServer, wait_for
from tests.tenants_support import TenantKeys, redis_dump, write_key_file

INGRESS = 2
UNKNOWN = "f" * 32


class TenantStack:
    def __init__(self, stack: Stack, keys: TenantKeys, key_file: Path, audit: Path) -> None:
        self.stack = stack
        self.keys = keys
        self.key_file = key_file
        self.audit = audit

    @property
    def url(self) -> str:
        return self.stack.base_url

    def call(self, method: str, path: str, tenant: str | None = None, **kwargs: Any) -> Any:
        headers = {**(self.keys.auth(tenant) if tenant else {}), **kwargs.pop("headers", {})}
        return requests.request(method, f"{self.url}{path}", headers=headers, timeout=180, **kwargs)

    def engine_requests(self) -> int:
        """Requests the engine replicas have finished (admin view)."""
        status = self.call("GET", "/status/detailed", "ops").json()
        return sum(
            (r["stats"] or {}).get("requests_finished", 0) for r in status["engine"]["replicas"]
        )

    def audit_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit.read_text().splitlines()]


@pytest.fixture(scope="module")
def tenant_stack(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TenantStack]:
    folder = tmp_path_factory.mktemp("tenants")
    key_file = folder / "keys.yaml"
    keys = write_key_file(key_file)
    audit = folder / "audit.jsonl"
    env = {
        "SERVE_DIRECT_INGRESS": "false",
        "INGRESS_REPLICAS": str(INGRESS),
        "API_KEYS_FILE": str(key_file),
        "AUDIT_LOG": str(audit),
    }
    with running_stack(redis_server, folder, env) as stack:
        yield TenantStack(stack, keys, key_file, audit)


ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/generate", {"message": "Say hi.", "max_tokens": 4}),
    ("GET", "/conversations", None),
    ("GET", f"/conversations/{UNKNOWN}", None),
    ("DELETE", f"/conversations/{UNKNOWN}", None),
    ("GET", "/status/detailed", None),
    ("GET", "/v1/models", None),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4},
    ),
    ("POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 4}),
]


def test_key_matrix_on_the_real_stack(tenant_stack: TenantStack) -> None:
    headers = {
        "no header": {},
        "malformed": {"Authorization": "Token abc"},
        "wrong key": {"Authorization": "Bearer sk-cllm-wrong"},
    }
    seen = {}
    for method, path, body in ROUTES:
        for case, header in headers.items():
            response = tenant_stack.call(method, path, json=body, headers=header)
            assert response.status_code == 401, (method, path, case, response.text)
            assert response.headers["WWW-Authenticate"] == "Bearer"
            if path.startswith("/v1/"):
                assert response.json()["error"]["code"] == "invalid_api_key"
            else:
                assert response.json()["error_type"] == "authentication"
        valid = tenant_stack.call(method, path, "ops", json=body)
        seen[f"{method} {path}"] = valid.status_code
        assert valid.status_code == (404 if UNKNOWN in path else 200), valid.text
    assert tenant_stack.call("GET", "/health").status_code == 200
    assert tenant_stack.call("GET", "/health").json()["active_conversations"] is None
    assert tenant_stack.call("GET", "/status/detailed", "tenant-a").status_code == 403
    print(f"\n[matrix] valid admin key: {seen}")


def _masked(response: Any, conversation_id: str) -> tuple[int, str]:
    return response.status_code, response.text.replace(conversation_id, "<id>")


def test_cross_tenant_access_is_an_unknown_id(tenant_stack: TenantStack) -> None:
    ts = tenant_stack
    created = ts.call(
        "POST", "/generate", "tenant-a", json={"message": "My PIN is 4711.", "max_tokens": 8}
    )
    assert created.status_code == 200, created.text
    cid = created.json()["conversation_id"]
    before = ts.call("GET", f"/conversations/{cid}", "tenant-a").json()
    engine_before = ts.engine_requests()
    unknown = uuid.uuid4().hex
    attempts = {
        "GET": lambda target: ts.call("GET", f"/conversations/{target}", "tenant-b"),
        "DELETE": lambda target: ts.call("DELETE", f"/conversations/{target}", "tenant-b"),
        "/generate": lambda target: ts.call(
            "POST",
            "/generate",
            "tenant-b",
            json={"message": "What is my PIN?", "conversation_id": target, "max_tokens": 8},
        ),
        "/v1": lambda target: ts.call(
            "POST",
            "/v1/chat/completions",
            "tenant-b",
            json={
                "messages": [{"role": "user", "content": "What is my PIN?"}],
                "conversation_id": target,
                "max_tokens": 8,
            },
        ),
    }
    for name, attempt in attempts.items():
        foreign, never = _masked(attempt(cid), cid), _masked(attempt(unknown), unknown)
        print(f"[cross-tenant] {name}: {foreign}")
        assert foreign == never
        assert foreign[0] == 404
    assert ts.engine_requests() == engine_before
    assert ts.call("GET", f"/conversations/{cid}", "tenant-a").json() == before
    second_key = ts.keys.auth("tenant-a", 1)
    assert ts.call("GET", f"/conversations/{cid}", headers=second_key).json() == before
    b_listed = ts.call("GET", "/conversations", "tenant-b").json()
    a_listed = ts.call("GET", "/conversations", "tenant-a").json()
    assert cid not in [c["conversation_id"] for c in b_listed["conversations"]]
    assert cid in [c["conversation_id"] for c in a_listed["conversations"]]


def _prefix_cache(ts: TenantStack) -> tuple[int, int]:
    """Prompt tokens the engine replicas' prefix caches were asked for, and found (admin view)."""
    status = ts.call("GET", "/status/detailed", "ops").json()
    stats = [r["stats"] or {} for r in status["engine"]["replicas"]]
    return (
        sum(s.get("prefix_cache_queries", 0) for s in stats),
        sum(s.get("prefix_cache_hits", 0) for s in stats),
    )


def test_another_tenants_prompt_is_not_a_prefix_cache_hit(tenant_stack: TenantStack) -> None:
    """The timing channel: B's copy of A's long prompt is computed anew, A's repeat is not."""
    ts = tenant_stack
    codes = " ".join(uuid.uuid4().hex[:8] for _ in range(120))
    message = f"Repeat the first code of this list: {codes}"

    def send(tenant: str) -> tuple[int, int, float]:
        """(cached prompt tokens, prompt tokens, TTFT in ms) of one /generate."""
        queried, hits = _prefix_cache(ts)
        response = ts.call(
            "POST",
            "/generate",
            tenant,
            json={"message": message, "max_tokens": 1, "temperature": 0},
        )
        assert response.status_code == 200, response.text
        timings = response.json()["model_info"]["timings"]
        prompt = timings["prompt_tokens"]
        # The counters follow the engine's steps: wait until this prompt is counted.
        wait_for(lambda: _prefix_cache(ts)[0] >= queried + prompt, 15, 0.1)
        return _prefix_cache(ts)[1] - hits, prompt, timings["ttft_ms"]

    first, other, again = send("tenant-a"), send("tenant-b"), send("tenant-a")
    print(
        "\n[cache salt] (cached tokens, prompt tokens, TTFT ms): "
        f"A {first}, then B {other}, then A again {again}"
    )
    assert first[1] > 256
    assert other[0] == 0
    assert again[0] >= again[1] - 64  # all but the last (partial) blocks of 32 tokens


def _seconds_left(response: Any) -> float:
    reset = response.headers["x-ratelimit-reset-requests"]
    if reset.endswith("ms"):
        return float(reset[:-2]) / 1000
    minutes, _, seconds = reset.rstrip("s").rpartition("m")
    return float(minutes or 0) * 60 + float(seconds)


def test_limits_are_shared_by_both_ingress_replicas(tenant_stack: TenantStack) -> None:
    ts = tenant_stack
    probe = ts.call("GET", "/v1/models", "rpm-3")
    fresh_window = probe.status_code == 429 or _seconds_left(probe) < 20
    if fresh_window:
        # Start with a fresh window, so the whole burst falls in one.
        time.sleep((int(probe.headers.get("retry-after-ms", 0)) / 1000) or _seconds_left(probe))
        time.sleep(0.5)
    started = time.time()
    statuses = [ts.call("GET", "/v1/models", "rpm-3").status_code for _ in range(12)]
    burst_lines = [
        line
        for line in ts.audit_lines()
        if line["tenant"] == "rpm-3" and line["time"] >= started - 0.01
    ]
    replicas = {line["replica"] for line in burst_lines}
    print(f"\n[limits] statuses {statuses}, ingress replicas {sorted(replicas)}")
    # Exactly the allowed number: 3 in a fresh window, else 2 (the probe took one).
    assert statuses.count(200) == (3 if fresh_window else 2)
    assert len(replicas) == INGRESS
    refused = ts.call(
        "POST",
        "/v1/chat/completions",
        "rpm-3",
        json={"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 4},
        stream=True,
    )
    assert refused.status_code == 429
    assert refused.headers["content-type"].startswith("application/json")
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    other = ts.call("POST", "/v1/completions", "tenant-b", json={"prompt": "Hi", "max_tokens": 4})
    assert other.status_code == 200

    model = ts.call("GET", "/v1/models", "ops").json()["data"][0]["id"]
    key = ts.keys.key("rpm-3")
    sdk = openai.OpenAI(base_url=f"{ts.url}/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        sdk.completions.create(model=model, prompt="Hi", max_tokens=4)
    # Default retries (2): the SDK waits retry-after-ms (at most the window's rest) and
    # gets through once the window has reset.
    retrying = openai.OpenAI(base_url=f"{ts.url}/v1", api_key=key)
    waited = time.monotonic()
    answer = retrying.completions.create(model=model, prompt="Hi", max_tokens=4)
    took = time.monotonic() - waited
    print(f"[limits] the SDK with its default retries got an answer after {took:.1f} s")
    assert answer.choices[0].text is not None


def test_key_file_change_applies_within_30_s(tenant_stack: TenantStack) -> None:
    ts = tenant_stack
    text = ts.key_file.read_text()
    added = write_key_file(ts.key_file.with_name("extra.yaml"), [{"id": "late", "keys": 1}])
    merged = (
        text.rstrip()
        + "\n"
        + "\n".join(
            line for line in ts.key_file.with_name("extra.yaml").read_text().splitlines()[1:]
        )
        + "\n"
    )
    ts.key_file.write_text(merged)
    changed = time.monotonic()
    auth = added.auth("late")
    wait_for(
        lambda: all(
            requests.get(f"{ts.url}/conversations", headers=auth, timeout=10).status_code == 200
            for _ in range(4)
        ),
        timeout_s=30,
        interval_s=0.5,
    )
    print(f"\n[reload] new key accepted by every replica after {time.monotonic() - changed:.1f} s")


def test_no_plaintext_key_in_redis_or_logs(tenant_stack: TenantStack) -> None:
    ts = tenant_stack
    keys = ts.keys.all_keys()
    values = redis_dump(ts.stack.redis.client())
    logs = [ts.stack.log_path, ts.audit]
    logs += [p for p in ts.stack.ray_logs().rglob("*") if p.is_file()]
    text = "\n".join(values)
    leaks = [key for key in keys if key in text]
    for path in logs:
        content = path.read_text(errors="replace")
        leaks += [f"{path}: {key[:12]}..." for key in keys if key in content]
    print(f"\n[secrets] scanned {len(values)} Redis keys/values and {len(logs)} log files")
    assert values and not leaks
