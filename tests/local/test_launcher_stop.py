"""The launcher's stop cannot be interrupted into leaving a process behind (it is a race).

:func:`launcher.run` runs here with stand-ins for Redis and ``serve run`` (``sleep``
processes, with a member of Serve's process group and one in a session of its own, as
Ray's daemons are) and the waits it does not own made instant. A tracer delivers the
stop signals at a chosen line executed in ``launcher.py``: the first at every line of
the start-up, or the second at every line of the shutdown. Each time, ``run`` must
return its status (no exception) with every process it started gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from cloudllm_serve.devhost import launcher
from cloudllm_serve.devhost.procfs import start_time
from cloudllm_serve.settings import Settings

LAUNCHER_FILE = launcher.__file__
LAUNCHER_LINES = Path(LAUNCHER_FILE).read_text().splitlines()


class Stack:
    """The processes the stand-ins started, and the process tree before the run."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []
        self.tracer: Tracer | None = None
        self.before = set(launcher.started_under(os.getpid()))

    def sleep(self, **options: Any) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(["sleep", "60"], **options)
        self.processes.append(process)
        return process

    def start_redis(self, _url: str, **_options: Any) -> subprocess.Popen[bytes]:
        return self.sleep(start_new_session=True)

    def start_serve(self, _profile: Any, _settings: Settings) -> tuple[Any, float]:
        serve = self.sleep(process_group=0)  # (a group of its own, as its session is)
        self.sleep(process_group=serve.pid)  # a Ray daemon in serve run's group
        self.sleep(start_new_session=True)  # one that left it
        return serve, 0.0

    def started_under(self, pid: int) -> dict[int, str]:
        """The launcher's own look, less what ran before (the session's Redis server)."""
        found = REAL_STARTED_UNDER(pid)
        return {child: began for child, began in found.items() if child not in self.before}

    def say(self, message: str) -> None:
        """Resume tracing where :class:`launcher.Stopped` is caught: CPython stops tracing
        when a trace function raises, and the signal handler may run inside the tracer."""
        if message.endswith("received, shutting down") and self.tracer is not None:
            sys._getframe(1).f_trace = self.tracer
            sys.settrace(self.tracer)

    def left(self) -> list[int]:
        for process in self.processes:
            with suppress(subprocess.TimeoutExpired):
                process.wait(5)
        return [p.pid for p in self.processes if start_time(p.pid)]


REAL_STARTED_UNDER = launcher.started_under


class Tracer:
    """Counts the lines executed in ``launcher.py``; sends signals at chosen counts."""

    def __init__(self, at: dict[int, signal.Signals]) -> None:
        self.at = at
        self.lines = 0
        #: The (function, line) of each line executed, in order.
        self.points: list[tuple[str, int]] = []
        #: The count at the line that waits for ``serve run`` to exit (start-up's end).
        self.waiting_at: int | None = None

    def __call__(self, frame: FrameType, event: str, _arg: Any) -> Any:
        if frame.f_code.co_filename != LAUNCHER_FILE:
            return None
        if event == "line":
            self.lines += 1
            self.points.append((frame.f_code.co_name, frame.f_lineno))
            if self.waiting_at is None and frame.f_code.co_name == "_launch":
                source = LAUNCHER_LINES[frame.f_lineno - 1]
                if "running.wait()" in source:
                    self.waiting_at = self.lines
                    self.at.setdefault(self.lines, signal.SIGTERM)
            if self.lines in self.at:
                os.kill(os.getpid(), self.at[self.lines])
        return self


@pytest.fixture
def stack(monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    """A :class:`Stack` wired into the launcher; the signal handlers restored after."""
    stack = Stack()
    settings = Settings(LLM_MODEL="sim", LLM_HOST="127.0.0.1", LLM_PORT=1)
    monkeypatch.setattr(launcher, "load_profile", lambda _path: {"applications": [{}]})
    monkeypatch.setattr(launcher, "profile_settings", lambda _profile: settings)
    monkeypatch.setattr(launcher, "check_port", lambda *_args: None)
    monkeypatch.setattr(launcher, "wait_until_listenable", lambda *_args: True)
    monkeypatch.setattr(launcher, "wait_healthy", lambda *_args: None)
    monkeypatch.setattr(launcher, "start_redis", stack.start_redis)
    monkeypatch.setattr(launcher, "start_serve", stack.start_serve)
    monkeypatch.setattr(launcher, "started_under", stack.started_under)
    monkeypatch.setattr(launcher, "say", stack.say)
    monkeypatch.setattr(launcher, "STOP_POLL_S", 0.001)
    monkeypatch.setattr(launcher, "LEFTOVER_WAIT_S", 0.02)
    monkeypatch.setattr(launcher, "SAME_STOP_S", 0.0)
    handlers = {number: signal.getsignal(number) for number in launcher.STOP_SIGNALS}
    yield stack
    for number, handler in handlers.items():
        signal.signal(number, handler)


def run_traced(stack: Stack, at: dict[int, signal.Signals]) -> tuple[int, Tracer]:
    tracer = stack.tracer = Tracer(at)
    sys.settrace(tracer)
    try:
        status = launcher.run(Path("profile.yaml"), start_redis_server=True)
    finally:
        sys.settrace(None)
    left = stack.left()
    assert not left, f"signals at {at}: left running: {left}"
    return status, tracer


def first_times(tracer: Tracer, start: int, end: int) -> list[int]:
    """The counts in ``start..end`` at which a line runs for the first time (a loop's
    second round adds no new point of the stop)."""
    seen = set(tracer.points[: start - 1])
    counts = []
    for count in range(start, end + 1):
        if tracer.points[count - 1] not in seen:
            seen.add(tracer.points[count - 1])
            counts.append(count)
    return counts


def test_a_first_signal_at_any_line_of_the_start_leaves_nothing(stack: Stack) -> None:
    status, calibration = run_traced(stack, {})
    assert status == 0 and calibration.waiting_at
    for line in range(1, calibration.waiting_at + 1):
        stack.processes.clear()
        signals = {line: signal.SIGINT if line % 2 else signal.SIGHUP}
        status, _ = run_traced(stack, signals)
        assert status == 0, signals


def test_a_second_signal_at_any_line_of_the_stop_leaves_nothing(stack: Stack) -> None:
    _, calibration = run_traced(stack, {})
    assert calibration.waiting_at
    lines = first_times(calibration, calibration.waiting_at + 1, calibration.lines)
    # The stop's lines: Serve's, Redis's, the leftovers' (41-45 here; which of its polling
    # loops' branches run depends on timing: 39 once, with three pytest workers on 2 cores).
    assert len(lines) > 30
    for line in lines:
        stack.processes.clear()
        status, _ = run_traced(stack, {line: signal.SIGTERM})
        assert status == 0, line


def test_a_hurried_stop_kills_what_ignores_sigterm(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second signal ends the wait for a ``serve run`` that ignores SIGTERM: SIGKILL
    to its group within :data:`launcher.HURRIED_WAIT_S`, not the 60 s of a normal stop."""
    ignoring = "trap '' TERM; sleep 60 & wait"

    def start_serve(_profile: Any, _settings: Settings) -> tuple[Any, float]:
        serve = subprocess.Popen(["sh", "-c", ignoring], start_new_session=True)
        stack.processes.append(serve)
        return serve, 0.0

    monkeypatch.setattr(launcher, "start_serve", start_serve)
    monkeypatch.setattr(launcher, "HURRIED_WAIT_S", 0.2)
    shutdown = launcher.Shutdown()
    monkeypatch.setattr(launcher, "Shutdown", lambda: shutdown)
    monkeypatch.setattr(launcher, "say", lambda message: hurry_at_stop(message, shutdown))
    status, _ = run_traced(stack, {})
    assert status == 0 and shutdown.hurried_at is not None


def hurry_at_stop(message: str, shutdown: launcher.Shutdown) -> None:
    if message.startswith("stopping Ray Serve"):
        shutdown.on_signal(signal.SIGTERM, None)


def test_a_signal_within_same_stop_s_is_the_same_stop() -> None:
    """A group SIGTERM reaches the launcher twice (make forwards its own): no hurry."""
    shutdown = launcher.Shutdown()
    with pytest.raises(launcher.Stopped), shutdown.interruptible():
        shutdown.on_signal(signal.SIGHUP, None)
    shutdown.on_signal(signal.SIGTERM, None)  # no raise, no hurry
    assert shutdown.reason == "SIGHUP" and shutdown.hurried_at is None
    assert shutdown.deadline(123.0) == 123.0
