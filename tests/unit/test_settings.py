"""Settings: SPEC §2 defaults, validation that names the variable, precedence."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from cloudllm_serve.app import build_app
from cloudllm_serve.errors import SettingsError
from cloudllm_serve.settings import Settings, load_settings

SPEC_VARIABLES = [
    "LLM_HOST",
    "LLM_PORT",
    "VLLM_MAX_MODEL_LEN",
    "VLLM_MAX_NUM_SEQS",
    "VLLM_BLOCK_SIZE",
    "VLLM_GPU_MEMORY_UTILIZATION",
    "VLLM_TENSOR_PARALLEL_SIZE",
    "MAX_TOKENS_CAP",
    "MAX_UPLOAD_BYTES",
    "MAX_IMAGE_SIDE",
    "LLM_MODEL",
    "REDIS_URL",
]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)


def test_defaults_are_the_seeds() -> None:
    settings = load_settings()
    assert settings.LLM_HOST == "0.0.0.0"
    assert settings.LLM_PORT == 8001
    assert settings.VLLM_MAX_MODEL_LEN == 2048
    assert settings.VLLM_MAX_NUM_SEQS == 16
    assert settings.VLLM_BLOCK_SIZE == 16
    assert settings.VLLM_GPU_MEMORY_UTILIZATION == 0.9
    assert settings.VLLM_TENSOR_PARALLEL_SIZE == 1
    assert settings.MAX_TOKENS_CAP == 512
    assert settings.MAX_UPLOAD_BYTES == 10 * 1024 * 1024
    assert settings.MAX_IMAGE_SIDE == 1280
    assert settings.LLM_MODEL.endswith("SmolLM2-135M-Instruct")
    assert settings.model_name == "SmolLM2-135M-Instruct"


def test_every_spec_variable_is_a_setting() -> None:
    assert set(SPEC_VARIABLES) <= set(Settings.model_fields)


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_MAX_NUM_SEQS", "8")
    monkeypatch.setenv("LLM_MODEL", "Qwen/Qwen2.5-VL-32B-Instruct")
    settings = load_settings()
    assert settings.VLLM_MAX_NUM_SEQS == 8
    assert settings.model_name == "Qwen/Qwen2.5-VL-32B-Instruct"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("VLLM_MAX_NUM_SEQS", "abc"),
        ("VLLM_MAX_NUM_SEQS", "0"),
        ("LLM_PORT", "70000"),
        ("VLLM_GPU_MEMORY_UTILIZATION", "1.5"),
        ("VLLM_TENSOR_PARALLEL_SIZE", "-1"),
        ("MAX_TOKENS_CAP", "0"),
        ("REDIS_URL", "http://example.com"),
        ("ENGINE_DEVICE", "tpu"),
        ("VLLM_ENFORCE_EAGER", "maybe"),
    ],
)
def test_bad_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert variable in caught.value.message
    assert repr(value) in caught.value.message


def test_cap_must_leave_room_for_the_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_TOKENS_CAP", "4096")
    with pytest.raises(SettingsError, match=r"MAX_TOKENS_CAP .* VLLM_MAX_MODEL_LEN"):
        load_settings()


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({"REDIS_SENTINELS": "127.0.0.1:26379"}, "REDIS_SENTINELS and REDIS_SENTINEL_MASTER"),
        ({"REDIS_SENTINEL_MASTER": "cloudllm"}, "REDIS_SENTINELS and REDIS_SENTINEL_MASTER"),
        (
            {"REDIS_SENTINELS": "a:1,b", "REDIS_SENTINEL_MASTER": "m"},
            "REDIS_SENTINELS='a:1,b': 'b' is not host:port",
        ),
        (
            {"REDIS_SENTINELS": "a:1", "REDIS_SENTINEL_MASTER": "m", "REDIS_CLUSTER": "true"},
            "exclusive",
        ),
        ({"REDIS_CLUSTER": "true", "REDIS_URL": "redis://h:7000/2"}, "database 0 only"),
        ({"REDIS_MIN_REPLICAS_ACK": "1", "REDIS_ACK_TIMEOUT_MS": "3000"}, "REDIS_ACK_TIMEOUT_MS"),
        ({"REDIS_MIN_REPLICAS_ACK": "-1"}, "REDIS_MIN_REPLICAS_ACK"),
    ],
)
def test_redis_topology_is_checked_at_start_up(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], message: str
) -> None:
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert message in caught.value.message


def test_redis_topologies_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_SENTINELS", "10.0.0.1:26379, 10.0.0.2:26379")
    monkeypatch.setenv("REDIS_SENTINEL_MASTER", "cloudllm")
    monkeypatch.setenv("REDIS_MIN_REPLICAS_ACK", "1")
    assert load_settings().REDIS_MIN_REPLICAS_ACK == 1
    monkeypatch.delenv("REDIS_SENTINELS")
    monkeypatch.delenv("REDIS_SENTINEL_MASTER")
    monkeypatch.setenv("REDIS_CLUSTER", "true")
    monkeypatch.setenv("REDIS_URL", "redis://redis-0:7000")
    assert load_settings().REDIS_CLUSTER


def test_cpu_needs_block_size_multiple_of_32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGINE_DEVICE", "cpu")
    with pytest.raises(SettingsError, match="VLLM_BLOCK_SIZE"):
        load_settings()
    monkeypatch.setenv("VLLM_BLOCK_SIZE", "32")
    assert load_settings().VLLM_BLOCK_SIZE == 32


def test_profile_args_are_defaults_and_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings({"VLLM_MAX_NUM_SEQS": 4}).VLLM_MAX_NUM_SEQS == 4
    monkeypatch.setenv("VLLM_MAX_NUM_SEQS", "6")
    assert load_settings({"VLLM_MAX_NUM_SEQS": 4}).VLLM_MAX_NUM_SEQS == 6


def test_unknown_profile_arg_is_refused() -> None:
    with pytest.raises(SettingsError, match=r"VLLM_MAX_NUM_SEQ\b"):
        load_settings({"VLLM_MAX_NUM_SEQ": 4})


def test_application_builder_validates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_MAX_MODEL_LEN", "lots")
    with pytest.raises(SettingsError, match="VLLM_MAX_MODEL_LEN='lots'"):
        build_app({})


def test_launcher_stops_at_a_bad_variable() -> None:
    """`make serve` with a bad value stops before starting anything, naming the variable."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cloudllm_serve.devhost.launcher",
            "--profile",
            "deployments/cpu.yaml",
        ],
        env={"PATH": "/usr/bin:/bin", "VLLM_MAX_NUM_SEQS": "sixteen"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "VLLM_MAX_NUM_SEQS='sixteen'" in result.stderr
    assert "starting" not in result.stdout


def test_a_dotenv_file_sets_settings_between_the_config_args_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        "VLLM_MAX_NUM_SEQS=8\n"
        "MAX_TOKENS_CAP=64\n"
        "MEDIA_ALLOWED_PORTS=8080,8443\n"
        "HF_TOKEN=someone-elses\n"
        "VLLM_MAX_NUM_SEQ=3\n"
    )
    monkeypatch.delenv("VLLM_MAX_NUM_SEQS", raising=False)
    monkeypatch.setenv("MAX_TOKENS_CAP", "32")
    args = {"VLLM_MAX_NUM_SEQS": 4, "ENGINE_MAX_QUEUED_REQUESTS": 7}
    with caplog.at_level(logging.WARNING):
        settings = load_settings(args, env_file=env_file)
    assert settings.VLLM_MAX_NUM_SEQS == 8  # the file beats the config's args
    assert settings.MAX_TOKENS_CAP == 32  # the environment beats the file
    assert settings.ENGINE_MAX_QUEUED_REQUESTS == 7  # args the file leaves alone still count
    assert settings.MEDIA_ALLOWED_PORTS == [8080, 8443]  # read as from the environment
    assert "HF_TOKEN, VLLM_MAX_NUM_SEQ" in caplog.text  # a misspelt setting is named


def test_no_dotenv_file_and_a_bad_value_in_one(tmp_path: Path) -> None:
    settings = load_settings({"VLLM_MAX_NUM_SEQS": 4}, env_file=tmp_path / ".env")
    assert settings.VLLM_MAX_NUM_SEQS == 4
    (tmp_path / ".env").write_text("VLLM_MAX_NUM_SEQS=many\n")
    with pytest.raises(SettingsError, match="VLLM_MAX_NUM_SEQS"):
        load_settings(env_file=tmp_path / ".env")
