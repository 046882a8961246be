"""Session fixtures: a real Redis and, for ``stack`` tests, the whole running service."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from benchmarks.compare import RawVllm
from cloudllm_serve.devhost.launcher import (
    REDIS_APPENDFSYNC,
    load_profile,
    profile_settings,
    ray_session_logs,
)
from tests.support import RedisServer, server_port, wait_for

REPO = Path(__file__).resolve().parent.parent
#: No test writes audit lines into the developer's run folder (``AUDIT_LOG``'s default,
#: where ``make serve``'s go): a test of the audit log names its own target.
os.environ.setdefault("AUDIT_LOG", "off")

#: What each folder's tests need, as markers. Every test is also marked with its folder's
#: name, which is its group's name (``tests/README.md``; ``make test`` and ``make test-fast``
#: select by it), so a new test file gets its group's markers without declaring any.
FOLDER_MARKERS: dict[str, tuple[str, ...]] = {
    "unit": (),
    "local": (),
    "http": ("redis",),
    "ray": (),
    "sim": ("redis",),
    "stack": ("vllm", "redis"),
    "tenants": ("vllm", "redis"),
    "vision": ("vllm", "redis"),
    "startup": ("vllm", "redis"),
    "scale": ("vllm", "redis"),
    "cluster": ("redis",),
}
#: Folders whose tests start a stack (a Ray cluster with the app): run after the others.
STACK_FOLDERS = frozenset({"sim", "stack", "tenants", "vision", "startup", "scale", "cluster"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test by its folder (see :data:`FOLDER_MARKERS`); unknown folders fail.

    Tests without a stack run first: they fill the CPU that the session's stack leaves
    while it starts (see ``_early_starts``).
    """
    items.sort(key=lambda item: item.path.parent.name in STACK_FOLDERS)
    for item in items:
        folder = item.path.parent.name
        if folder not in FOLDER_MARKERS:
            raise pytest.UsageError(
                f"{item.nodeid}: tests live in one of {sorted(FOLDER_MARKERS)} (tests/conftest.py)"
            )
        for name in (folder, *FOLDER_MARKERS[folder]):
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

    It syncs its append-only file once a second (``everysec``), not on every write: with
    ``always`` Redis fsyncs in its one thread before it answers, and fsyncs here took up to
    0.7 s while stacks started beside the tests, so the HTTP-layer tests' 1 s timeouts
    failed (twice in one ``make test``). No test kills this Redis; the ones that show what
    a crash keeps use ``make serve``'s policy on a Redis of their own.
    """
    server = RedisServer(tmp_path_factory.mktemp("redis"), appendfsync="everysec")
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
    _healthy: bool = field(default=False, init=False, repr=False)

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def ray_logs(self) -> Path:
        """The log folder of this stack's Ray cluster (other stacks may run beside it)."""
        logs = ray_session_logs(self.launcher.pid)
        assert logs is not None and logs.is_dir(), f"no Ray cluster under the launcher: {logs}"
        return logs

    def dashboard_url(self) -> str:
        """The dashboard of this stack's Ray cluster (8265 only if no other cluster has it),
        as ``ray.init`` printed it: where ``serve deploy --address`` must go."""
        found = DASHBOARD_LINE.search(self.log_path.read_text(errors="replace"))
        assert found is not None, f"no dashboard address in the launcher log:\n{self.log_tail()}"
        return found.group(1)

    def wait_healthy(self) -> None:
        """Wait until ``/health`` answers 200 (once; fails if the launcher exits first)."""

        def healthy() -> bool:
            if self.launcher.poll() is not None:
                raise RuntimeError(f"launcher exited early:\n{self.log_tail()}")
            try:
                return requests.get(f"{self.base_url}/health", timeout=5).status_code == 200
            except requests.RequestException:
                return False

        if not self._healthy:
            wait_for(healthy, timeout_s=600, interval_s=1)
            self._healthy = True


_running_stacks: list[Stack] = []
#: ``ray.init``'s line naming the dashboard (colour codes around the address).
DASHBOARD_LINE = re.compile(r"View the dashboard at \S*?(http://[0-9.]+:[0-9]+)")


@contextlib.contextmanager
def running_stack(
    redis: RedisServer,
    log_dir: Path,
    env_overrides: dict[str, str] | None = None,
    profile: Path = REPO / "deployments" / "cpu.yaml",
    *,
    healthy_first: bool = True,
    cwd: Path = REPO,
) -> Iterator[Stack]:
    """The service started exactly as ``make serve`` starts it (minus Redis, which we own).

    Yields it once healthy, or at once with ``healthy_first=False`` (then call
    :meth:`Stack.wait_healthy`). It starts in ``cwd``, whose ``.env`` it reads. One at a
    time in a pytest process: the session's ``stack`` lives until the session ends, so
    each group with a stack of its own runs in a pytest process of its own, as
    ``make test`` does.
    """
    if _running_stacks:
        raise RuntimeError(
            "another test stack is running in this pytest process; run each stack group "
            "on its own, e.g. pytest -m scale (make test does)"
        )
    port = server_port()
    metrics_port = server_port()
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
                "cloudllm_serve.devhost.launcher",
                "--profile",
                str(profile),
                # Each test stack has a port of its own: no need to wait, at the stop, until
                # the clients' closed connections leave it (up to 60 s; tests/startup does).
                "--port-wait-s",
                str(STACK_PORT_WAIT_S),
            ],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    running = Stack(
        f"http://127.0.0.1:{port}", redis, launcher, log_path, f"http://127.0.0.1:{metrics_port}"
    )
    _running_stacks.append(running)
    try:
        if healthy_first:
            running.wait_healthy()
        yield running
    finally:
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(180)
        _running_stacks.remove(running)


@pytest.fixture(scope="session")
def stack_starting(
    stack_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The session's stack, started but maybe not healthy yet (see ``stack``)."""
    with running_stack(
        stack_redis, tmp_path_factory.mktemp("stack"), healthy_first=False
    ) as running:
        yield running


@pytest.fixture(scope="session")
def stack(stack_starting: Stack) -> Stack:
    """The service as ``make serve`` runs it: the CPU profile, one replica of each.

    Its Redis (``stack.redis``) is its own, ``stack_redis``: the stack's outage tests
    stop it without touching the Redis the other tests share.
    """
    stack_starting.wait_healthy()
    return stack_starting


@pytest.fixture(scope="session")
def raw_vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RawVllm]:
    """vLLM's own OpenAI server with our engine replicas' arguments, started (not ready);
    ``raw_vllm`` (``tests/stack``) waits for it."""
    settings = profile_settings(load_profile(REPO / "deployments" / "cpu.yaml"))
    server = RawVllm("raw-vllm", settings, tmp_path_factory.mktemp("raw-vllm"))
    cores = os.cpu_count() or 1
    if cores > 1:
        # vLLM's CPU worker binds its threads to core 0 by default ("auto" keeps the last
        # core for the rest), as the stack's engine does: on the last core instead, the two
        # engines of the differential test do not share one core.
        server.env["VLLM_CPU_OMP_THREADS_BIND"] = str(cores - 1)
    # vLLM's in-process response store, for the /v1/responses differential test.
    server.env["VLLM_ENABLE_RESPONSES_API_STORE"] = "1"
    server.start()
    try:
        yield server
    finally:
        server.stop()


#: Servers started when the session starts, if a selected test needs them, by the fixture
#: a test names -> the fixture that starts the server without waiting for it.
EARLY_STARTS = {"stack": "stack_starting", "raw_vllm": "raw_vllm_server"}


@pytest.fixture(scope="session", autouse=True)
def _early_starts(request: pytest.FixtureRequest) -> None:
    """Start the session's stack and raw vLLM before the first test, not when the first
    test that needs them runs: each start keeps about one core busy for ~50 s (one process
    importing vLLM at a time), beside the HTTP-layer and unit tests, which run on one core.
    """
    needed = {name for item in request.session.items for name in item.fixturenames}
    for fixture, starter in EARLY_STARTS.items():
        if fixture in needed:
            request.getfixturevalue(starter)
