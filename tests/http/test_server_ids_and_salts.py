"""What the client cannot choose: the request's own id, and its prefix-cache salt.

The client's ``X-Request-Id`` is only the correlation id (answers, audit lines); the
concurrency slot and the engine's request id are made by the server for each request.
The engine's ``cache_salt`` is derived from the tenant, so one tenant cannot time
another's prompts through the shared prefix cache. The real app over a real Redis, the
fake engine recording what reached it; ``tests/tenants`` measures the salt on vLLM.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.http.conftest import App
from tests.http.test_tenants import TenantApp, make_app
from tests.support import RedisServer, wait_for
from tests.tenants_support import write_key_file

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def tenants(redis_server: RedisServer, tmp_path: Path) -> Iterator[TenantApp]:
    yield from make_app(redis_server, tmp_path)


def test_a_shared_request_id_does_not_share_a_concurrency_slot(
    tenants: TenantApp, tmp_path: Path
) -> None:
    """Slots were keyed by X-Request-Id: requests sharing one shared a slot, unlimited."""
    keys = write_key_file(
        tmp_path / "keys.yaml", [{"id": "conc-2", "keys": 1, "max_concurrent_requests": 2}]
    )
    tenants.service.registry.refresh(now=time.monotonic() + 60)
    tenants.engine.delay_s = 0.2
    headers = {**keys.auth("conc-2"), "X-Request-Id": "same-id"}
    results: list[int] = []

    def slow() -> None:
        response = tenants.client.post(
            "/v1/completions", json={"prompt": "one two three four"}, headers=headers
        )
        results.append(response.status_code)

    threads = [threading.Thread(target=slow) for _ in range(2)]
    for thread in threads:
        thread.start()
    wait_for(lambda: tenants.engine.running == 2, 5, 0.01)
    third = tenants.client.post("/v1/completions", json={"prompt": "x"}, headers=headers)
    for thread in threads:
        thread.join()
    assert third.status_code == 429, third.text
    assert "concurrent requests (2)" in third.json()["error"]["message"]
    assert third.headers["x-request-id"] == "same-id"
    assert results == [200, 200]


def test_the_engine_gets_a_server_made_request_id(tenants: TenantApp) -> None:
    auth = {**tenants.keys.auth("tenant-a"), "X-Request-Id": "client-id"}
    seed = tenants.client.post("/generate", json={"message": "hi"}, headers=auth)
    v1 = tenants.client.post("/v1/chat/completions", json=CHAT, headers=auth)
    assert seed.status_code == v1.status_code == 200
    assert seed.headers["x-request-id"] == v1.headers["x-request-id"] == "client-id"
    engine_ids = [tenants.engine.requests[-1].request_id, tenants.engine.calls[-1].request_id]
    assert all(len(rid) == 32 and "client-id" not in rid for rid in engine_ids)
    assert engine_ids[0] != engine_ids[1]
    assert "client-id" not in v1.json()["id"]
    assert [line["request_id"] for line in tenants.audit_lines()] == ["client-id"] * 2


def _seed_salt(app: App | TenantApp, headers: dict[str, str]) -> str | None:
    response = app.client.post("/generate", json={"message": "hi"}, headers=headers)
    assert response.status_code == 200, response.text
    return app.engine.requests[-1].cache_salt


def _v1_salt(app: TenantApp, headers: dict[str, str], **extra: object) -> object:
    response = app.client.post("/v1/chat/completions", json={**CHAT, **extra}, headers=headers)
    assert response.status_code == 200, response.text
    return app.engine.calls[-1].body.get("cache_salt")


def test_each_tenant_has_its_own_cache_salt(tenants: TenantApp) -> None:
    keys = tenants.keys
    a, a2, b = keys.auth("tenant-a"), keys.auth("tenant-a", 1), keys.auth("tenant-b")
    salt_a, salt_b = _seed_salt(tenants, a), _seed_salt(tenants, b)
    assert salt_a and salt_b and salt_a != salt_b
    assert _seed_salt(tenants, a2) == salt_a  # per tenant, not per key
    # /v1 and the seed API share one tenant's cache.
    assert _v1_salt(tenants, a) == salt_a and _v1_salt(tenants, b) == salt_b
    # A client's own salt only divides its tenant's cache further; it never selects
    # another tenant's (not even that tenant's salt, sent as is).
    chosen = {_v1_salt(tenants, a, cache_salt=salt) for salt in (salt_b, "mine")}
    assert chosen.isdisjoint({salt_a, salt_b}) and len(chosen) == 2
    assert _v1_salt(tenants, b, cache_salt="mine") not in chosen | {salt_b}
    assert _v1_salt(tenants, a, cache_salt="mine") in chosen  # the same salt again


@pytest.mark.parametrize("salt", [5, "", "a/b", "x" * 129, None])
def test_a_malformed_cache_salt_is_refused_as_vllm_refuses_it(
    tenants: TenantApp, salt: object
) -> None:
    calls = len(tenants.engine.calls)
    response = tenants.client.post(
        "/v1/chat/completions", json={**CHAT, "cache_salt": salt}, headers=tenants.keys.auth("ops")
    )
    if salt is None:  # as unset
        assert response.status_code == 200
        return
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "cache_salt"
    assert len(tenants.engine.calls) == calls


def test_without_keys_every_request_shares_one_salt(app: App) -> None:
    first, second = _seed_salt(app, {}), _seed_salt(app, {"X-Request-Id": "other"})
    assert first and first == second
