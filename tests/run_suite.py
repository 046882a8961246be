"""The whole test suite as ``make test`` runs it: one pytest process per group, in two chains.

A group is a folder of ``tests/`` (or two run in one process), selected by the marker of
the same name (``tests/conftest.py``). Each stack group starts Ray clusters of its own and
keeps about one core busy (vLLM imports, waits for rate windows and freed ports), so on
2 cores two chains run side by side: about 14 minutes, where one chain takes over 25
(``tests/README.md`` has the table). The first chain's output is shown as it runs, the
second's when it has ended; at most two stacks run at once.

The scale-out group's vLLM engines run at nice 15 (``ENGINE_NICENESS``), below the stacks of
the other chain: beside the whole scale-out load the tenants and images group took twice
as long and once failed (Ray's node did not start within Ray's fixed 30 s).

Every process runs to its end; the exit status is 0 only when every one passed. Arguments go
to every pytest process (``make test PYTEST_ARGS=...``); with arguments, a process whose
selection is empty (pytest's status 5) is not a failure.
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
    """One pytest process: the folders (markers) it runs."""

    folders: tuple[str, ...]

    @property
    def name(self) -> str:
        """The group's name, as ``tests/README.md`` gives it: its folders."""
        return " + ".join(self.folders)

    @property
    def markers(self) -> str:
        """The ``-m`` expression that selects the group's folders."""
        return " or ".join(self.folders)


#: Shown as it runs.
CHAIN_SHOWN = (
    Group(("unit", "local", "http")),
    Group(("ray",)),
    Group(("sim",)),
    Group(("tenants", "vision")),
)
#: Shown when it has ended: the stack and raw vLLM start with the first process
#: (``_early_starts``); the scale-out stack starts while the first chain ends.
CHAIN_LOGGED = (
    Group(("stack",)),
    Group(("startup",)),
    Group(("scale", "cluster")),
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
