"""A flood the simulated engine cannot finish in time: refused at once, never a 504.

500 concurrent ``/generate`` requests of 100 tokens against the sim stack's two simulated
engines of 17 batch slots at 40 ms a step (~850 tokens/s, so ~170 answers in
``REQUEST_TIMEOUT_S``):
every answer is a 200, or a 503 with ``Retry-After`` given well before the timeout
and naming the deadline (at admission, or, when the engines slowed after it, while the
request waited to start); and the 200s are at least 80 % of what the engine finished
per second in the same run times the timeout. Ratios only: machines differ 10x.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from typing import Any

import httpx
import requests

from tests.conftest import Stack
from tests.sim.conftest import REQUEST_TIMEOUT_S, SIM_MAX_NUM_SEQS

FLOOD = 500
MAX_TOKENS = 100
SLOTS = 2 * SIM_MAX_NUM_SEQS  # two engine replicas of VLLM_MAX_NUM_SEQS


def engine_tokens(stack: Stack) -> int:
    status = requests.get(f"{stack.base_url}/status/detailed", timeout=30).json()
    replicas = status["engine"]["replicas"]
    return sum(int(r["stats"]["tokens_generated"]) for r in replicas if r.get("stats"))


async def fire(stack: Stack, count: int) -> list[tuple[int, float, dict[str, str], str]]:
    """``count`` concurrent ``/generate`` calls: (status, seconds, headers, body) each."""
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S * 3)
    async with httpx.AsyncClient(base_url=stack.base_url, limits=limits, timeout=timeout) as c:

        async def one(index: int) -> tuple[int, float, dict[str, str], str]:
            started = time.perf_counter()
            response = await c.post(
                "/generate", json={"message": f"flood {index}", "max_tokens": MAX_TOKENS}
            )
            took = time.perf_counter() - started
            return response.status_code, took, dict(response.headers), response.text

        return await asyncio.gather(*(one(i) for i in range(count)))


def test_a_flood_is_refused_at_once_by_the_deadline(sim_stack: Stack) -> None:
    # A full batch first, so the admission has measured the engine at full load.
    warm = asyncio.run(fire(sim_stack, 2 * SLOTS))
    assert all(status == 200 for status, *_ in warm), Counter(s for s, *_ in warm)

    before = engine_tokens(sim_stack)
    started = time.perf_counter()
    answers = asyncio.run(fire(sim_stack, FLOOD))
    elapsed = time.perf_counter() - started
    tokens_per_s = (engine_tokens(sim_stack) - before) / elapsed

    statuses = Counter(status for status, *_ in answers)
    refused: list[Any] = [a for a in answers if a[0] == 503]
    # Refused at admission, or later, before starting, because the engines slowed after
    # the admission (make test's vLLM stack beside this one takes the CPU in bursts).
    late = sorted(took for _, took, _, body in refused if "has not started" in body)
    waits = sorted(took for _, took, _, body in refused if "has not started" not in body)
    in_time = tokens_per_s * REQUEST_TIMEOUT_S / MAX_TOKENS
    answered = sorted(took for status, took, *_ in answers if status == 200) or [0.0]
    print(
        f"\n{statuses}, engine {tokens_per_s:.0f} tokens/s over {elapsed:.1f} s: "
        f"{in_time:.0f} answers fit in {REQUEST_TIMEOUT_S} s, {statuses[200]} given, the "
        f"last after {answered[-1]:.1f} s; refused at admission after "
        f"{statistics.median(waits or [0]):.2f} s (median), {max(waits or [0]):.2f} s (max); "
        f"{len(late)} refused later, before starting, after {max(late or [0]):.2f} s at most"
    )
    assert set(statuses) <= {200, 503}, statuses  # never a 504
    assert waits, statuses
    for _, _, headers, _ in refused:
        assert int(headers["retry-after"]) >= 1
    # The refusals are the deadline admission's. Others seen here: an admitted request's
    # Redis write refused under the flood ("Too many connections"), a few in 500.
    others = [body for *_, body in refused if "REQUEST_TIMEOUT_S" not in body]
    assert len(others) <= len(answers) // 50, others
    # 500 connections opened at once on 2 cores: the first refusals wait for the accepts.
    assert statistics.median(waits) < REQUEST_TIMEOUT_S / 4 and waits[-1] < REQUEST_TIMEOUT_S / 2
    # A late refusal still comes before the timeout would have.
    assert all(took < REQUEST_TIMEOUT_S for took in late), late
    # At least 80 % of what the engines finished per second in this run, times the timeout
    # (measured here: 89 %, from 67 % before answers were bounded by their max_tokens).
    assert statuses[200] >= 0.8 * in_time
    metrics = requests.get(f"{sim_stack.base_url}/status/detailed", timeout=30).json()
    assert metrics["admission"]["seconds_per_token_full_batch"] is not None
