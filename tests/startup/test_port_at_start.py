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
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from cloudllm_serve.launcher import PORT_WAIT_S
from tests.conftest import REPO
from tests.support import RedisServer, free_port, wait_for


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
METRICS_PORT = free_port()


class Launcher:
    """``python -m cloudllm_serve.launcher`` on ``port``, its output in ``log``."""

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
                    "cloudllm_serve.launcher",
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
        self.started = time.monotonic()

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
    port = free_port()
    with holding(port):
        launcher = Launcher(redis_server, port, tmp_path / "launcher.log", port_wait_s=10)
        status = launcher.process.wait(70)
    output = launcher.output()
    print(f"\n[held for good] exit {status} after {time.monotonic() - launcher.started:.0f} s:")
    print("\n".join(line for line in output.splitlines() if str(port) in line))
    assert status != 0
    assert f"port {port} (LLM_PORT) on 127.0.0.1 is still in use by pid {os.getpid()}" in output
    assert "after 10 s" in output
    assert "starting Ray Serve" not in output  # nothing was started


def healthy_within_60_s(launcher: Launcher, since: float) -> float:
    """Seconds from ``since`` until the launcher's app is healthy (at most 60)."""
    wait_for(launcher.healthy, 90, interval_s=0.5)
    took = time.monotonic() - since
    assert took <= 60
    return took


def stopped_cleanly(launcher: Launcher) -> float:
    """SIGTERM; seconds until the launcher exited, with status 0."""
    stopped_in = launcher.stop()
    assert launcher.process.returncode == 0, launcher.output()[-2000:]
    return stopped_in


def test_busy_port_at_start_then_a_restart_that_loses_the_port_race(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Held at start: waited for. Then stop, and start again at once, with the port taken
    right after the launcher's check (before Serve binds it) for 20 s: Serve is stopped
    and started again once the port is free, so this one cycle starts Serve twice.

    (Two more plain stop/start cycles ran here once; each repeated this cycle's second
    start for ~50 s of suite time, and the launcher keeps no state between runs.)
    """
    port = free_port()
    timings = []

    # 1. Held for a while at start: waited for, then healthy.
    with holding(port) as sock:
        launcher = Launcher(redis_server, port, tmp_path / "launcher-0.log")
        wait_for(lambda: "waiting up to" in launcher.output(), 30)
        time.sleep(5)
        sock.close()
        released = time.monotonic()
    took = healthy_within_60_s(launcher, released)
    timings.append(f"held at start: healthy {took:.1f} s after release")

    # 2. Stop, and start again at once; the port is taken before Serve binds it.
    stopped_in = stopped_cleanly(launcher)
    launcher = Launcher(redis_server, port, tmp_path / "launcher-1.log")
    grabbed = threading.Event()

    def grab(starting: Launcher, grabbed: threading.Event) -> None:
        wait_for(lambda: "starting Ray Serve" in starting.output(), 60, 0.05)
        with holding(port):
            grabbed.set()
            time.sleep(20)

    thread = threading.Thread(target=grab, args=(launcher, grabbed))
    thread.start()
    wait_for(grabbed.is_set, 60, 0.05)
    thread.join()
    took = healthy_within_60_s(launcher, time.monotonic())
    timings.append(f"stop took {stopped_in:.1f} s, healthy {took:.1f} s after the port's release")
    race = launcher.output()
    timings.append(f"stop took {stopped_cleanly(launcher):.1f} s")
    print("\n[cycle] " + "\n[cycle] ".join(timings))
    print("[race] " + "\n[race] ".join(line for line in race.splitlines() if "port" in line))
