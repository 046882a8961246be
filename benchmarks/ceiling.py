"""The serving layer's ceiling, on the simulated engine: ``make bench-ceiling``.

    python -m benchmarks.ceiling                 # every system, results in benchmarks/results
    python -m benchmarks.ceiling --systems ours,floor --concurrencies 1,64

Every system runs vLLM's own OpenAI serving layer over the same simulated engine
(:mod:`cloudllm_serve.engine.simulated`, ``SIM_PRESET=ceiling``: no compute time, so
tokens come as fast as the serving layer takes them) and is driven by the same load
generator, a process of its own (:mod:`benchmarks.loadgen`):

* ``ours`` and ``ours-off``: our stack as ``LLM_MODEL=sim make serve`` runs it, with
  stream coalescing at its default and off (``STREAM_BATCH_INTERVAL_MS=0``);
* ``ray-llm-50`` and ``ray-llm-0``: Ray Serve LLM (``build_openai_app``) with the
  simulated engine under its own vLLM engine class (:mod:`benchmarks.ray_serve_llm_sim`),
  at its default stream batching (50 ms) and at 0;
* ``floor``: a plain uvicorn server running the engine in-process
  (:mod:`benchmarks.floor_server`): no Ray, no second process.

Per system and concurrency: tokens/s the clients received, TTFT and inter-token latency
p50/p99 (the simulator imposes none: they are all the serving layer's), errors, and the
CPU-seconds per 1,000 relayed tokens of each process of the serving layer (proxy,
ingress, engine replica) from /proc, the simulator's step loop counted apart.

Then the hold test: our stack (coalescing on) holds ``--hold-streams`` (1,024) streams
at once on one ingress and one engine replica, whose simulated engine decodes
``--hold-batch`` (256) of them at a time, a token each every ``--hold-step-ms`` (50), as a
GPU replica would. The streams open over ``HOLD_RAMP_S``; from then on, the added
inter-token latency is what the clients measured minus the simulator's step (their TTFT
includes the wait for a batch slot).

Settings are pinned so that nothing is refused: a simulated batch as large as the
largest concurrency, the queue bounds raised. Results: ``ceiling.json``, ``ceiling.md``
and ``ceiling.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import proc_cpu
from benchmarks.compare import CloudLLM, Server
from cloudllm_serve.devhost.ports import free_port
from cloudllm_serve.settings import load_settings

REPO = Path(__file__).resolve().parent.parent
MODEL = "sim"
LABELS = {
    "ours": "CloudLLM Serve (coalescing on)",
    "ours-off": "CloudLLM Serve (coalescing off)",
    "ray-llm-50": "Ray Serve LLM (stream batching 50 ms, its default)",
    "ray-llm-0": "Ray Serve LLM (stream batching 0)",
    "floor": "floor: plain uvicorn, engine in-process",
}
SYSTEMS = tuple(LABELS)
#: Roles of the serving layer whose CPU is counted (Ray's daemons and Serve's controller
#: are listed apart: they do not scale with tokens).
SERVING_ROLES = ("proxy", "ingress", "engine")
DEFAULT_CONCURRENCIES = (1, 64, 256, 1024)
#: The hold test's streams open evenly over this long; its latencies count from then.
HOLD_RAMP_S = 5.0
#: Tokens per answer, and words per prompt.
MAX_TOKENS = 128
PROMPT_WORDS = 32


def say(message: str) -> None:
    """Print a progress line."""
    print(f"[bench-ceiling] {message}", flush=True)


def sim_environment(max_seqs: int, preset: str = "ceiling", **times: float) -> dict[str, str]:
    """The simulated engine's settings for every system of the run."""
    env = {
        "LLM_MODEL": MODEL,
        "SIM_PRESET": preset,
        "SIM_TTFT_MS_PER_TOKEN": "0",
        "SIM_STEP_MS_PER_SEQ": "0",
        "SIM_JITTER": "0",
        "VLLM_MAX_NUM_SEQS": str(max_seqs),
    }
    env.update({name: str(value) for name, value in times.items()})
    return env


class OurStack(CloudLLM):
    """Our stack on the simulated engine (``make serve``'s launcher and CPU profile)."""

    def __init__(self, name: str, log_dir: Path, env: dict[str, str]) -> None:
        super().__init__(name, load_settings(), log_dir)
        self.env.update(env)
        # Nothing refused, and the serving layer at the same priority as the other
        # systems' (the CPU profile lowers it for vLLM's sake; there is no vLLM here).
        self.env.update(
            {
                "ENGINE_MAX_QUEUED_REQUESTS": "4096",
                "METRICS_EXPORT_PORT": str(free_port()),
                "SERVING_NICENESS": "0",
                "SERVING_OFF_ENGINE_CPUS": "false",
            }
        )


class RayServeLLMSim(Server):
    """Ray Serve LLM with the simulated engine (``benchmarks/ray_serve_llm_app.py``)."""

    def __init__(self, name: str, log_dir: Path, env: dict[str, str], batching_ms: int) -> None:
        super().__init__(name, load_settings(), log_dir)
        self.env.update(env)
        self.batching_ms = batching_ms

    def start(self) -> None:
        """Start Ray Serve LLM's app on the simulated engine."""
        self._spawn(
            [
                sys.executable,
                str(REPO / "benchmarks" / "ray_serve_llm_app.py"),
                "--simulated",
                "--port",
                str(self.port),
                "--stream-batching-ms",
                str(self.batching_ms),
                "--max-num-seqs",
                self.env["VLLM_MAX_NUM_SEQS"],
            ]
        )


class Floor(Server):
    """The plain ASGI floor (``benchmarks/floor_server.py``)."""

    def __init__(self, name: str, log_dir: Path, env: dict[str, str]) -> None:
        super().__init__(name, load_settings(), log_dir)
        self.env.update(env)

    def start(self) -> None:
        """Start the floor server."""
        self._spawn([sys.executable, "-m", "benchmarks.floor_server", "--port", str(self.port)])


def make_server(name: str, log_dir: Path, env: dict[str, str]) -> Server:
    """The system ``name`` of :data:`SYSTEMS`."""
    if name == "ours":
        return OurStack(name, log_dir, env)
    if name == "ours-off":
        return OurStack(name, log_dir, {**env, "STREAM_BATCH_INTERVAL_MS": "0"})
    if name.startswith("ray-llm-"):
        return RayServeLLMSim(name, log_dir, env, int(name.removeprefix("ray-llm-")))
    if name == "floor":
        return Floor(name, log_dir, env)
    raise ValueError(f"unknown system {name!r}; one of {', '.join(SYSTEMS)}")


def server_pids(server: Server) -> list[int]:
    """Every process of a system: its started processes and their descendants."""
    pids: list[int] = []
    for process in server.processes:
        pids += proc_cpu.descendants(process.pid)
    return pids


def cpu_by_role(
    delta: dict[int, proc_cpu.ProcCpu],
) -> tuple[dict[str, float], float, list[dict[str, Any]]]:
    """CPU seconds by role, the simulator's, and the busiest processes.

    The simulator's step loop is taken out of its process's role.
    """
    roles: dict[str, float] = {}
    simulator = 0.0
    for proc in delta.values():
        sim = proc_cpu.simulator_cpu_s(proc)
        simulator += sim
        role = proc_cpu.classify(proc)
        # The floor is one process: its serving layer is everything but the step loop.
        roles[role] = roles.get(role, 0.0) + proc.cpu_s - sim
    busiest = sorted(delta.values(), key=lambda p: p.cpu_s, reverse=True)[:6]
    top = [
        {"pid": p.pid, "title": (p.cmdline.split(" ", 1)[0] or p.name)[:60], "cpu_s": p.cpu_s}
        for p in busiest
        if p.cpu_s > 0.05
    ]
    return roles, simulator, top


def run_load(
    server: Server,
    concurrency: int,
    requests: int,
    out: Path,
    max_tokens: int = MAX_TOKENS,
    ramp_s: float = 0.0,
) -> dict[str, Any]:
    """One load generator run (a process of its own), with the system's CPU around it."""
    result_path = out / "raw" / f"{server.name}-c{concurrency}.json"
    result_path.parent.mkdir(parents=True, exist_ok=True)
    pids = server_pids(server)
    before = proc_cpu.cpu_snapshot(pids)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.loadgen",
            "--url",
            server.base_url,
            "--model",
            MODEL,
            "--concurrency",
            str(concurrency),
            "--requests",
            str(requests),
            "--max-tokens",
            str(max_tokens),
            "--prompt-words",
            str(PROMPT_WORDS),
            "--timeout-s",
            "300",
            "--ramp-s",
            str(ramp_s),
            "--out",
            str(result_path),
        ],
        cwd=REPO,
        check=True,
        timeout=900,
    )
    after = proc_cpu.cpu_snapshot(server_pids(server))
    result: dict[str, Any] = json.loads(result_path.read_text())
    roles, simulator, top = cpu_by_role(proc_cpu.cpu_delta(before, after))
    tokens = max(1, int(result["output_tokens"]))
    serving = sum(roles.get(role, 0.0) for role in SERVING_ROLES)
    if isinstance(server, Floor):
        serving = sum(roles.values())
    result["cpu_s"] = {role: round(value, 3) for role, value in sorted(roles.items())}
    result["simulator_cpu_s"] = round(simulator, 3)
    result["serving_cpu_ms_per_1k_tokens"] = round(serving / tokens * 1e6, 1)
    result["cpu_ms_per_1k_tokens"] = {
        role: round(value / tokens * 1e6, 1) for role, value in sorted(roles.items())
    }
    result["busiest"] = top
    return result


def requests_at(concurrency: int) -> int:
    """Measured requests at a concurrency: two waves, at least 32, at most 1,024."""
    return min(max(32, 2 * concurrency), 1024)


@dataclass
class SystemRun:
    """One system's results, or why it could not run."""

    system: str
    label: str
    startup_s: float | None = None
    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None


def run_system(name: str, concurrencies: list[int], env: dict[str, str], out: Path) -> SystemRun:
    """Start one system, warm it up, run every concurrency, stop it."""
    run = SystemRun(name, LABELS[name])
    server = make_server(name, out / "logs", env)
    server.log_path.parent.mkdir(parents=True, exist_ok=True)
    say(f"{name}: starting")
    try:
        server.start()
        run.startup_s = round(server.wait_ready(), 1)
        say(f"{name}: ready after {run.startup_s} s; warming up")
        run_load(server, 16, 32, out)
        for concurrency in concurrencies:
            result = run_load(server, concurrency, requests_at(concurrency), out)
            run.results[concurrency] = result
            say(
                f"{name} c={concurrency}: {result['tokens_per_s']:.0f} tok/s, "
                f"TTFT p50 {result['ttft_ms']['p50']} ms, ITL p99 {result['itl_ms']['p99']} ms, "
                f"{result['errors']} errors, serving CPU "
                f"{result['serving_cpu_ms_per_1k_tokens']} ms/1k tokens"
            )
    except Exception as error:  # one system failing must not lose the others
        run.error = f"{type(error).__name__}: {error}"
        say(f"{name} FAILED: {run.error}")
    finally:
        server.stop()
    return run


@dataclass
class HoldRun:
    """The hold test: many streams at once on one ingress and one engine replica.

    The simulated engine decodes ``batch`` of them at a time, as a GPU replica would
    (the others wait in its queue, so their TTFT includes that wait: only the inter-token
    latency is compared with the simulator's own).
    """

    streams: int
    batch: int
    step_ms: float
    ttft_ms: float
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def added_itl_p99_ms(self) -> float | None:
        """Client inter-token latency p99 once every stream is open, minus the step."""
        p99 = self.result.get("itl_after_ramp_ms", {}).get("p99")
        return None if p99 is None else round(p99 - self.step_ms, 1)


def run_hold(
    streams: int, batch: int, step_ms: float, ttft_ms: float, max_tokens: int, out: Path
) -> HoldRun:
    """Our stack holding ``streams`` streams; ``batch`` of them get a token each ``step_ms``."""
    hold = HoldRun(streams, batch, step_ms, ttft_ms)
    env = sim_environment(batch, "default", SIM_TTFT_MS=ttft_ms, SIM_STEP_MS=step_ms)
    server = make_server("ours", out / "logs", env)
    server.name = "hold"
    server.log_path = out / "logs" / "hold.log"
    say(f"hold: {streams} streams, {batch} at a time getting a token every {step_ms:g} ms")
    try:
        server.start()
        server.wait_ready()
        run_load(server, 16, 32, out, max_tokens=8)
        hold.result = run_load(
            server, streams, streams, out, max_tokens=max_tokens, ramp_s=HOLD_RAMP_S
        )
        say(
            f"hold: {hold.result['ok']} ok, {hold.result['errors']} errors, TTFT p50 "
            f"{hold.result['ttft_ms']['p50']} ms, added ITL p99 {hold.added_itl_p99_ms} ms"
        )
    except Exception as error:
        hold.error = f"{type(error).__name__}: {error}"
        say(f"hold FAILED: {hold.error}")
    finally:
        server.stop()
    return hold


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated")
    parser.add_argument(
        "--concurrencies", default=",".join(map(str, DEFAULT_CONCURRENCIES)), help="streams"
    )
    parser.add_argument("--hold-streams", type=int, default=1024, help="0: no hold test")
    parser.add_argument("--hold-batch", type=int, default=256, help="simulated batch")
    parser.add_argument("--hold-step-ms", type=float, default=50.0)
    parser.add_argument("--hold-ttft-ms", type=float, default=20.0)
    parser.add_argument("--hold-tokens", type=int, default=48, help="tokens per hold stream")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in args.systems if s not in SYSTEMS]
    if unknown:
        parser.error(f"unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}")
    args.concurrencies = [int(c) for c in args.concurrencies.split(",") if c.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; write ceiling.json/md/png; 0 when every system ran."""
    args = parse_args(argv)
    started = time.monotonic()
    out: Path = args.out
    work = REPO / ".bench" / "ceiling"
    work.mkdir(parents=True, exist_ok=True)
    env = sim_environment(max(args.concurrencies))
    runs = [run_system(name, args.concurrencies, env, work) for name in args.systems]
    hold = (
        run_hold(
            args.hold_streams,
            args.hold_batch,
            args.hold_step_ms,
            args.hold_ttft_ms,
            args.hold_tokens,
            work,
        )
        if args.hold_streams
        else None
    )
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "settings": {
            "max_tokens": MAX_TOKENS,
            "prompt_words": PROMPT_WORDS,
            "sim": env,
            "stream_batch_interval_ms": load_settings().STREAM_BATCH_INTERVAL_MS,
        },
        "took_s": round(time.monotonic() - started, 1),
        "systems": [asdict(run) for run in runs],
        "hold": None
        if hold is None
        else {**asdict(hold), "added_itl_p99_ms": hold.added_itl_p99_ms},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "ceiling.json").write_text(json.dumps(report, indent=2) + "\n")
    from benchmarks.ceiling_report import write_markdown, write_plot

    (out / "ceiling.md").write_text(write_markdown(report))
    write_plot(report, out / "ceiling.png")
    say(f"done in {report['took_s']} s: {out / 'ceiling.md'}")
    return 0 if all(run.error is None for run in runs) and (hold is None or not hold.error) else 1


if __name__ == "__main__":
    sys.exit(main())
