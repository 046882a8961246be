"""Admission before costly work: the tenant's limits are checked before a JSON schema is
compiled or an image fetched or decoded, and those run off the event loop.

The real app over a real Redis; the fake engine (declared a vision-language model).
"""

from __future__ import annotations

import base64
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cloudllm_serve.conversations.store import ConversationStore
from cloudllm_serve.ingress import images
from cloudllm_serve.ingress.app import create_app
from cloudllm_serve.ingress.seed_api import generation
from cloudllm_serve.ingress.service import CloudLLMService
from cloudllm_serve.settings import Settings
from tests.fakes import FakeEngine
from tests.support import RedisServer, image_bytes
from tests.tenants_support import TenantKeys, write_key_file

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}}
PNG = base64.b64encode(image_bytes(16, 16, seed=3)).decode()


class Limited:
    """The app with one tenant allowed one request per minute, and counters of the work."""

    def __init__(self, client: TestClient, keys: TenantKeys) -> None:
        self.client = client
        self.auth = keys.auth("rpm-1")
        self.calls: dict[str, int] = {}

    def count(self, monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> None:
        """Count the calls of ``module.name`` (still calling it)."""
        original: Callable[..., Any] = getattr(module, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)


@pytest.fixture
def limited(redis_server: RedisServer, tmp_path: Path) -> Iterator[Limited]:
    keys = write_key_file(
        tmp_path / "keys.yaml", [{"id": "rpm-1", "keys": 1, "requests_per_minute": 1}]
    )
    settings = Settings(
        REDIS_URL=redis_server.url,
        MAX_TOKENS_CAP=32,
        REDIS_TIMEOUT_S=1.0,
        API_KEYS_FILE=str(tmp_path / "keys.yaml"),
        AUDIT_LOG="off",
    )
    store = ConversationStore.from_url(
        settings.REDIS_URL, timeout_s=1.0, key_prefix=f"test-{uuid.uuid4().hex[:8]}:"
    )
    engine = FakeEngine()
    engine.supports_images = True
    with TestClient(create_app(CloudLLMService(settings, store, engine))) as client:
        yield Limited(client, keys)


def test_a_tenant_over_its_limit_costs_no_schema_check_and_no_image_work(
    limited: Limited, monkeypatch: pytest.MonkeyPatch
) -> None:
    limited.count(monkeypatch, generation, "check_json_schema")
    limited.count(monkeypatch, images, "check_image")
    limited.count(monkeypatch, images, "fetch_image")
    first = limited.client.post("/generate", json={"message": "hi"}, headers=limited.auth)
    assert first.status_code == 200, first.text
    refused = [
        limited.client.post(
            "/generate", json={"message": "hi", "json_schema": SCHEMA}, headers=limited.auth
        ),
        limited.client.post(
            "/vision",
            json={"message": "hi", "image": PNG, "json_schema": SCHEMA},
            headers=limited.auth,
        ),
        limited.client.post(
            "/multimodal",
            json={"message": "hi", "images": [PNG, "https://example.com/a.png"]},
            headers=limited.auth,
        ),
        limited.client.post(
            "/vision",
            data={"message": "hi"},
            files={"image": ("a.png", base64.b64decode(PNG), "image/png")},
            headers=limited.auth,
        ),
    ]
    assert [r.status_code for r in refused] == [429] * 4, [r.text for r in refused]
    assert limited.calls == {}


def test_a_schema_check_runs_off_the_event_loop(
    limited: Limited, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While one request's schema is checked (made slow here), /health still answers."""
    real = generation.check_json_schema

    def slow_check(*args: Any, **kwargs: Any) -> None:
        time.sleep(1.5)  # holds whatever thread runs it, as a huge schema would
        real(*args, **kwargs)

    monkeypatch.setattr(generation, "check_json_schema", slow_check)
    statuses: list[int] = []
    worker = threading.Thread(
        target=lambda: statuses.append(
            limited.client.post(
                "/generate", json={"message": "hi", "json_schema": SCHEMA}, headers=limited.auth
            ).status_code
        )
    )
    worker.start()
    time.sleep(0.3)
    started = time.perf_counter()
    health = limited.client.get("/health")
    took = time.perf_counter() - started
    worker.join()
    assert health.status_code == 200
    assert took < 0.9, f"/health waited {took:.2f} s behind a schema check"
    assert statuses == [200]


def test_a_schema_over_the_size_limit_is_refused_by_name(limited: Limited) -> None:
    schema = {
        "type": "object",
        "properties": {f"p{i}": {"type": "string"} for i in range(3000)},
    }
    response = limited.client.post(
        "/generate", json={"message": "hi", "json_schema": schema}, headers=limited.auth
    )
    assert response.status_code == 400, response.text
    assert "MAX_JSON_SCHEMA_BYTES (65536)" in response.json()["detail"]
    assert response.json()["param"] == "json_schema"
