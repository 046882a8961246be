"""The whole test suite as ``make test`` runs it: on 2 cores, in as little time as it can.

Each pytest process starts the stacks (Ray clusters) it needs, one at a time. Most groups
keep about one core busy (one process importing vLLM at a time while a stack starts, the
HTTP-layer tests on one core, waits for a rate window or a freed port), so two chains of
processes run side by side and at most two stacks run at once:

- chain 1, shown as it runs: unit and HTTP-layer tests, fake-GPU Ray, the stack on the
  simulated engine, then the tenants and images stacks;
- chain 2, shown when it has ended: the session's stack tests (the stack and raw vLLM start
  with that process), the start-up tests, then the scale-out group, whose stack starts
  while chain 1 ends.

The scale-out group's two vLLM engines under load run at nice 15 (``ENGINE_NICENESS``), below
the tenants and images stacks that may still run (serving layer at nice 10, engines at 0),
and an engine replica it adds starts at full priority (not slowed by the load it relieves).
Beside the whole scale-out load, the tenants and images group took twice as long and once
failed: Ray's node did not start within Ray's fixed 30 s.

Every process runs to its end whatever the others do; the exit status is 0 only when every
process passed. Arguments are passed to every pytest process (``make test PYTEST_ARGS=...``);
with arguments, a process whose selection is empty (pytest's status 5) is not a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

#: pytest's exit status when no test was selected.
NO_TESTS = 5


@dataclass(frozen=True)
class Group:
    """One pytest process: what it is called and the marker expression it selects."""

    name: str
    markers: str


CHAIN_SHOWN = (
    Group("unit and HTTP layer", "not stack and not ray"),
    Group("fake-GPU Ray", "ray"),
    Group("simulated engine", "sim"),
    Group("tenants and images", "tenants or vision"),
)
CHAIN_LOGGED = (
    Group(
        "stack", "stack and not scale and not tenants and not startup and not vision and not sim"
    ),
    Group("start-up", "startup"),
    Group("scale-out", "scale"),
)


@dataclass
class Outcome:
    """How one group's pytest process ended."""

    group: Group
    status: int
    took_s: float


def run_group(group: Group, args: list[str], output: int | None = None) -> Outcome:
    """Run ``group``'s pytest process to its end, its output to ``output`` (None: ours)."""
    command = [sys.executable, "-m", "pytest", "-m", group.markers, "--durations=8", *args]
    if output is not None:
        # Two pytest processes at once: one of them keeps off the shared .pytest_cache.
        command[3:3] = ["-p", "no:cacheprovider"]
    header = f"[make test] {group.name}: {' '.join(command[1:])}\n"
    if output is None:
        print(header, end="", flush=True)
    else:
        os.write(output, header.encode())
    started = time.monotonic()
    status = subprocess.call(
        command, stdout=output, stderr=None if output is None else subprocess.STDOUT
    )
    return Outcome(group, status, time.monotonic() - started)


def run_chain(chain: tuple[Group, ...], args: list[str], output: int | None) -> list[Outcome]:
    """Run the groups of ``chain`` one after the other."""
    return [run_group(group, args, output) for group in chain]


def passed(outcome: Outcome, args: list[str]) -> bool:
    """Whether the group passed (no selected test counts only when arguments narrow it)."""
    return outcome.status == 0 or (bool(args) and outcome.status == NO_TESTS)


def main(args: list[str]) -> int:
    """Run the suite; print each group's status and time; 0 when every group passed."""
    started = time.monotonic()
    with tempfile.TemporaryFile() as log:
        logged: list[Outcome] = []
        beside = threading.Thread(
            target=lambda: logged.extend(run_chain(CHAIN_LOGGED, args, log.fileno()))
        )
        beside.start()
        outcomes = run_chain(CHAIN_SHOWN, args, None)
        beside.join()
        names = ", ".join(group.name for group in CHAIN_LOGGED)
        print(f"\n[make test] {names} (ran beside the tests above):", flush=True)
        log.seek(0)
        sys.stdout.buffer.write(log.read())
        sys.stdout.flush()
    outcomes += logged
    print(f"\n[make test] done in {time.monotonic() - started:.0f} s:")
    for outcome in outcomes:
        verdict = "passed" if passed(outcome, args) else f"FAILED (exit status {outcome.status})"
        print(f"[make test]   {outcome.group.name}: {verdict} in {outcome.took_s:.0f} s")
    return 0 if all(passed(outcome, args) for outcome in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
