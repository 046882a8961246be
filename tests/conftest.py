"""Session fixtures: a real Redis and, for ``stack`` tests, the whole running service."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from cloudllm_serve.launcher import REDIS_APPENDFSYNC
from tests.support import RedisServer, free_port, wait_for

REPO = Path(__file__).resolve().parent.parent

#: Markers of every test in a folder (``make test`` and ``make test-fast`` select by them),
#: so a new test file gets its group's markers without declaring any.
FOLDER_MARKERS: dict[str, tuple[str, ...]] = {
    "unit": (),
    "http": ("redis",),
    "stack": ("stack", "vllm", "redis"),
    "scale": ("stack", "scale", "vllm", "redis"),
    "tenants": ("stack", "tenants", "vllm", "redis"),
    "startup": ("stack", "startup", "vllm", "redis"),
    "vision": ("stack", "vision", "vllm", "redis"),
    "placement": ("ray",),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test by its folder (see :data:`FOLDER_MARKERS`); unknown folders fail."""
    for item in items:
        folder = item.path.parent.name
        if folder not in FOLDER_MARKERS:
            raise pytest.UsageError(
                f"{item.nodeid}: tests live in one of {sorted(FOLDER_MARKERS)} (tests/conftest.py)"
            )
        for name in FOLDER_MARKERS[folder]:
            item.add_marker(name)


#: Settings of the test stack: not the default (512), so seeing it in
#: /status/detailed proves the environment reaches the replicas; above 500 for the
#: cancellation test's 500-token request.
STACK_MAX_TOKENS_CAP = 600
#: The launcher's ``--port-wait-s`` for test stacks.
STACK_PORT_WAIT_S = 5


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The Redis most tests share (each under a key prefix of its own): never stopped.

    A test that freezes or kills Redis uses one of its own (``own_redis`` in
    ``tests/http``, ``stack_redis`` under the session's stack).
    """
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def stack_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The session stack's own Redis, with ``make serve``'s fsync policy.

    ``tests/stack`` freezes and kills it; ``redis_server``, which the HTTP-layer
    tests and the other stacks use, is never touched by that.
    """
    server = RedisServer(tmp_path_factory.mktemp("stack-redis"), appendfsync=REDIS_APPENDFSYNC)
    server.start()
    yield server
    server.stop()


@dataclass
class Stack:
    """The running service: its base URL, its Redis, and the launcher process."""

    base_url: str
    redis: RedisServer
    launcher: subprocess.Popen[bytes]
    log_path: Path
    #: Ray's metrics agent of this stack (``METRICS_EXPORT_PORT``).
    metrics_url: str = ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


_running_stacks: list[Stack] = []


@contextlib.contextmanager
def running_stack(
    redis: RedisServer,
    log_dir: Path,
    env_overrides: dict[str, str] | None = None,
    profile: Path = REPO / "deployments" / "cpu.yaml",
) -> Iterator[Stack]:
    """The service started exactly as ``make serve`` starts it (minus Redis, which we own).

    One at a time: a second ``serve run`` would join the first one's Ray cluster. The
    session's ``stack`` lives until the session ends, so ``tests/scale`` (its own
    stack) runs in a pytest process of its own, as ``make test`` does.
    """
    if _running_stacks:
        raise RuntimeError(
            "another test stack is running in this pytest process; run the 'scale' tests "
            "on their own: pytest -m scale (make test does)"
        )
    port = free_port()
    metrics_port = free_port()
    log_path = log_dir / "launcher.log"
    env = dict(os.environ)
    env.update(
        {
            "LLM_PORT": str(port),
            "LLM_HOST": "127.0.0.1",
            "REDIS_URL": redis.url,
            "MAX_TOKENS_CAP": str(STACK_MAX_TOKENS_CAP),
            "METRICS_EXPORT_PORT": str(metrics_port),
            "PYTHONUNBUFFERED": "1",
            **(env_overrides or {}),
        }
    )
    with log_path.open("wb") as log:
        launcher = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cloudllm_serve.launcher",
                "--profile",
                str(profile),
                # Each test stack has a port of its own: no need to wait, at the stop, until
                # the clients' closed connections leave it (up to 60 s; tests/startup does).
                "--port-wait-s",
                str(STACK_PORT_WAIT_S),
            ],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    running = Stack(
        f"http://127.0.0.1:{port}", redis, launcher, log_path, f"http://127.0.0.1:{metrics_port}"
    )

    def healthy() -> bool:
        if launcher.poll() is not None:
            raise RuntimeError(f"launcher exited early:\n{running.log_tail()}")
        try:
            return requests.get(f"{running.base_url}/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    _running_stacks.append(running)
    try:
        wait_for(healthy, timeout_s=600, interval_s=1)
        yield running
    finally:
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(180)
        _running_stacks.remove(running)


@pytest.fixture(scope="session")
def stack(stack_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The service as ``make serve`` runs it: the CPU profile, one replica of each.

    Its Redis (``stack.redis``) is its own, ``stack_redis``: the stack's outage tests
    stop it without touching the Redis the other tests share.
    """
    with running_stack(stack_redis, tmp_path_factory.mktemp("stack")) as running:
        yield running
