"""Autoscaling and routing at scale on the simulated engine: up to 16 engine replicas.

    python -m benchmarks.scale        # or: make bench-scale  (about 12 minutes on 2 cores)

1. **The ramp.** Our app (``make serve``'s launcher, CPU profile) on ``LLM_MODEL=sim``
   with 1 to :data:`MAX_REPLICAS` engine replicas, each taking ``SIM_STARTUP_S`` to start
   and :data:`BATCH` sequences at once (one replica's worth of demand), each reserving
   ``SIM_REPLICA_CPUS`` (0.1) so that 16 fit on 2 cores. Clients keep a number of
   streaming chat completions (``/v1``, :mod:`benchmarks.loadgen`'s bodies) in flight
   that ramps from 1 replica's worth to 16 and back (:data:`RAMP`). Sampled every
   :data:`SAMPLE_S`: running and target replicas from ``/status/detailed``. Reported:
   time to scale up, requests refused (503 with ``Retry-After``, when) and failed
   (anything else, or a stream without ``[DONE]``: a request lost when a replica is
   removed would be one).
2. **Routing at 16 replicas.** Two more stacks of 16 replicas, conversation-affinity
   routing on and off (power of two choices), each playing the same multi-turn
   workload through ``/generate`` twice: many conversations alike, then a few hot ones
   taking most turns. Reported: the simulated prefix cache's hit rate, engine TTFT
   p50/p99, and the busiest replica's share of requests against the mean.

Results: ``benchmarks/results/scale.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.affinity import cache_counters, opening
from benchmarks.ceiling import OurStack
from benchmarks.compare import say
from benchmarks.conversation_cost import call_json
from benchmarks.loadgen import CONTENT_MARKERS, DONE_MARKER, chat_url, request_body

RESULTS = Path(__file__).resolve().parent / "results"
MAX_REPLICAS = 16
#: Sequences one simulated replica runs at once: one replica's worth of demand.
BATCH = 4
#: (seconds from the start, replicas' worth of demand); linear in between.
RAMP = [(0, 1), (150, 16), (240, 16), (300, 1), (390, 1)]
SAMPLE_S = 2.0
#: Each answer: MAX_TOKENS decode steps of SIM_STEP_MS (about 2 s).
MAX_TOKENS = 20
SIM = {
    "LLM_MODEL": "sim",
    "SIM_TTFT_MS": "100",
    "SIM_TTFT_MS_PER_TOKEN": "0.5",
    "SIM_STEP_MS": "100",
    "SIM_STEP_MS_PER_SEQ": "0",
    "SIM_REPLICA_CPUS": "0.1",
    "VLLM_MAX_NUM_SEQS": str(BATCH),
    "ENGINE_MAX_REPLICAS": str(MAX_REPLICAS),
    "ENGINE_MAX_QUEUED_REQUESTS": "256",
    "STREAM_BATCH_INTERVAL_MS": "0",
    "ENGINE_GRACEFUL_SHUTDOWN_S": "30",
    "REQUEST_TIMEOUT_S": "120",
}
#: The ramp's autoscaling: start-up of SIM_STARTUP_S, quick decisions.
RAMP_ENV = {
    "SIM_STARTUP_S": "10",
    "ENGINE_MIN_REPLICAS": "1",
    "ENGINE_UPSCALE_DELAY_S": "3",
    "ENGINE_DOWNSCALE_DELAY_S": "20",
    "ENGINE_AUTOSCALING_LOOK_BACK_S": "4",
}


def demand_at(elapsed_s: float) -> float:
    """Replicas' worth of demand :data:`RAMP` asks for at ``elapsed_s``."""
    for (t0, d0), (t1, d1) in itertools.pairwise(RAMP):
        if t0 <= elapsed_s < t1:
            return d0 + (d1 - d0) * (elapsed_s - t0) / (t1 - t0)
    return float(RAMP[-1][1])


@dataclass
class Outcome:
    """One request of the ramp."""

    sent_s: float
    took_s: float
    status: int
    ttft_s: float | None = None
    retry_after: str | None = None
    error: str | None = None


async def stream_one(session: aiohttp.ClientSession, url: str, body: bytes, t0: float) -> Outcome:
    """One streaming chat completion, read to ``[DONE]``."""
    sent = time.monotonic()
    outcome = Outcome(sent_s=sent - t0, took_s=0.0, status=0)
    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
            outcome.status = r.status
            if r.status != 200:
                outcome.retry_after = r.headers.get("Retry-After")
                outcome.error = (await r.text())[:200]
            else:
                tail = b""
                async for data in r.content.iter_any():
                    if outcome.ttft_s is None and any(m in data for m in CONTENT_MARKERS):
                        outcome.ttft_s = time.monotonic() - sent
                    tail = (tail + data)[-64:]
                if DONE_MARKER not in tail:
                    outcome.error = "stream ended without [DONE]"
    except Exception as error:
        outcome.error = f"{type(error).__name__}: {error}"[:200]
    outcome.took_s = time.monotonic() - sent
    return outcome


async def ramp_load(base_url: str, outcomes: list[Outcome], t0: float) -> None:
    """Keep ``demand_at(t) x BATCH`` requests in flight until the ramp ends."""
    url = chat_url(base_url)
    end = RAMP[-1][0]
    counter = iter(range(10**9))

    async def client(number: int, session: aiohttp.ClientSession) -> None:
        while (elapsed := time.monotonic() - t0) < end:
            if number >= round(demand_at(elapsed) * BATCH):
                await asyncio.sleep(0.25)
                continue
            body = request_body(next(counter), "sim", MAX_TOKENS, 16, "s")
            outcome = await stream_one(session, url, body, t0)
            outcomes.append(outcome)
            if outcome.status == 503:
                await asyncio.sleep(min(5.0, float(outcome.retry_after or 1)))

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=180)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(n, session) for n in range(MAX_REPLICAS * BATCH)))


def replicas(base_url: str) -> tuple[int, int | None]:
    """Running and target engine replicas."""
    deployment = call_json(f"{base_url}/status/detailed")["engine"]["deployment"]
    return int(deployment["running_replicas"]), deployment["target_replicas"]


def sample(base_url: str, t0: float, stop: threading.Event, samples: list[dict[str, Any]]) -> None:
    """Every :data:`SAMPLE_S`: demand, running and target replicas."""
    while not stop.wait(SAMPLE_S):
        elapsed = time.monotonic() - t0
        try:
            running, target = replicas(base_url)
        except Exception:
            continue
        samples.append(
            {
                "t": round(elapsed, 1),
                "demand": round(demand_at(elapsed), 2),
                "running": running,
                "target": target,
            }
        )


def start_stack(name: str, env: dict[str, str], log_dir: Path, replicas_wanted: int) -> OurStack:
    """Our stack with ``env``, once ``replicas_wanted`` engine replicas run."""
    stack = OurStack(name, log_dir, {**SIM, **env})
    say(f"starting {name}")
    stack.start()
    try:
        stack.wait_ready()
        deadline = time.monotonic() + 600
        while replicas(stack.base_url)[0] < replicas_wanted:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: {replicas_wanted} replicas did not start")
            time.sleep(2)
    except BaseException:
        stack.stop()
        raise
    return stack


def run_ramp(log_dir: Path) -> dict[str, Any]:
    """Part 1: the ramp on 1 to 16 replicas."""
    stack = start_stack("ramp", RAMP_ENV, log_dir, 1)
    outcomes: list[Outcome] = []
    samples: list[dict[str, Any]] = []
    try:
        t0 = time.monotonic()
        stop = threading.Event()
        sampler = threading.Thread(target=sample, args=(stack.base_url, t0, stop, samples))
        sampler.start()
        say(f"ramp: 1 to {MAX_REPLICAS} replicas' worth of demand and back, {RAMP[-1][0]} s")
        asyncio.run(ramp_load(stack.base_url, outcomes, t0))
        stop.set()
        sampler.join()
    finally:
        stack.stop()
    return summarize_ramp(outcomes, samples)


def _first(samples: list[dict[str, Any]], test: Any) -> float | None:
    return next((s["t"] for s in samples if test(s)), None)


def summarize_ramp(outcomes: list[Outcome], samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Scale-up times, refusals and failures of the ramp."""
    peak_at = next(t for t, d in RAMP if d == MAX_REPLICAS)
    all_running = _first(samples, lambda s: s["running"] >= MAX_REPLICAS)
    first_added = _first(samples, lambda s: s["running"] >= 2)
    above_one = _first(samples, lambda s: s["demand"] > 1.0)
    refused = [o for o in outcomes if o.status == 503]
    failed = [o for o in outcomes if o.status not in (200, 503) or (o.status == 200 and o.error)]
    ok = [o for o in outcomes if o.status == 200 and not o.error]
    ttft = sorted(o.ttft_s for o in ok if o.ttft_s is not None)
    return {
        "ramp": RAMP,
        "batch_per_replica": BATCH,
        "sim": SIM,
        "autoscaling": RAMP_ENV,
        "requests": len(outcomes),
        "ok": len(ok),
        "refused": len(refused),
        "refused_with_retry_after": sum(1 for o in refused if o.retry_after),
        "refused_at_s": [round(o.sent_s, 1) for o in refused][:200],
        "failed": len(failed),
        "failed_examples": sorted({o.error or str(o.status) for o in failed})[:5],
        "first_replica_added_s": round(first_added - above_one, 1)
        if first_added is not None and above_one is not None
        else None,
        "all_replicas_running_s_after_peak_demand": round(all_running - peak_at, 1)
        if all_running is not None
        else None,
        "max_running": max((s["running"] for s in samples), default=0),
        "ttft_ms_p50": round(1000 * statistics.median(ttft), 1) if ttft else None,
        "ttft_ms_p99": round(1000 * ttft[int(0.99 * (len(ttft) - 1))], 1) if ttft else None,
        "samples": samples,
    }


def workload(kind: str, conversations: int, turns: int, seed: int = 7) -> list[int]:
    """The order of turns: conversation indices (``hot``: 8 conversations take half)."""
    rng = random.Random(seed)
    if kind == "uniform":
        order = [c for _ in range(turns) for c in rng.sample(range(conversations), conversations)]
        return order
    total = conversations * turns
    hot = list(range(8))
    order = []
    for _ in range(total):
        order.append(rng.choice(hot) if rng.random() < 0.5 else rng.randrange(8, conversations))
    return order


def play(base_url: str, order: list[int], workers: int = 16) -> dict[str, Any]:
    """Play the turns in ``order``, ``workers`` at a time, a conversation's turns in order."""
    ids: dict[int, str] = {}
    locks = {c: threading.Lock() for c in set(order)}
    served: Counter[str] = Counter()
    ttft: list[float] = []
    errors: list[str] = []
    queries_before, hits_before = cache_counters(base_url)

    def turn(conversation: int) -> None:
        with locks[conversation]:
            first = conversation not in ids
            body: dict[str, Any] = {
                "message": opening(conversation, 120) if first else "And then? One word.",
                "max_tokens": 8,
                "temperature": 0,
            }
            if not first:
                body["conversation_id"] = ids[conversation]
            try:
                answer = call_json(f"{base_url}/generate", body)
            except Exception as error:
                errors.append(str(error)[:200])
                return
            ids[conversation] = answer["conversation_id"]
            timings = answer["model_info"]["timings"]
            served[timings["engine_replica"]] += 1
            if not first:
                ttft.append(timings["ttft_ms"])

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(turn, order))
    queries_after, hits_after = cache_counters(base_url)
    queries, hits = queries_after - queries_before, hits_after - hits_before
    total = sum(served.values())
    mean = total / MAX_REPLICAS
    ttft.sort()
    return {
        "requests": total,
        "errors": len(errors),
        "prefix_cache_hit_rate": round(hits / queries, 3) if queries else None,
        "ttft_ms_p50": round(statistics.median(ttft), 1) if ttft else None,
        "ttft_ms_p99": round(ttft[int(0.99 * (len(ttft) - 1))], 1) if ttft else None,
        "replicas_used": len(served),
        "busiest_share": round(max(served.values()) / total, 3) if total else None,
        "busiest_over_mean": round(max(served.values()) / mean, 2) if total else None,
    }


def run_routing(log_dir: Path, conversations: int, turns: int) -> dict[str, Any]:
    """Part 2: affinity vs power of two choices at 16 replicas, two workloads each."""
    results: dict[str, Any] = {}
    for affinity in (True, False):
        name = "affinity" if affinity else "power_of_two"
        env = {
            "ENGINE_MIN_REPLICAS": str(MAX_REPLICAS),
            "ROUTING_AFFINITY": "true" if affinity else "false",
            "SIM_TTFT_MS": "20",
            "SIM_STEP_MS": "20",
        }
        stack = start_stack(f"routing-{name}", env, log_dir, MAX_REPLICAS)
        try:
            results[name] = {
                kind: play(stack.base_url, workload(kind, conversations, turns))
                for kind in ("uniform", "hot")
            }
            say(f"routing {name}: {json.dumps(results[name])}")
        finally:
            stack.stop()
    return results


def write_plot(ramp: dict[str, Any], path: Path) -> None:
    """Replicas (running, target) and demand over time, refusals marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = ramp["samples"]
    t = [s["t"] for s in samples]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(t, [s["demand"] for s in samples], label="demand (replicas' worth)", color="grey")
    ax.step(t, [s["target"] for s in samples], where="post", label="target replicas", ls="--")
    ax.step(t, [s["running"] for s in samples], where="post", label="running replicas")
    if ramp["refused_at_s"]:
        ax.plot(
            ramp["refused_at_s"],
            [0.3] * len(ramp["refused_at_s"]),
            "x",
            color="red",
            label=f"refused (503 + Retry-After): {ramp['refused']}",
        )
    ax.set_xlabel("seconds")
    ax.set_ylabel("engine replicas")
    ax.set_title(
        f"Autoscaling 1-{MAX_REPLICAS} simulated replicas (start-up "
        f"{RAMP_ENV['SIM_STARTUP_S']} s): {ramp['ok']} ok, {ramp['failed']} failed"
    )
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_markdown(report: dict[str, Any], path: Path) -> None:
    """The summary table of both parts."""
    ramp = report["ramp"]
    lines = [
        "# make bench-scale",
        "",
        f"Simulated engine, {BATCH} sequences per replica, start-up "
        f"{RAMP_ENV['SIM_STARTUP_S']} s; 2-core machine; run took {report['took_s']:.0f} s.",
        "",
        "## Autoscaling ramp (1 to 16 replicas' worth of demand and back)",
        "",
        "| requests | ok | refused (503, all with Retry-After?) | failed | first replica added "
        "after demand > 1 | all 16 running after peak demand | TTFT p50 / p99 ms |",
        "|---|---|---|---|---|---|---|",
        f"| {ramp['requests']} | {ramp['ok']} | {ramp['refused']} "
        f"({ramp['refused_with_retry_after'] == ramp['refused']}) | {ramp['failed']} | "
        f"{ramp['first_replica_added_s']} s | {ramp['all_replicas_running_s_after_peak_demand']} s "
        f"| {ramp['ttft_ms_p50']} / {ramp['ttft_ms_p99']} |",
        "",
        f"Autoscaling settings: {json.dumps(RAMP_ENV)}. Plot: scale.png.",
        "",
        "## Routing at 16 replicas (multi-turn conversations, /generate)",
        "",
        "| router | workload | prefix-cache hit rate | TTFT p50 ms | TTFT p99 ms | "
        "busiest replica's share | busiest / mean | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for router, runs in report["routing"].items():
        for kind, r in runs.items():
            lines.append(
                f"| {router} | {kind} | {r['prefix_cache_hit_rate']} | {r['ttft_ms_p50']} | "
                f"{r['ttft_ms_p99']} | {r['busiest_share']} | {r['busiest_over_mean']} | "
                f"{r['errors']} |"
            )
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=64)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--skip-ramp", action="store_true")
    parser.add_argument("--skip-routing", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run both parts; write the results."""
    args = parse_args(argv)
    started = time.monotonic()
    log_dir = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    ramp = {} if args.skip_ramp else run_ramp(log_dir)
    if ramp:
        say(f"ramp: {json.dumps({k: v for k, v in ramp.items() if k != 'samples'})[:1500]}")
    routing = {} if args.skip_routing else run_routing(log_dir, args.conversations, args.turns)
    report = {"took_s": round(time.monotonic() - started, 1), "ramp": ramp, "routing": routing}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(report, indent=2))
    if ramp and routing:
        write_markdown(report, args.out / "scale.md")
    if ramp:
        write_plot(ramp, args.out / "scale.png")
    say(f"done in {report['took_s']:.0f} s: {args.out / 'scale.md'}")
    return 0 if not ramp or ramp["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
