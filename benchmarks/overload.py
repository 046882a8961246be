"""Issue 31's overload acceptance: N concurrent ``/generate`` against a running service.

    python -m benchmarks.overload --url http://127.0.0.1:8000 -n 96 --max-tokens 96

First a warm-up of ``--warm`` concurrent requests (default: two per batch slot of the
running engines, from ``/status/detailed``) so the deadline admission has measured the
engines at full load, then the flood. Prints each status's count, the refusals'
``Retry-After`` and time to refusal, any 504, and the check: the 200s against what the
engines can finish in ``REQUEST_TIMEOUT_S`` (their tokens/s measured over the flood x
the timeout / tokens per answer). Exit status 1 when an answer is not a 200 or a
503/429 with ``Retry-After`` within 5 s, or the 200s are under 80 % of that.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections import Counter
from typing import Any

import httpx

#: A refusal must come this soon after its request (issue 31's acceptance).
REFUSAL_WITHIN_S = 5.0


def answer_token_count(body: dict[str, Any]) -> int:
    """Tokens of one ``/generate`` answer (its ``model_info.timings``)."""
    timings = body.get("model_info", {}).get("timings") or body.get("timings") or {}
    return int(timings.get("tokens_generated", 0))


async def fire(
    url: str, count: int, max_tokens: int, timeout_s: float
) -> list[tuple[int, float, dict[str, str], dict[str, Any] | None]]:
    """``count`` concurrent ``/generate``: (status, seconds, headers, JSON body) each."""
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout_s) as client:

        async def one(index: int) -> tuple[int, float, dict[str, str], dict[str, Any] | None]:
            started = time.perf_counter()
            response = await client.post(
                "/generate",
                json={
                    "message": f"Tell me a long story, number {index}.",
                    "max_tokens": max_tokens,
                },
            )
            took = time.perf_counter() - started
            try:
                body = response.json()
            except ValueError:
                body = None
            return response.status_code, took, dict(response.headers), body

        return await asyncio.gather(*(one(i) for i in range(count)))


def engine_tokens(detailed: dict[str, Any]) -> int:
    """Tokens generated so far, summed over the running engine replicas."""
    replicas = detailed["engine"]["replicas"]
    return sum(int(r["stats"]["tokens_generated"]) for r in replicas if r.get("stats"))


def status(url: str) -> dict[str, Any]:
    """``/status/detailed``."""
    answer: dict[str, Any] = httpx.get(f"{url}/status/detailed", timeout=30).json()
    return answer


def main(argv: list[str] | None = None) -> int:
    """Run the warm-up and the flood; print the figures; 0 when the acceptance holds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("-n", "--requests", type=int, default=96)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--warm", type=int, default=None, help="warm-up requests (0: none)")
    args = parser.parse_args(argv)

    before = status(args.url)
    timeout_s = float(before["scaling"]["request_timeout_s"])
    slots = int(before["admission"]["batch_slots"]) or int(before["config"]["max_num_seqs"])
    warm = 2 * slots if args.warm is None else args.warm
    if warm:
        print(f"warm-up: {warm} concurrent requests ...", flush=True)
        results = asyncio.run(fire(args.url, warm, args.max_tokens, timeout_s * 2))
        print(f"warm-up: {Counter(r[0] for r in results)}")
    tokens_before = engine_tokens(status(args.url))
    started = time.perf_counter()
    print(f"flood: {args.requests} concurrent /generate, max_tokens {args.max_tokens} ...")
    results = asyncio.run(fire(args.url, args.requests, args.max_tokens, timeout_s * 2))
    elapsed = time.perf_counter() - started
    after = status(args.url)
    tokens = engine_tokens(after) - tokens_before
    tokens_per_s = tokens / elapsed

    statuses = Counter(r[0] for r in results)
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] in (429, 503)]
    answer_tokens = (
        statistics.mean(answer_token_count(r[3]) for r in ok if r[3]) if ok else args.max_tokens
    )
    # What the engines could finish in the timeout, and no more than were sent.
    in_time = min(tokens_per_s * timeout_s / answer_tokens, float(args.requests))
    print(f"statuses: {dict(statuses)} in {elapsed:.1f} s")
    if refused:
        waits = sorted(r[1] for r in refused)
        retry = Counter(r[2].get("retry-after") for r in refused)
        print(
            f"refusals: time to refusal median {statistics.median(waits):.2f} s, "
            f"max {waits[-1]:.2f} s; Retry-After {dict(retry)}"
        )
        print(f"  e.g. {refused[0][3]}")
    if ok:
        print(
            f"200s: median {statistics.median(r[1] for r in ok):.1f} s, {answer_tokens:.0f} tokens"
        )
    print(
        f"engine: {tokens_per_s:.1f} tokens/s over the flood x {timeout_s:g} s / "
        f"{answer_tokens:.0f} tokens: {in_time:.1f} answers fit (at most those sent); "
        f"{len(ok)} given "
        f"({len(ok) / in_time:.0%})"
        if in_time
        else "engine: no tokens measured"
    )
    bad = [
        r
        for r in results
        if not (
            r[0] == 200
            or (r[0] in (429, 503) and "retry-after" in r[2] and r[1] <= REFUSAL_WITHIN_S)
        )
    ]
    passed = not bad and (not in_time or len(ok) >= 0.8 * in_time)
    print("acceptance:", "PASSED" if passed else f"FAILED ({len(bad)} answers out of bounds)")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
