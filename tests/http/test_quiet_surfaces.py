"""What the service shows without being asked: the console and the metrics port.

The audit log goes to a file in the run folder by default, not to the console (where
``make serve`` showed one JSON line per request beside Serve's access line), and the
token counter's tenant label can be left out (``METRICS_TENANT_LABELS``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cloudllm_serve.metrics import IngressMetrics
from cloudllm_serve.settings import Settings
from tests.fakes import FakeEngine
from tests.http.conftest import build_app
from tests.http.test_tenants import make_app
from tests.support import RedisServer


def test_audit_lines_go_to_the_run_folder_not_the_console(
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("CLOUDLLM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("AUDIT_LOG")  # tests/conftest.py turns it off for the others
    app, settings = build_app(redis_server, FakeEngine())
    audit = tmp_path / "run" / "audit.jsonl"
    assert str(audit) == settings.AUDIT_LOG  # the folder is made when the app starts
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        assert client.post("/generate", json={"message": "hi"}).status_code == 200
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [line["route"] for line in lines] == ["/health", "/generate"]
    printed = capfd.readouterr()
    assert '"route"' not in printed.out + printed.err
    # ...and on the console when asked.
    app, _ = build_app(redis_server, FakeEngine(), AUDIT_LOG="stderr")
    with TestClient(app) as client:
        client.get("/health")
    assert '"route":"/health"' in capfd.readouterr().err


def tokens_by_tags(
    redis_server: RedisServer, folder: Path, **settings: bool
) -> list[tuple[str, ...]]:
    """The tag sets of ``cloudllm_tokens`` after one answered request of tenant-a."""
    folder.mkdir()
    running = make_app(redis_server, folder, **settings)
    app = next(running)
    try:
        answer = app.client.post(
            "/generate", json={"message": "hi"}, headers=app.keys.auth("tenant-a")
        )
        assert answer.status_code == 200
        return sorted(app.service.metrics.tokens.totals)
    finally:
        running.close()


def test_tenant_labels_are_optional(redis_server: RedisServer, tmp_path: Path) -> None:
    assert tokens_by_tags(redis_server, tmp_path / "on") == [
        ("completion", "tenant-a"),
        ("prompt", "tenant-a"),
    ]
    off = tokens_by_tags(redis_server, tmp_path / "off", METRICS_TENANT_LABELS=False)
    assert off == [("completion",), ("prompt",)]
    assert IngressMetrics(tenant_labels=False).tokens.tag_keys == ("kind",)


def test_metrics_export_host_is_loopback_or_every_interface() -> None:
    assert Settings().METRICS_EXPORT_HOST == "127.0.0.1"
    assert Settings(METRICS_EXPORT_HOST="0.0.0.0").METRICS_EXPORT_HOST == "0.0.0.0"
    with pytest.raises(ValueError, match="METRICS_EXPORT_HOST"):
        Settings(METRICS_EXPORT_HOST="10.0.0.1")
