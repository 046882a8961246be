"""The launcher's pieces that need no Ray: profile rendering and starting Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from cloudllm_serve.devhost import launcher
from cloudllm_serve.devhost.procfs import children
from cloudllm_serve.devhost.settings import HostSettings
from cloudllm_serve.errors import SettingsError
from cloudllm_serve.settings import Settings
from tests.support import server_port, wait_for

REPO = Path(__file__).resolve().parents[2]


def test_profiles_render_with_llm_host_and_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_PORT", "9123")
    monkeypatch.setenv("LLM_HOST", "127.0.0.1")
    profile = launcher.load_profile(REPO / "deployments" / "cpu.yaml")
    settings = launcher.profile_settings(profile)
    assert settings.ENGINE_DEVICE == "cpu"
    assert settings.SERVE_DIRECT_INGRESS is True
    rendered = launcher.render_profile(profile, settings)
    assert rendered["http_options"]["port"] == 9123
    assert rendered["http_options"]["host"] == "127.0.0.1"
    assert rendered["applications"] == profile["applications"]


def test_start_redis_starts_and_reuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CLOUDLLM_CACHE_DIR", str(tmp_path))
    url = f"redis://127.0.0.1:{server_port()}/0"
    process = launcher.start_redis(url)
    assert process is not None
    try:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        assert launcher.redis_answers("127.0.0.1", port)
        assert (tmp_path / "redis").is_dir()
        # The durability policy README and docs/deployment.md state.
        config = redis.Redis(port=port, decode_responses=True).config_get("append*")
        assert (config["appendonly"], config["appendfsync"]) == ("yes", "always")
        assert launcher.REDIS_APPENDFSYNC == "always"
        assert launcher.start_redis(url) is None  # one answers already: reuse it
        assert "already answers" in capsys.readouterr().out
    finally:
        launcher.stop_process(process, "Redis", 10)
    assert process.poll() is not None


def test_serve_environment_defaults_keep_the_proxy() -> None:
    settings = Settings(LLM_PORT=9100)
    env = launcher.serve_environment(settings, {"PATH": "/bin"})
    assert env["RAY_worker_niceness"] == "0"
    assert env["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"
    assert "RAY_SERVE_ENABLE_DIRECT_INGRESS" not in env
    # The host's settings, which serve_run reads back from there.
    assert (
        HostSettings.model_validate(
            {k: env[k] for k in ("SERVING_NICENESS", "ENGINE_NICENESS", "SERVING_OFF_ENGINE_CPUS")}
        )
        == HostSettings()
    )
    host = HostSettings(SERVING_NICENESS=10, SERVING_OFF_ENGINE_CPUS=True)
    hosted = launcher.serve_environment(settings, {}, host)
    assert (hosted["SERVING_NICENESS"], hosted["SERVING_OFF_ENGINE_CPUS"]) == ("10", "true")
    untuned = launcher.serve_environment(Settings(SERVE_LATENCY_TUNING=False), {})
    assert not set(launcher.LATENCY_TUNING) & set(untuned)
    assert launcher.render_profile({"applications": []}, settings)["http_options"]["port"] == 9100


def test_direct_ingress_gives_llm_port_to_the_ingress_replica() -> None:
    settings = Settings(LLM_PORT=9100, LLM_HOST="127.0.0.1", SERVE_DIRECT_INGRESS=True)
    env = launcher.serve_environment(settings, {"RAY_worker_niceness": "5"})
    assert env["RAY_worker_niceness"] == "5"  # an operator's own value wins
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] == "9100"
    assert int(env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) > 9100
    rendered = launcher.render_profile({"applications": []}, settings, proxy_port=9200)
    assert rendered["http_options"] == {"host": "127.0.0.1", "port": 9200}


def test_health_problems_are_shown_while_waiting() -> None:
    import json

    from cloudllm_serve.devhost.launcher import _health_problems

    body = json.dumps({"problems": ["engine: no engine replica is running (needs 2 GPU(s))"]})
    assert _health_problems(body.encode()) == (
        ": engine: no engine replica is running (needs 2 GPU(s))"
    )
    assert _health_problems(b"<html>") == ""


def test_ray_session_logs_are_those_of_the_cluster_under_the_process(tmp_path: Path) -> None:
    """Found in the command line of a process under the given one (Ray's GCS server
    there), not /tmp/ray/session_latest, which may be another cluster's."""
    grandchild = (
        "import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', "
        f"'--session-dir={tmp_path}']); time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", grandchild])
    lonely = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        found = wait_for(lambda: launcher.ray_session_logs(parent.pid), timeout_s=30)
        assert found == tmp_path / "logs"
        assert launcher.ray_session_logs(lonely.pid) is None
    finally:
        for pid in [*children(parent.pid), parent.pid, lonely.pid]:
            os.kill(pid, signal.SIGKILL)
        parent.wait()
        lonely.wait()


def test_bind_failure_reads_only_lines_about_the_port(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    (logs / "serve").mkdir(parents=True)
    since = time.time() - 1
    (logs / "serve" / "replica.log").write_text(
        "INFO started\nERROR Failed to start RequestProtocol.HTTP server on port 8002: in use\n"
    )
    assert launcher.bind_failure(since, 8001, logs) is None
    assert "port 8002" in (launcher.bind_failure(since, 8002, logs) or "")
    assert launcher.bind_failure(time.time() + 60, 8002, logs) is None  # written before


def test_metrics_agent_on_loopback_unless_configured() -> None:
    """METRICS_EXPORT_HOST=127.0.0.1 (the default): the local cluster's node address is
    127.0.0.1, the one case where Ray binds its metrics agent to loopback only."""
    env = launcher.serve_environment(Settings(), {})
    assert {name: env[name] for name in launcher.LOOPBACK_NODE} == launcher.LOOPBACK_NODE
    everywhere = launcher.serve_environment(Settings(METRICS_EXPORT_HOST="0.0.0.0"), {})
    assert not set(launcher.LOOPBACK_NODE) & set(everywhere)


def test_host_settings_come_from_the_profile_the_environment_winning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CPU profile's ``devhost:`` section; a variable of the environment wins; a
    wrong value or name is refused naming it; the rendered config Serve gets lacks it."""
    profile = launcher.load_profile(REPO / "deployments" / "cpu.yaml")
    monkeypatch.delenv("SERVING_NICENESS", raising=False)
    monkeypatch.delenv("SERVING_OFF_ENGINE_CPUS", raising=False)
    host = HostSettings.from_profile(profile)
    assert (host.SERVING_NICENESS, host.SERVING_OFF_ENGINE_CPUS) == (10, True)
    for section, named in (({"SERVING_NICENESS": 40}, "SERVING_NICENESS"), ({"NICE": 1}, "NICE")):
        with pytest.raises(SettingsError, match=named):
            HostSettings.from_profile({**profile, "devhost": section})
    monkeypatch.setenv("SERVING_NICENESS", "0")
    assert HostSettings.from_profile(profile).SERVING_NICENESS == 0
    rendered = launcher.render_profile(profile, launcher.profile_settings(profile))
    assert "devhost" not in rendered and "devhost" in profile
