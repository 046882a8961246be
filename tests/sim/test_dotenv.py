"""Settings from a ``.env`` in the directory the app starts in; the environment wins."""

from __future__ import annotations

import requests

from tests.conftest import Stack
from tests.sim.conftest import (
    ENV_FILE_BATCH_INTERVAL_MS,
    SIM_MAX_NUM_SEQS,
    STREAM_BATCH_INTERVAL_MS,
)


def test_the_env_file_reaches_every_replica_and_the_environment_wins(sim_stack: Stack) -> None:
    status = requests.get(f"{sim_stack.base_url}/status/detailed", timeout=30).json()
    assert status["config"]["max_num_seqs"] == SIM_MAX_NUM_SEQS
    replicas = [r for r in status["engine"]["replicas"] if r.get("stats")]
    assert replicas and all(r["stats"]["max_num_seqs"] == SIM_MAX_NUM_SEQS for r in replicas)
    assert STREAM_BATCH_INTERVAL_MS != ENV_FILE_BATCH_INTERVAL_MS
    assert status["config"]["stream_batch_interval_ms"] == STREAM_BATCH_INTERVAL_MS
