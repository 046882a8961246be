"""The stack on the simulated engine (``LLM_MODEL=sim``), with a long coalescing interval.

The simulated engine's times are set so that what the serving layer adds stands out: a
first token 300 ms after a request is scheduled, then one every 40 ms. Stream batches
are gathered for up to 1 s (``STREAM_BATCH_INTERVAL_MS=1000``), so a stream's later
tokens arrive together while its first must still come at once.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import Stack, running_stack
from tests.support import RedisServer

SIM_TTFT_MS = 300
SIM_STEP_MS = 40
STREAM_BATCH_INTERVAL_MS = 1000


@pytest.fixture(scope="session")
def sim_stack(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The service as ``LLM_MODEL=sim make serve`` runs it, with the times above."""
    with running_stack(
        redis_server,
        tmp_path_factory.mktemp("sim-stack"),
        {
            "LLM_MODEL": "sim",
            "SIM_TTFT_MS": str(SIM_TTFT_MS),
            "SIM_TTFT_MS_PER_TOKEN": "0",
            "SIM_STEP_MS": str(SIM_STEP_MS),
            "SIM_STEP_MS_PER_SEQ": "0",
            "STREAM_BATCH_INTERVAL_MS": str(STREAM_BATCH_INTERVAL_MS),
        },
    ) as stack:
        yield stack
