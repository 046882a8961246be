"""Conversation-affinity routing, measured: 2 engine replicas, with affinity and without.

    python -m benchmarks.affinity            # or: make bench-affinity

Starts our app twice, one run after the other, each time with 2 engine replicas
(``ENGINE_MIN_REPLICAS=ENGINE_MAX_REPLICAS=2``) and ``ROUTING_AFFINITY`` on, then off.
Both runs play the same multi-turn conversations through ``POST /generate``, the
conversations taking turns (turn 1 of every conversation, then turn 2, ...), so each
replica's prefix cache holds many conversations. Each conversation opens with a long
shared-nothing context (a few hundred tokens), which later turns reuse only if they
reach the replica that has it cached.

Reported per run, over turns 2 and later: vLLM's prefix-cache hit rate (tokens found
in the cache / prompt tokens looked up, summed over both replicas from
``/status/detailed``), engine TTFT p50/mean (``timings.ttft_ms``), client-side
latency, and how often a turn reached the same replica as the previous turn.
Results go to ``benchmarks/results/affinity.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.compare import CloudLLM, say
from benchmarks.conversation_cost import call_json
from cloudllm_serve.settings import load_settings

RESULTS = Path(__file__).resolve().parent / "results"

WORDS = [
    *[
        "river",
        "mountain",
        "lantern",
        "copper",
        "orchard",
        "signal",
        "harbor",
        "velvet",
        "meadow",
        "engine",
        "quartz",
    ],
    *[
        "falcon",
        "ribbon",
        "glacier",
        "thunder",
        "saddle",
        "marble",
        "pepper",
        "canyon",
        "willow",
        "beacon",
        "timber",
    ],
]


def opening(index: int, words: int) -> str:
    """A long first message, different for every conversation from its first token."""
    body = " ".join(WORDS[(index * 7 + i * 5) % len(WORDS)] for i in range(words))
    return f"Conversation {index}. Remember these words: {body}. Reply with one word."


def cache_counters(base_url: str) -> tuple[int, int]:
    """(prompt tokens looked up, tokens found) summed over the running engine replicas."""
    replicas = call_json(f"{base_url}/status/detailed")["engine"]["replicas"]
    stats = [r["stats"] for r in replicas if r["state"] == "RUNNING" and r["stats"]]
    return sum(s["prefix_cache_queries"] for s in stats), sum(s["prefix_cache_hits"] for s in stats)


def play(base_url: str, conversations: int, turns: int, opening_words: int) -> dict[str, Any]:
    """Run the conversations; measure turns 2 and later."""
    ids: list[str | None] = [None] * conversations
    last_replica: list[str | None] = [None] * conversations
    ttft: list[float] = []
    latency: list[float] = []
    same = 0
    later = 0
    for turn in range(turns):
        if turn == 1:
            queries_before, hits_before = cache_counters(base_url)
        for index in range(conversations):
            message = opening(index, opening_words) if turn == 0 else f"Turn {turn}: one word?"
            body: dict[str, Any] = {"message": message, "max_tokens": 16, "temperature": 0}
            if ids[index] is not None:
                body["conversation_id"] = ids[index]
            started = time.perf_counter()
            answer = call_json(f"{base_url}/generate", body)
            elapsed_ms = (time.perf_counter() - started) * 1000
            timings = answer["model_info"]["timings"]
            ids[index] = answer["conversation_id"]
            if turn > 0:
                later += 1
                same += timings["engine_replica"] == last_replica[index]
                ttft.append(timings["ttft_ms"])
                latency.append(elapsed_ms)
            last_replica[index] = timings["engine_replica"]
    queries_after, hits_after = cache_counters(base_url)
    queries = queries_after - queries_before
    hits = hits_after - hits_before
    return {
        "later_turns": later,
        "same_replica_as_previous_turn": round(same / later, 3),
        "prefix_cache_queries": queries,
        "prefix_cache_hits": hits,
        "prefix_cache_hit_rate": round(hits / queries, 3) if queries else None,
        "ttft_ms_p50": round(statistics.median(ttft), 1),
        "ttft_ms_mean": round(statistics.fmean(ttft), 1),
        "latency_ms_p50": round(statistics.median(latency), 1),
        "latency_ms_mean": round(statistics.fmean(latency), 1),
    }


def run(affinity: bool, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """One stack with 2 engine replicas; the conversations; the stack stopped."""
    server = CloudLLM(f"affinity-{'on' if affinity else 'off'}", load_settings(), log_dir)
    server.env.update(
        {
            "ENGINE_MIN_REPLICAS": "2",
            "ENGINE_MAX_REPLICAS": "2",
            "ROUTING_AFFINITY": "true" if affinity else "false",
        }
    )
    say(f"starting our app with 2 engine replicas, ROUTING_AFFINITY={affinity}")
    server.start()
    try:
        ready_s = server.wait_ready()
        # /health answers once one replica runs; wait for both.
        while (
            call_json(f"{server.base_url}/status/detailed")["engine"]["deployment"][
                "running_replicas"
            ]
            < 2
        ):
            time.sleep(1)
        say(f"ready after {ready_s:.0f} s; playing {args.conversations}x{args.turns} turns")
        return play(server.base_url, args.conversations, args.turns, args.opening_words)
    finally:
        server.stop()


def write_markdown(report: dict[str, Any], path: Path) -> None:
    """The two runs side by side."""
    on, off = report["with_affinity"], report["without_affinity"]
    rows = [
        ("turn reached the previous turn's replica", "same_replica_as_previous_turn"),
        ("prefix-cache hit rate (tokens)", "prefix_cache_hit_rate"),
        ("engine TTFT p50 (ms)", "ttft_ms_p50"),
        ("engine TTFT mean (ms)", "ttft_ms_mean"),
        ("client latency p50 (ms)", "latency_ms_p50"),
        ("client latency mean (ms)", "latency_ms_mean"),
    ]
    lines = [
        "# Conversation-affinity routing: 2 engine replicas, with and without",
        "",
        f"{report['conversations']} conversations x {report['turns']} turns, taking turns; "
        f"an opening of {report['opening_words']} words; 16 new tokens per turn; "
        "measured over turns 2 and later. `python -m benchmarks.affinity`.",
        "",
        "| | with affinity | without |",
        "|---|---|---|",
        *(f"| {label} | {on[key]} | {off[key]} |" for label, key in rows),
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--opening-words", type=int, default=220)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cloudllm-affinity-") as temp:
        with_affinity = run(True, args, Path(temp))
        without_affinity = run(False, args, Path(temp))
    report = {
        "conversations": args.conversations,
        "turns": args.turns,
        "opening_words": args.opening_words,
        "with_affinity": with_affinity,
        "without_affinity": without_affinity,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "affinity.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, args.out / "affinity.md")
    print((args.out / "affinity.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
