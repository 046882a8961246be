"""The launcher's pieces that need no Ray: profile rendering and starting Redis."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloudllm_serve import launcher
from cloudllm_serve.settings import Settings
from tests.support import free_port

REPO = Path(__file__).resolve().parents[2]


def test_profiles_render_with_llm_host_and_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_PORT", "9123")
    monkeypatch.setenv("LLM_HOST", "127.0.0.1")
    profile = launcher.load_profile(REPO / "deployments" / "cpu.yaml")
    settings = launcher.profile_settings(profile)
    assert settings.ENGINE_DEVICE == "cpu"
    rendered = launcher.render_profile(profile, settings)
    assert rendered["http_options"]["port"] == 9123
    assert rendered["http_options"]["host"] == "127.0.0.1"
    assert rendered["applications"] == profile["applications"]


def test_start_redis_starts_and_reuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CLOUDLLM_CACHE_DIR", str(tmp_path))
    url = f"redis://127.0.0.1:{free_port()}/0"
    process = launcher.start_redis(url)
    assert process is not None
    try:
        assert launcher.redis_answers("127.0.0.1", int(url.rsplit(":", 1)[1].split("/")[0]))
        assert (tmp_path / "redis").is_dir()
        assert launcher.start_redis(url) is None  # one answers already: reuse it
        assert "already answers" in capsys.readouterr().out
    finally:
        launcher.stop_process(process, "Redis", 10)
    assert process.poll() is not None


def test_settings_type_is_exported() -> None:
    assert launcher.Settings is Settings
