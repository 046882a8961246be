"""VLLM_ENGINE_KWARGS: parsed, checked against vLLM's engine arguments, passed on."""

from __future__ import annotations

import pytest

from cloudllm_serve.engine.vllm_engine import check_engine_kwargs, engine_args_from_settings
from cloudllm_serve.errors import SettingsError
from cloudllm_serve.settings import Settings, load_settings


def test_json_from_the_environment_reaches_the_engine_args(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "VLLM_ENGINE_KWARGS", '{"dtype": "bfloat16", "max_num_batched_tokens": 4096}'
    )
    settings = load_settings()
    check_engine_kwargs(settings)
    args = engine_args_from_settings(settings)
    assert args["dtype"] == "bfloat16" and args["max_num_batched_tokens"] == 4096
    assert args["max_num_seqs"] == settings.VLLM_MAX_NUM_SEQS


def test_a_config_mapping_is_taken_as_is() -> None:
    settings = load_settings({"VLLM_ENGINE_KWARGS": {"quantization": "fp8"}})
    assert settings.VLLM_ENGINE_KWARGS == {"quantization": "fp8"}


@pytest.mark.parametrize(
    ("value", "problem"),
    [("{not json", "not valid JSON"), ("[1, 2]", "must be a JSON object")],
)
def test_malformed_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str, problem: str
) -> None:
    monkeypatch.setenv("VLLM_ENGINE_KWARGS", value)
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert "VLLM_ENGINE_KWARGS" in raised.value.message and problem in raised.value.message


def test_unknown_key_is_named_with_a_suggestion() -> None:
    with pytest.raises(SettingsError) as raised:
        check_engine_kwargs(Settings(VLLM_ENGINE_KWARGS={"max_num_batched_token": 1}))
    message = raised.value.message
    assert "'max_num_batched_token' is not a vLLM engine argument" in message
    assert "did you mean 'max_num_batched_tokens'" in message


def test_a_key_that_a_setting_controls_is_refused() -> None:
    with pytest.raises(SettingsError, match="'max_num_seqs' is set by VLLM_MAX_NUM_SEQS"):
        check_engine_kwargs(Settings(VLLM_ENGINE_KWARGS={"max_num_seqs": 4}))


def test_nothing_to_check_without_kwargs() -> None:
    check_engine_kwargs(Settings())
