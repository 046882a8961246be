"""Raw vLLM vs CloudLLM Serve vs Ray Serve LLM, in one run, on the same model and engine.

    python -m benchmarks.compare --quick        # make bench       (~15 minutes here)
    python -m benchmarks.compare                # make bench-full
    python -m benchmarks.compare --guard        # make bench-guard (~5 minutes here)

Each system is started in turn with the same engine settings (those of the CPU
profile, ``deployments/cpu.yaml``, unless ``--profile`` says otherwise), warmed up the
same way, driven with ``vllm bench serve`` (random dataset, the same seed for everyone)
at each concurrency, and stopped. The concurrencies default to 1, 4 and 1x, 2x and 4x
the batch size (``VLLM_MAX_NUM_SEQS``): past the batch size requests queue, which is
where a serving layer can cost the engine its CPU. Our app also runs the conversation
benchmark (:mod:`benchmarks.conversation_cost`). Results go to ``--out``
(``benchmarks/results``): ``results.json``, ``results.md`` (tables and ratios) and
``results.png`` (plots).

The saturation guard: when raw vLLM and our app both ran at twice the batch size, the
run exits with status 1 if our output throughput there is under ``--min-ratio`` (0.85)
times raw vLLM's. ``--guard`` is the short variant for that check alone (raw vLLM and
our app, twice the batch size only, results in ``.bench/guard``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import conversation_cost
from cloudllm_serve.devhost.launcher import load_profile, profile_settings, redis_server_command
from cloudllm_serve.devhost.ports import free_port
from cloudllm_serve.engine.vllm_engine import engine_args_from_settings, vllm_cli_args
from cloudllm_serve.settings import Settings

REPO = Path(__file__).resolve().parent.parent
SYSTEMS = ("vllm", "cloudllm", "ray-serve-llm")
LABELS = {
    "vllm": "raw vLLM (vllm serve)",
    "cloudllm": "CloudLLM Serve",
    "ray-serve-llm": "Ray Serve LLM",
}
METRICS = (
    "median_ttft_ms",
    "p99_ttft_ms",
    "median_tpot_ms",
    "median_itl_ms",
    "output_throughput",
    "request_throughput",
)


def say(message: str) -> None:
    """Print a progress line."""
    print(f"[bench] {message}", flush=True)


@dataclass
class Plan:
    """What to run."""

    concurrencies: list[int]
    prompts: dict[int, int]
    input_len: int
    output_len: int
    systems: list[str]


#: Our throughput at twice the batch size must be at least this share of raw vLLM's.
MIN_SATURATION_RATIO = 0.85


def default_concurrencies(batch_size: int) -> list[int]:
    """1 and 4 streams, then 1x, 2x and 4x the engine's batch size."""
    return sorted({1, 4, batch_size, 2 * batch_size, 4 * batch_size})


def make_plan(
    quick: bool, systems: list[str], input_len: int, output_len: int, concurrencies: list[int]
) -> Plan:
    """Prompts per concurrency: enough for stable medians (more in the full mode).

    Two waves of requests at each concurrency, and at least 16 requests, so that a
    median at low concurrency does not rest on a handful of samples.
    """
    quick_prompts = {c: max(16, 2 * c) for c in concurrencies}
    prompts = quick_prompts if quick else {c: 4 * n for c, n in quick_prompts.items()}
    return Plan(concurrencies, prompts, input_len, output_len, systems)


@dataclass
class SystemRun:
    """One system's results, or why it could not run."""

    system: str
    label: str
    startup_s: float | None = None
    results: dict[int, dict[str, float]] = field(default_factory=dict)
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def http_ok(url: str) -> bool:
    """Whether ``url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


class Server:
    """A system under test: processes this harness starts and stops."""

    def __init__(self, name: str, settings: Settings, log_dir: Path) -> None:
        self.name = name
        self.settings = settings
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{name}.log"
        self.processes: list[subprocess.Popen[bytes]] = []
        self.env = {**os.environ, "RAY_worker_niceness": "0"}

    def _spawn(self, command: list[str], env: dict[str, str] | None = None) -> None:
        log = self.log_path.open("ab")
        self.processes.append(
            subprocess.Popen(
                command,
                cwd=REPO,
                env=env or self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    def start(self) -> None:
        """Start the processes."""
        raise NotImplementedError

    def ready_url(self) -> str:
        """The URL that answers 200 once the system serves."""
        return f"{self.base_url}/v1/models"

    def wait_ready(self, timeout_s: float = 900) -> float:
        """Seconds until ready; raises if a process dies or time runs out."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with {process.returncode}: {self.log_tail()}"
                    )
            if http_ok(self.ready_url()):
                return time.monotonic() - started
            time.sleep(1)
        raise RuntimeError(f"{self.name} not ready within {timeout_s:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        """The end of this system's log."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM every process (group), SIGKILL what is left after a minute."""
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        for process in reversed(self.processes):
            try:
                process.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


class RawVllm(Server):
    """vLLM's own OpenAI server with the same engine arguments as our engine replicas."""

    def start(self) -> None:
        """Start ``vllm.entrypoints.openai.api_server``."""
        command = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        self._spawn(command + vllm_cli_args(self.settings))


class CloudLLM(Server):
    """Our app, started as ``make serve`` starts it, with a Redis of its own."""

    def start(self) -> None:
        """Start a Redis and the launcher."""
        redis_port = free_port()
        data_dir = self.log_path.parent / "redis"
        data_dir.mkdir(parents=True, exist_ok=True)
        self._spawn(redis_server_command("redis-server", "127.0.0.1", redis_port, data_dir))
        env = {
            **self.env,
            "LLM_HOST": "127.0.0.1",
            "LLM_PORT": str(self.port),
            "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        }
        self._spawn(
            [
                sys.executable,
                "-m",
                "cloudllm_serve.devhost.launcher",
                "--profile",
                str(self.settings_profile),
            ],
            env,
        )

    settings_profile: Path = REPO / "deployments" / "cpu.yaml"

    def ready_url(self) -> str:
        """Our ``/health``: 200 once the engine and Redis answer."""
        return f"{self.base_url}/health"


class RayServeLLM(Server):
    """Ray Serve LLM (``ray.serve.llm.build_openai_app``) with the same engine arguments."""

    def start(self) -> None:
        """Start ``benchmarks/ray_serve_llm_app.py``."""
        engine = {
            k: v
            for k, v in engine_args_from_settings(self.settings).items()
            if k not in ("model", "served_model_name")
        }
        self._spawn(
            [
                sys.executable,
                str(REPO / "benchmarks" / "ray_serve_llm_app.py"),
                "--model",
                self.settings.LLM_MODEL,
                "--model-id",
                self.settings.model_name,
                "--port",
                str(self.port),
                "--engine-kwargs",
                json.dumps(engine),
            ]
        )


SERVERS: dict[str, type[Server]] = {
    "vllm": RawVllm,
    "cloudllm": CloudLLM,
    "ray-serve-llm": RayServeLLM,
}


def bench(
    server: Server, plan: Plan, concurrency: int, prompts: int, out: Path
) -> dict[str, float]:
    """One ``vllm bench serve`` run; the metrics we report."""
    name = f"{server.name}-c{concurrency}.json"
    command = [
        sys.executable,
        "-m",
        "benchmarks.vllm_bench_serve",
        "--base-url",
        server.base_url,
        "--backend",
        "openai",
        "--endpoint",
        "/v1/completions",
        "--model",
        server.settings.model_name,
        "--tokenizer",
        server.settings.LLM_MODEL,
        "--dataset-name",
        "random",
        "--random-input-len",
        str(plan.input_len),
        "--random-output-len",
        str(plan.output_len),
        "--num-prompts",
        str(prompts),
        "--max-concurrency",
        str(concurrency),
        "--ignore-eos",
        "--seed",
        "0",
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,99",
        "--save-result",
        "--result-dir",
        str(out / "raw"),
        "--result-filename",
        name,
    ]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=1800)
    raw = json.loads((out / "raw" / name).read_text())
    metrics = {key: float(raw[key]) for key in METRICS}
    metrics["completed"] = raw["completed"]
    metrics["failed"] = raw["failed"]
    return metrics


def warm_up(server: Server, plan: Plan, batch_size: int, out: Path) -> None:
    """The same for every system: single requests, then full batches.

    A server that has just started still compiles, allocates and (Ray) settles its
    control processes; the first measurement (concurrency 1) must not pay for that.
    """
    bench(server, plan, 1, 4, out)
    bench(server, plan, batch_size, 2 * batch_size, out)


def run_system(name: str, plan: Plan, settings: Settings, out: Path, batch_size: int) -> SystemRun:
    """Start one system, warm it up, measure every concurrency, stop it."""
    run = SystemRun(name, LABELS[name])
    server = SERVERS[name](name, settings, out / "logs")
    say(f"{name}: starting")
    try:
        server.start()
        run.startup_s = round(server.wait_ready(), 1)
        say(f"{name}: ready after {run.startup_s} s; warming up")
        warm_up(server, plan, batch_size, out)
        for concurrency in plan.concurrencies:
            metrics = bench(server, plan, concurrency, plan.prompts[concurrency], out)
            run.results[concurrency] = metrics
            say(
                f"{name}: c={concurrency} ttft p50 {metrics['median_ttft_ms']:.1f} ms, "
                f"tpot p50 {metrics['median_tpot_ms']:.1f} ms, "
                f"{metrics['output_throughput']:.1f} tok/s, failed {metrics['failed']}"
            )
        if name == "cloudllm":
            say("cloudllm: conversation benchmark (seed API, Redis per turn)")
            run.extra["conversation_cost"] = conversation_cost.measure(server.base_url)
    except (RuntimeError, subprocess.SubprocessError, OSError) as error:
        detail = (
            error.stderr.decode(errors="replace")[-2000:]
            if isinstance(error, subprocess.CalledProcessError) and error.stderr
            else ""
        )
        run.error = f"{error}\n{detail}".strip()
        say(f"{name}: FAILED: {run.error[:500]}")
    finally:
        server.stop()
        say(f"{name}: stopped")
    return run


def ratios(runs: dict[str, SystemRun], ours: str, other: str) -> dict[int, dict[str, float]]:
    """ours/other for TTFT and TPOT p50 (lower is better) and throughput (higher is better)."""
    table: dict[int, dict[str, float]] = {}
    if runs.get(ours) is None or runs.get(other) is None:
        return table
    for concurrency, mine in runs[ours].results.items():
        theirs = runs[other].results.get(concurrency)
        if theirs:
            table[concurrency] = {
                "ttft_p50_ratio": round(mine["median_ttft_ms"] / theirs["median_ttft_ms"], 3),
                "ttft_p50_delta_ms": round(mine["median_ttft_ms"] - theirs["median_ttft_ms"], 2),
                "tpot_p50_ratio": round(mine["median_tpot_ms"] / theirs["median_tpot_ms"], 3),
                "throughput_ratio": round(
                    mine["output_throughput"] / theirs["output_throughput"], 3
                ),
            }
    return table


def saturation_check(
    ratios_vs_vllm: dict[int, dict[str, float]], batch_size: int, minimum: float
) -> tuple[bool | None, str]:
    """Whether our throughput at twice the batch size is at least ``minimum`` x raw vLLM's.

    ``None`` when that point was not measured for both systems (nothing to check).
    """
    concurrency = 2 * batch_size
    ratio = ratios_vs_vllm.get(concurrency)
    if ratio is None:
        return None, (
            f"saturation guard: not checked (raw vLLM and CloudLLM Serve at concurrency "
            f"{concurrency}, 2x VLLM_MAX_NUM_SEQS, were not both measured)"
        )
    value = ratio["throughput_ratio"]
    ok = value >= minimum
    return ok, (
        f"saturation guard: CloudLLM Serve / raw vLLM output throughput at concurrency "
        f"{concurrency} (2x VLLM_MAX_NUM_SEQS={batch_size}) is {value:.3f}, "
        f"{'at least' if ok else 'UNDER'} the {minimum:.2f} floor: {'OK' if ok else 'FAILED'}"
    )


def machine() -> str:
    """A line describing this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return (
        f"{os.cpu_count()} CPU cores ({cpu}), {memory:.0f} GiB RAM, no GPU, {platform.platform()}"
    )


def write_markdown(report: dict[str, Any], path: Path) -> None:
    """The results as Markdown tables."""
    lines = [
        f"Machine: {report['machine']}  ",
        f"Model: {report['model']}; random dataset, {report['input_len']} input / "
        f"{report['output_len']} output tokens, ignore_eos; {report['mode']} mode.  ",
        f"Command: `{report['command']}`",
        "",
        "| system | concurrency | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | ITL p50 ms "
        "| output tok/s | req/s | failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["systems"]:
        if run["error"]:
            lines.append(
                f"| {run['label']} | - | could not run: {run['error'].splitlines()[0]} "
                "| | | | | | |"
            )
            continue
        for concurrency, m in sorted(run["results"].items(), key=lambda kv: int(kv[0])):
            lines.append(
                f"| {run['label']} | {concurrency} | {m['median_ttft_ms']:.1f} | "
                f"{m['p99_ttft_ms']:.1f} | {m['median_tpot_ms']:.1f} | {m['median_itl_ms']:.1f} | "
                f"{m['output_throughput']:.1f} | {m['request_throughput']:.2f} | "
                f"{int(m['failed'])} |"
            )
    for key, title in (
        ("ours_vs_vllm", "CloudLLM Serve / raw vLLM"),
        ("ours_vs_ray_serve_llm", "CloudLLM Serve / Ray Serve LLM"),
    ):
        table = report["ratios"][key]
        if not table:
            continue
        lines += [
            "",
            f"**{title}** (TTFT: lower is better; throughput: higher is better)",
            "",
            "| concurrency | TTFT p50 ratio | TTFT p50 difference ms | TPOT p50 ratio "
            "| throughput ratio |",
            "|---|---|---|---|---|",
        ]
        for concurrency, r in sorted(table.items(), key=lambda kv: int(kv[0])):
            tpot = r.get("tpot_p50_ratio")
            lines.append(
                f"| {concurrency} | {r['ttft_p50_ratio']:.3f} | "
                f"{r['ttft_p50_delta_ms']:+.1f} | {'-' if tpot is None else f'{tpot:.3f}'} "
                f"| {r['throughput_ratio']:.3f} |"
            )
    if report.get("saturation_guard"):
        lines += ["", f"**{report['saturation_guard']}**"]
    cost = report.get("conversation_cost")
    if cost:
        lines += [
            "",
            "**Conversation store (seed API, multi-turn /generate)**: "
            f"{cost['turns']} turns in {cost['conversations']} conversations; Redis time "
            f"per turn p50 {cost['store_ms_p50']:.2f} ms (p99 {cost['store_ms_p99']:.2f} ms); "
            f"{cost['round_trips_per_turn']:.2f} Redis round trips per request.",
        ]
    path.write_text("\n".join(lines) + "\n")


def write_plot(report: dict[str, Any], path: Path) -> None:
    """TTFT p50 and output throughput against concurrency, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (ttft_axis, throughput_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in report["systems"]:
        if run["error"] or not run["results"]:
            continue
        points = sorted((int(c), m) for c, m in run["results"].items())
        xs = [c for c, _ in points]
        ttft_axis.plot(xs, [m["median_ttft_ms"] for _, m in points], marker="o", label=run["label"])
        throughput_axis.plot(
            xs, [m["output_throughput"] for _, m in points], marker="o", label=run["label"]
        )
    ttft_axis.set_yscale("log")
    for axis, title, unit in (
        (ttft_axis, "TTFT p50 (log scale)", "ms"),
        (throughput_axis, "Output throughput", "tokens/s"),
    ):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrency")
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.suptitle(
        f"{report['model']}, {report['input_len']}/{report['output_len']} tokens "
        f"({report['mode']} mode) on {os.cpu_count()} CPU cores"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; write results.json, results.md and results.png."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer prompts")
    parser.add_argument(
        "--guard",
        action="store_true",
        help="the saturation check alone: raw vLLM and our app at 2x the batch size, quick "
        "mode, results in .bench/guard",
    )
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--profile", type=Path, default=REPO / "deployments" / "cpu.yaml")
    parser.add_argument(
        "--concurrencies",
        default="",
        help="comma-separated (default: 1, 4 and 1x, 2x, 4x VLLM_MAX_NUM_SEQS)",
    )
    parser.add_argument(
        "--min-ratio",
        type=float,
        default=MIN_SATURATION_RATIO,
        help="saturation guard: least CloudLLM Serve / raw vLLM throughput at 2x the batch size",
    )
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="only re-render results.md and results.png from results.json",
    )
    args = parser.parse_args(argv)
    settings = profile_settings(load_profile(args.profile))
    batch_size = settings.VLLM_MAX_NUM_SEQS
    if args.guard:
        args.quick = True
        args.systems = "vllm,cloudllm"
        args.concurrencies = str(2 * batch_size)
        if args.out == parser.get_default("out"):
            args.out = REPO / ".bench" / "guard"
    if args.report_only:
        report = json.loads((args.out / "results.json").read_text())
        write_markdown(report, args.out / "results.md")
        write_plot(report, args.out / "results.png")
        return 0
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown system(s): {', '.join(sorted(unknown))}")
    concurrencies = [int(c) for c in args.concurrencies.split(",") if c] or (
        default_concurrencies(batch_size)
    )
    plan = make_plan(args.quick, systems, args.input_len, args.output_len, concurrencies)
    CloudLLM.settings_profile = args.profile
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    started = time.monotonic()
    runs = {name: run_system(name, plan, settings, args.out, batch_size) for name in systems}
    ours_vs_vllm = ratios(runs, "cloudllm", "vllm")
    guard_ok, guard_line = saturation_check(ours_vs_vllm, batch_size, args.min_ratio)
    report: dict[str, Any] = {
        "machine": machine(),
        "model": settings.model_name,
        "mode": "quick" if args.quick else "full",
        "command": "make bench-guard"
        if args.guard
        else ("make bench" if args.quick else "make bench-full"),
        "input_len": plan.input_len,
        "output_len": plan.output_len,
        "prompts": plan.prompts,
        "engine_args": engine_args_from_settings(settings),
        "systems": [asdict(run) for run in runs.values()],
        "batch_size": batch_size,
        "ratios": {
            "ours_vs_vllm": ours_vs_vllm,
            "ours_vs_ray_serve_llm": ratios(runs, "cloudllm", "ray-serve-llm"),
        },
        "conversation_cost": runs["cloudllm"].extra.get("conversation_cost")
        if "cloudllm" in runs
        else None,
        "saturation_guard": guard_line,
        "duration_s": round(time.monotonic() - started, 1),
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, args.out / "results.md")
    write_plot(report, args.out / "results.png")
    say(f"done in {report['duration_s']:.0f} s: {args.out}/results.md, results.json, results.png")
    print((args.out / "results.md").read_text())
    say(guard_line)
    if guard_ok is False:
        return 1
    return 0 if all(run.error is None for run in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
