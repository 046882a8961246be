"""``tests/stack`` fixtures: raw vLLM for the differential test, started beside the stack.

Both take about 50 s to start on 2 cores, mostly one process importing at a time, so
starting raw vLLM when the session's stack starts (instead of when the differential
test asks for it, after the stack tests before it) saves most of its start.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from benchmarks.compare import RawVllm
from cloudllm_serve.launcher import load_profile, profile_settings
from tests.conftest import REPO


@pytest.fixture(scope="session")
def raw_vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RawVllm]:
    """vLLM's own OpenAI server with our engine replicas' arguments, started (not ready)."""
    settings = profile_settings(load_profile(REPO / "deployments" / "cpu.yaml"))
    server = RawVllm("raw-vllm", settings, tmp_path_factory.mktemp("raw-vllm"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session", autouse=True)
def _raw_vllm_starts_with_the_stack(request: pytest.FixtureRequest) -> None:
    """Start raw vLLM before the first stack test's stack, if a selected test needs it."""
    if any("raw_vllm" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("raw_vllm_server")


@pytest.fixture(scope="module")
def raw_vllm(raw_vllm_server: RawVllm) -> Iterator[str]:
    """The base URL of raw vLLM, once it serves; stopped after the module (not idling
    beside the stack tests that follow)."""
    try:
        raw_vllm_server.wait_ready(timeout_s=600)
        yield raw_vllm_server.base_url
    finally:
        raw_vllm_server.stop()
