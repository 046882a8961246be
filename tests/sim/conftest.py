"""The stack on the simulated engine (``LLM_MODEL=sim``), with a long coalescing interval.

The simulated engine's times are set so that what the serving layer adds stands out: a
first token 300 ms after a request is scheduled, then one every 40 ms. Stream batches
are gathered for up to 1 s (``STREAM_BATCH_INTERVAL_MS=1000``), so a stream's later
tokens arrive together while its first must still come at once. Two engine replicas, so
that a stream whose replica dies can go on on the other (``test_stream_resume``, last).

It starts in a folder of its own whose ``.env`` sets ``VLLM_MAX_NUM_SEQS`` (one slot more
than the default, so the file is seen) and ``STREAM_BATCH_INTERVAL_MS``, which the
environment sets too and wins (``test_dotenv.py``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import Stack, running_stack
from tests.support import RedisServer

SIM_TTFT_MS = 300
SIM_STEP_MS = 40
STREAM_BATCH_INTERVAL_MS = 1000
REQUEST_TIMEOUT_S = 20
#: ``VLLM_MAX_NUM_SEQS`` from the stack's ``.env`` only.
SIM_MAX_NUM_SEQS = 17
#: ``STREAM_BATCH_INTERVAL_MS`` in the ``.env``: the environment's value wins.
ENV_FILE_BATCH_INTERVAL_MS = 5
#: The audit log, beside the launcher's log (``Stack.log_path``).
AUDIT_FILE = "audit.jsonl"


@pytest.fixture(scope="session")
def sim_stack(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The service as ``LLM_MODEL=sim make serve`` runs it, with the times above."""
    folder = tmp_path_factory.mktemp("sim-stack")
    (folder / ".env").write_text(
        f"VLLM_MAX_NUM_SEQS={SIM_MAX_NUM_SEQS}\n"
        f"STREAM_BATCH_INTERVAL_MS={ENV_FILE_BATCH_INTERVAL_MS}\n"
    )
    with running_stack(
        redis_server,
        folder,
        {
            "AUDIT_LOG": str(folder / AUDIT_FILE),
            "LLM_MODEL": "sim",
            "SIM_TTFT_MS": str(SIM_TTFT_MS),
            "SIM_TTFT_MS_PER_TOKEN": "0",
            "SIM_STEP_MS": str(SIM_STEP_MS),
            "SIM_STEP_MS_PER_SEQ": "0",
            "STREAM_BATCH_INTERVAL_MS": str(STREAM_BATCH_INTERVAL_MS),
            "ENGINE_MIN_REPLICAS": "2",
            "ENGINE_MAX_REPLICAS": "2",
            # The overload test (test_overload.py): a short deadline, and a count bound
            # high enough that its refusals are the deadline admission's.
            "REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
            "ENGINE_MAX_QUEUED_REQUESTS": "2000",
        },
        cwd=folder,
    ) as stack:
        yield stack
