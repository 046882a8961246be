"""What the conversation store costs per turn of the seed API.

    python -m benchmarks.conversation_cost --base-url http://127.0.0.1:8001

Runs multi-turn conversations through ``POST /generate`` one request at a time (so
queueing does not blur the numbers), each turn reading the history from Redis and
appending the new turn. Reports the Redis time per turn (``timings.store_ms``, measured
around the store calls in the ingress) as p50/p99, and the Redis round trips per
request (the store's own counter in ``/status/detailed``, before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import urllib.request
from typing import Any


def call_json(url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """GET ``url`` (or POST ``body`` as JSON) and return the JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if os.environ.get("OPENAI_API_KEY"):  # as vllm bench serve sends it (needs an admin key)
        headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
    request = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=120) as response:
        result: dict[str, Any] = json.loads(response.read())
    return result


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def measure(
    base_url: str, conversations: int = 6, turns: int = 6, max_tokens: int = 8
) -> dict[str, Any]:
    """Run the conversations; return the per-turn store cost."""
    status_url = f"{base_url}/status/detailed"
    round_trips_before = call_json(status_url)["redis"]["round_trips"]
    store_ms: list[float] = []
    total_minus_generation_ms: list[float] = []
    for index in range(conversations):
        conversation_id = None
        for turn in range(turns):
            body = call_json(
                f"{base_url}/generate",
                {
                    "message": f"Conversation {index}, turn {turn}: tell me something new.",
                    "conversation_id": conversation_id,
                    "max_tokens": max_tokens,
                    "temperature": 0,
                },
            )
            conversation_id = body["conversation_id"]
            timings = body["model_info"]["timings"]
            store_ms.append(timings["store_ms"])
            total_minus_generation_ms.append(timings["total_ms"] - timings["generation_ms"])
    # the status reads themselves cost two round trips each (PING and ZCARD)
    round_trips = call_json(status_url)["redis"]["round_trips"] - round_trips_before - 2
    requests = conversations * turns
    return {
        "conversations": conversations,
        "turns": requests,
        "store_ms_p50": round(statistics.median(store_ms), 3),
        "store_ms_p99": round(_percentile(store_ms, 0.99), 3),
        "store_ms_mean": round(statistics.fmean(store_ms), 3),
        "round_trips_per_turn": round(round_trips / requests, 3),
        "ingress_ms_beyond_generation_p50": round(statistics.median(total_minus_generation_ms), 3),
    }


def main() -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--base-url", default="http://127.0.0.1:8001")
    parser.add_argument("--conversations", type=int, default=6)
    parser.add_argument("--turns", type=int, default=6)
    args = parser.parse_args()
    print(json.dumps(measure(args.base_url, args.conversations, args.turns), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
