"""Helpers shared by the tests: a real redis-server we control, free ports, polling."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import redis

from cloudllm_serve.launcher import free_port, redis_answers, redis_server_command

T = TypeVar("T")


def wait_for(check: Callable[[], T | None], timeout_s: float, interval_s: float = 0.1) -> T:
    """Call ``check`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)


class RedisServer:
    """A real ``redis-server`` on a free port that tests may stop, freeze and restart.

    Data is kept in an append-only file synced on every write, so a SIGKILL loses
    nothing that Redis acknowledged.
    """

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (make test installs it)")
        self.binary = binary
        self.data_dir = data_dir
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2, decode_responses=True)

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            redis_server_command(
                self.binary, "127.0.0.1", self.port, self.data_dir, fsync_always=True
            ),
            stdout=subprocess.DEVNULL,
        )
        wait_for(self._answers, 10)

    def _answers(self) -> bool:
        return redis_answers("127.0.0.1", self.port)

    def kill(self) -> None:
        """SIGKILL: the harshest stop."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def freeze(self) -> None:
        """SIGSTOP: the socket stays open but nothing answers."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.terminate()
            self.process.wait(10)
