"""``tests/startup`` fixtures: no launcher outlives its test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.startup.test_port_at_start import Launcher


@pytest.fixture(autouse=True)
def _stop_launchers() -> Iterator[None]:
    """Stop the launchers a test started that still run (a check failed before its stop):
    a stack left running would hold its ports and its Ray dashboard's for the next tests."""
    yield
    while Launcher.started:
        launcher = Launcher.started.pop()
        if launcher.process.poll() is None:
            launcher.stop()
