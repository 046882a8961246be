"""The benchmark harness's pure parts: engine flags for raw vLLM, ratios, the report."""

from __future__ import annotations

import itertools
from pathlib import Path

from benchmarks import compare
from cloudllm_serve.settings import Settings

METRICS = {
    "median_ttft_ms": 50.0,
    "p99_ttft_ms": 80.0,
    "median_tpot_ms": 20.0,
    "median_itl_ms": 19.0,
    "output_throughput": 100.0,
    "request_throughput": 1.0,
    "completed": 8,
    "failed": 0,
}


def test_raw_vllm_gets_the_same_engine_arguments(tmp_path: Path) -> None:
    settings = Settings(
        ENGINE_DEVICE="cpu",
        VLLM_BLOCK_SIZE=32,
        VLLM_ENFORCE_EAGER=True,
        VLLM_KV_CACHE_MEMORY_BYTES=1 << 30,
    )
    server = compare.RawVllm("vllm", settings, tmp_path)
    captured: list[list[str]] = []
    server._spawn = lambda command, env=None: captured.append(command)  # type: ignore[method-assign]
    server.start()
    (command,) = captured
    flags = dict(itertools.pairwise(command))
    assert flags["--block-size"] == "32"
    assert flags["--kv-cache-memory-bytes"] == str(1 << 30)
    assert "--enforce-eager" in command
    assert "--disable-log-stats" not in command  # False flags are left out
    assert '"backend": "xgrammar"' in flags["--structured-outputs-config"]


def test_ratios_and_markdown(tmp_path: Path) -> None:
    ours = compare.SystemRun(
        "cloudllm", "CloudLLM Serve", results={1: {**METRICS, "median_ttft_ms": 55.0}}
    )
    raw = compare.SystemRun("vllm", "raw vLLM", results={1: METRICS})
    broken = compare.SystemRun("ray-serve-llm", "Ray Serve LLM", error="ImportError: x\nmore")
    runs = {"cloudllm": ours, "vllm": raw, "ray-serve-llm": broken}
    ratio = compare.ratios(runs, "cloudllm", "vllm")
    assert ratio == {
        1: {
            "ttft_p50_ratio": 1.1,
            "ttft_p50_delta_ms": 5.0,
            "tpot_p50_ratio": 1.0,
            "throughput_ratio": 1.0,
        }
    }
    assert compare.ratios(runs, "cloudllm", "ray-serve-llm") == {}
    report = {
        "machine": "m",
        "model": "SmolLM2",
        "mode": "quick",
        "command": "make bench",
        "input_len": 128,
        "output_len": 128,
        "systems": [vars(run) for run in runs.values()],
        "ratios": {"ours_vs_vllm": ratio, "ours_vs_ray_serve_llm": {}},
        "conversation_cost": {
            "turns": 36,
            "conversations": 6,
            "store_ms_p50": 2.0,
            "store_ms_p99": 9.0,
            "round_trips_per_turn": 2.0,
        },
    }
    path = tmp_path / "results.md"
    compare.write_markdown(report, path)
    text = path.read_text()
    assert "| CloudLLM Serve | 1 | 55.0 |" in text
    assert "could not run: ImportError: x" in text
    assert "| 1 | 1.100 | +5.0 | 1.000 | 1.000 |" in text
    assert "2.00 Redis round trips per request" in text


def test_concurrencies_go_past_the_batch_size() -> None:
    assert compare.default_concurrencies(16) == [1, 4, 16, 32, 64]
    assert compare.default_concurrencies(2) == [1, 2, 4, 8]
    plan = compare.make_plan(True, ["vllm"], 128, 128, [1, 16, 64])
    assert plan.prompts == {1: 16, 16: 32, 64: 128}


def test_the_saturation_guard_fails_under_the_floor_at_twice_the_batch() -> None:
    def at(concurrency: int, ratio: float) -> dict[int, dict[str, float]]:
        return {concurrency: {"throughput_ratio": ratio}}

    ok, line = compare.saturation_check(at(32, 0.97), 16, 0.85)
    assert ok is True and "0.970" in line and "OK" in line
    ok, line = compare.saturation_check(at(32, 0.63), 16, 0.85)
    assert ok is False and "UNDER" in line and "concurrency 32" in line
    assert compare.saturation_check(at(16, 0.5), 16, 0.85)[0] is None  # 2x not measured


def test_affinity_openings_differ_from_the_first_word_and_report_has_both_runs(
    tmp_path: Path,
) -> None:
    from benchmarks import affinity

    openings = [affinity.opening(i, 50) for i in range(8)]
    assert len({o.split(".")[0] for o in openings}) == 8  # no shared prefix beyond a token
    assert all(len(o.split()) > 50 for o in openings)
    run = {
        "same_replica_as_previous_turn": 1.0,
        "prefix_cache_hit_rate": 0.9,
        "ttft_ms_p50": 40.0,
        "ttft_ms_mean": 41.0,
        "latency_ms_p50": 300.0,
        "latency_ms_mean": 310.0,
    }
    report = {
        "conversations": 8,
        "turns": 5,
        "opening_words": 50,
        "with_affinity": run,
        "without_affinity": {**run, "prefix_cache_hit_rate": 0.6},
    }
    affinity.write_markdown(report, tmp_path / "affinity.md")
    text = (tmp_path / "affinity.md").read_text()
    assert "| prefix-cache hit rate (tokens) | 0.9 | 0.6 |" in text
