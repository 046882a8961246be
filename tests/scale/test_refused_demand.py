"""A flood that deadline admission refuses still adds an engine replica (simulated engine).

Serve's default policy scales on the requests it holds; refused ones never reach it. Here
one engine replica of 4 slots answers in ~4 s and ``REQUEST_TIMEOUT_S`` is 6 s, so only
the 4 that start at once are admitted: the engines' own requests in flight never exceed
one replica's target. The second replica (``ENGINE_MAX_REPLICAS=2``) comes only from the
refusals the ingress reports (``cloudllm_serve.autoscaling``). Measured without the
policy in the config, the same flood left one replica (docs/deployment.md).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import Stack, running_stack
from tests.support import RedisServer, wait_for

SLOTS = 4
MAX_TOKENS = 80  # 4 s at 50 ms a step
FLOOD = 60


@pytest.fixture(scope="module")
def one_engine(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("refused-demand")
    env = {
        "LLM_MODEL": "sim",
        "SIM_TTFT_MS": "20",
        "SIM_TTFT_MS_PER_TOKEN": "0",
        "SIM_STEP_MS": "50",
        "SIM_STEP_MS_PER_SEQ": "0",
        "SIM_REPLICA_CPUS": "0.25",
        "VLLM_MAX_NUM_SEQS": str(SLOTS),
        "REQUEST_TIMEOUT_S": "6",
        "ENGINE_MIN_REPLICAS": "1",
        "ENGINE_MAX_REPLICAS": "2",
        "ENGINE_UPSCALE_DELAY_S": "1",
        # The refusals are the deadline's, not the count bound's.
        "ENGINE_MAX_QUEUED_REQUESTS": "2000",
    }
    with running_stack(redis_server, folder, env) as stack:
        yield stack


def generate(stack: Stack, index: int) -> int:
    body = {"message": f"demand {index}", "max_tokens": MAX_TOKENS}
    return requests.post(f"{stack.base_url}/generate", json=body, timeout=60).status_code


def engine_replicas(stack: Stack) -> list[str]:
    status = requests.get(f"{stack.base_url}/status/detailed", timeout=30).json()
    return [replica["state"] for replica in status["engine"]["replicas"]]


def test_a_refused_flood_adds_the_second_engine_replica(one_engine: Stack) -> None:
    # A full batch first: the admission measures the engine at full load.
    with ThreadPoolExecutor(SLOTS) as pool:
        assert list(pool.map(lambda i: generate(one_engine, i), range(SLOTS))) == [200] * SLOTS
    assert len(engine_replicas(one_engine)) == 1
    with ThreadPoolExecutor(FLOOD) as pool:
        statuses = Counter(pool.map(lambda i: generate(one_engine, i), range(FLOOD)))
    assert set(statuses) <= {200, 503} and statuses[503] >= FLOOD // 2, statuses

    def two_or_more() -> list[str] | None:
        replicas = engine_replicas(one_engine)
        return replicas if len(replicas) >= 2 else None

    replicas = wait_for(two_or_more, 40, 1)
    print(f"\n{dict(statuses)}; engine replicas then: {replicas}")
