"""``make serve`` and a busy LLM_PORT: refused by name, waited for, or taken back; restarts.

Each test starts the launcher as ``make serve`` does (the CPU profile, direct ingress)
against the session's Redis, on a port of its own, and prints what it saw.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import requests

from cloudllm_serve.devhost.launcher import PORT_WAIT_S
from tests.conftest import REPO
from tests.support import RedisServer, server_port, wait_for


@contextmanager
def holding(port: int) -> Iterator[socket.socket]:
    """A socket listening on ``127.0.0.1:port`` until the block ends (or it is closed)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    try:
        yield sock
    finally:
        sock.close()


#: Ray's metrics agent of every launcher these tests start (one at a time).
METRICS_PORT = server_port()


class Launcher:
    """``python -m cloudllm_serve.devhost.launcher`` on ``port``, its output in ``log``.

    Every one started is in :attr:`started`; ``tests/startup/conftest.py`` stops those
    still running after each test, so a failed check leaves no stack behind.
    """

    started: ClassVar[list[Launcher]] = []

    def __init__(
        self,
        redis: RedisServer,
        port: int,
        log: Path,
        *,
        port_wait_s: float = PORT_WAIT_S,
        env_overrides: dict[str, str] | None = None,
    ) -> None:
        self.port = port
        self.log = log
        env = {
            **os.environ,
            "LLM_PORT": str(port),
            "LLM_HOST": "127.0.0.1",
            "REDIS_URL": redis.url,
            "PYTHONUNBUFFERED": "1",
            # not 8080: a `make serve` of the developer's may hold it
            "METRICS_EXPORT_PORT": str(METRICS_PORT),
            **(env_overrides or {}),
        }
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cloudllm_serve.devhost.launcher",
                    "--profile",
                    str(REPO / "deployments" / "cpu.yaml"),
                    "--port-wait-s",
                    str(port_wait_s),
                ],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.started_at = time.monotonic()
        Launcher.started.append(self)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def healthy(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"launcher exited:\n{self.output()[-3000:]}")
        try:
            url = f"http://127.0.0.1:{self.port}/health"
            return requests.get(url, timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def stop(self) -> float:
        """SIGTERM; seconds until the launcher exited."""
        stopping = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(180)
        return time.monotonic() - stopping


def test_a_port_held_for_good_is_refused_naming_it(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    port = server_port()
    with holding(port):
        launcher = Launcher(redis_server, port, tmp_path / "launcher.log", port_wait_s=3)
        status = launcher.process.wait(70)
    output = launcher.output()
    print(f"\n[held for good] exit {status} after {time.monotonic() - launcher.started_at:.0f} s:")
    print("\n".join(line for line in output.splitlines() if str(port) in line))
    assert status != 0
    assert f"port {port} (LLM_PORT) on 127.0.0.1 is still in use by pid {os.getpid()}" in output
    assert "after 3 s" in output
    assert "starting Ray Serve" not in output  # nothing was started


#: How soon the launcher must notice that the port it waits for is free (it checks
#: every 0.5 s; generous for a loaded machine: other test groups run beside this one).
NOTICED_WITHIN_S = 10
#: How long a start may take until the app is healthy (~45 s alone on 2 cores).
HEALTHY_WITHIN_S = 300


def said_within(launcher: Launcher, words: str, since: float, timeout_s: float) -> float:
    """Seconds from ``since`` until the launcher's output contains ``words``."""
    wait_for(lambda: words in launcher.output(), timeout_s, interval_s=0.1)
    return time.monotonic() - since


def healthy(launcher: Launcher, since: float) -> float:
    """Seconds from ``since`` until the launcher's app is healthy."""
    wait_for(launcher.healthy, HEALTHY_WITHIN_S, interval_s=0.5)
    return time.monotonic() - since


def stopped_cleanly(launcher: Launcher) -> float:
    """SIGTERM; seconds until the launcher exited, with status 0."""
    stopped_in = launcher.stop()
    assert launcher.process.returncode == 0, launcher.output()[-2000:]
    return stopped_in


def test_busy_port_at_start_then_a_restart_that_loses_the_port_race(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Held at start: waited for, and Serve started as soon as it is free. Then stop,
    and start again at once, with the port taken right after the launcher's check
    (before Serve binds it) until the launcher says Serve lost it: Serve is stopped and
    started again once the port is free.
    """
    port = server_port()
    timings = []

    # 1. Held for a while at start: waited for, then started at once.
    with holding(port) as sock:
        launcher = Launcher(redis_server, port, tmp_path / "launcher-0.log")
        said_within(launcher, "waiting up to", launcher.started_at, 60)
        time.sleep(5)
        assert "starting Ray Serve" not in launcher.output()
        sock.close()
        released = time.monotonic()
    noticed = said_within(launcher, f"port {port} is free now", released, NOTICED_WITHIN_S)
    said_within(launcher, "starting Ray Serve", released, 30)
    took = healthy(launcher, released)
    timings.append(f"held at start: free seen {noticed:.1f} s, healthy {took:.1f} s after release")

    # 2. Stop, and start again at once; the port is taken before Serve binds it, and held
    # until the launcher reports the lost race (however long Serve takes to get there).
    stopped_in = stopped_cleanly(launcher)
    launcher = Launcher(redis_server, port, tmp_path / "launcher-1.log")
    said_within(launcher, "starting Ray Serve", launcher.started_at, 60)
    with holding(port):
        grabbed = time.monotonic()
        lost = said_within(launcher, f"Serve could not listen on port {port}", grabbed, 240)
        released = time.monotonic()
    said_within(launcher, "restarting Ray Serve once the port is free", released, 30)
    took = healthy(launcher, released)
    race = launcher.output()
    assert race.count("[cloudllm] starting Ray Serve") == 2, race[-3000:]
    timings.append(
        f"stop took {stopped_in:.1f} s; lost race reported {lost:.1f} s after the grab; "
        f"healthy {took:.1f} s after the release"
    )
    timings.append(f"stop took {stopped_cleanly(launcher):.1f} s")
    print("\n[cycle] " + "\n[cycle] ".join(timings))
    print("[race] " + "\n[race] ".join(line for line in race.splitlines() if "port" in line))
