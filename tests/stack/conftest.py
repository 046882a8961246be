"""``tests/stack`` fixtures: raw vLLM for the differential test.

Raw vLLM starts when the session starts (``raw_vllm_server`` and ``_early_starts`` in
``tests/conftest.py``), beside the session's stack; ``raw_vllm`` waits until it serves.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from benchmarks.compare import RawVllm


@pytest.fixture(scope="module")
def raw_vllm(raw_vllm_server: RawVllm) -> Iterator[str]:
    """The base URL of raw vLLM, once it serves; stopped after the module (not idling
    beside the stack tests that follow)."""
    try:
        raw_vllm_server.wait_ready(timeout_s=600)
        yield raw_vllm_server.base_url
    finally:
        raw_vllm_server.stop()
