"""Image settings: the GPU profile's sizes, the allowlist's parsing, the torchvision hook."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cloudllm_serve.engine.vllm_engine import MEDIA_FETCH_OFF_DOMAIN, vllm_cli_args
from cloudllm_serve.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)


def qwen_tokens(width: int, height: int, max_pixels: int) -> int:
    """Qwen2-VL's tokens for one image (smart_resize at factor 28, plus two markers)."""
    h_bar, w_bar = round(height / 28) * 28, round(width / 28) * 28
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = math.floor(height / beta / 28) * 28
        w_bar = math.floor(width / beta / 28) * 28
    return (h_bar // 28) * (w_bar // 28) + 2


def test_gpu_profile_fits_a_photo_and_a_512_token_answer() -> None:
    args = yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"][0]["args"]
    settings = load_settings(args)
    side = settings.MAX_IMAGE_SIDE
    width, height = (1280, 960) if max(1280, 960) <= side else (side, side * 3 // 4)
    max_pixels = settings.VLLM_MM_PROCESSOR_KWARGS["max_pixels"]
    image = qwen_tokens(width, height, max_pixels)
    assert image == 1232
    prompt_room = 200  # system prompt, chat template, a question
    assert image + 512 + prompt_room <= settings.VLLM_MAX_MODEL_LEN
    assert settings.MAX_TOKENS_CAP >= 512


def test_allowlist_takes_host_names_and_addresses_only() -> None:
    settings = Settings(MEDIA_ALLOWED_DOMAINS="images.example.com, 127.0.0.1,[::1],Example.ORG.")
    assert settings.MEDIA_ALLOWED_DOMAINS == [
        "images.example.com",
        "127.0.0.1",
        "::1",
        "example.org",
    ]
    assert Settings().MEDIA_ALLOWED_DOMAINS == []
    for bad in ("https://images.example.com", "example.com:8080", "example.com/path"):
        with pytest.raises(ValueError, match="MEDIA_ALLOWED_DOMAINS"):
            Settings(MEDIA_ALLOWED_DOMAINS=bad)


def test_more_images_per_request_than_per_prompt_is_refused() -> None:
    with pytest.raises(ValueError, match="VLLM_LIMIT_IMAGES_PER_PROMPT"):
        Settings(MAX_IMAGES_PER_REQUEST=6, VLLM_LIMIT_IMAGES_PER_PROMPT=4)


def test_vllm_never_fetches_media_itself_and_takes_images_only() -> None:
    args = vllm_cli_args(Settings(VLLM_LIMIT_IMAGES_PER_PROMPT=5))
    at = args.index("--allowed-media-domains")
    assert args[at + 1] == MEDIA_FETCH_OFF_DOMAIN and MEDIA_FETCH_OFF_DOMAIN.endswith(".invalid")
    limits = args[args.index("--limit-mm-per-prompt") + 1]
    assert limits == '{"image": 5, "video": 0, "audio": 0}'


def test_local_model_names_resolve_to_their_folders() -> None:
    settings = Settings(LLM_MODEL="test-vlm")
    assert Path(settings.LLM_MODEL).name == "test-vlm" and Path(settings.LLM_MODEL).is_absolute()
    assert settings.model_name == "test-vlm"


def test_torchvision_imports_beside_the_cpu_torch() -> None:
    """The .pth hook make install writes lets PyPI's CUDA torchvision import (Qwen2-VL needs it)."""
    code = "import torchvision, transformers.models.qwen2_vl.image_processing_qwen2_vl; print('ok')"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
