"""CPU time of processes and of their threads, from Linux's ``/proc``, and their roles.

Take :func:`cpu_snapshot` before and after a run, :func:`cpu_delta` of the two, and
:func:`classify` each process into the serving role it plays::

    pids = descendants(root)
    before = cpu_snapshot(pids)
    ...  # the load
    after = cpu_snapshot(descendants(root))
    for proc in cpu_delta(before, after).values():
        print(classify(proc), proc.cpu_s, simulator_cpu_s(proc))

Processes that are gone, or that this user may not read, are left out of a snapshot.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

#: The simulated engine's step loop thread (``cloudllm_serve.engine.simulated``).
SIMULATOR_THREAD = "sim-step-loop"

#: Roles, checked in this order: (role, substrings of the command line or name).
ROLE_MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("proxy", ("ray::ProxyActor",)),
    ("controller", ("ray::ServeController",)),
    # Our engine replica (with vLLM's processes under it), Ray Serve LLM's LLMServer.
    ("engine", ("EngineServer", "LLMServer", "VLLM::")),
    # Our ingress, Ray Serve LLM's OpenAiIngress (LLMRouter before Ray 2.49).
    ("ingress", ("Ingress", "LLMRouter")),
)
#: Ray's own processes: names (``comm``) and substrings of command lines.
RAY_DAEMON_NAMES = frozenset({"gcs_server", "raylet", "ray_client_serv"})
RAY_DAEMON_MARKERS = (
    "gcs_server",
    "raylet",
    "dashboard",
    "log_monitor",
    "monitor.py",
    "runtime_env",
    "ray::DashboardAgent",
    "ray::RuntimeEnvAgent",
    "ray::IDLE",
    "ray::JobSupervisor",
    "ray_client_server",
)

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class ProcCpu:
    """A process's CPU time (user + system, seconds), in all and per thread name."""

    pid: int
    #: ``comm``: the process name, cut by Linux at 15 characters.
    name: str
    #: The command line, arguments joined by spaces (a process title as set).
    cmdline: str
    cpu_s: float
    #: CPU seconds of the live threads, summed by thread name (``comm``, 15 characters).
    threads_cpu_s: dict[str, float] = field(default_factory=dict)
    #: When the process started (clock ticks after boot): tells a reused pid apart.
    start_ticks: int = 0
    #: Per live thread id: its name and CPU seconds (what :func:`cpu_delta` subtracts).
    tasks: dict[int, tuple[str, float]] = field(default_factory=dict)


def _read_stat(path: str) -> tuple[str, list[str]] | None:
    """``comm`` and the fields after it of a ``stat`` file, or None if unreadable."""
    try:
        with open(path, "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    # comm is in parentheses and may hold spaces and parentheses itself.
    open_at, close_at = raw.find("("), raw.rfind(")")
    if open_at < 0 or close_at < 0:
        return None
    return raw[open_at + 1 : close_at], raw[close_at + 1 :].split()


def _cpu_s(fields: list[str]) -> float:
    # After comm: state ppid ... utime (stat field 14) is fields[11], stime fields[12].
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def read_proc(pid: int) -> ProcCpu | None:
    """One process's :class:`ProcCpu` now, or None if it is gone or unreadable."""
    stat = _read_stat(f"/proc/{pid}/stat")
    if stat is None:
        return None
    name, fields = stat
    tasks: dict[int, tuple[str, float]] = {}
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = []
    for tid in tids:
        task = _read_stat(f"/proc/{pid}/task/{tid}/stat")
        if task is not None:
            tasks[tid] = (task[0], _cpu_s(task[1]))
    threads: dict[str, float] = {}
    for thread_name, cpu in tasks.values():
        threads[thread_name] = threads.get(thread_name, 0.0) + cpu
    return ProcCpu(
        pid=pid,
        name=name,
        cmdline=_cmdline(pid),
        cpu_s=_cpu_s(fields),
        threads_cpu_s=threads,
        start_ticks=int(fields[19]),
        tasks=tasks,
    )


def cpu_snapshot(pids: Iterable[int]) -> dict[int, ProcCpu]:
    """:class:`ProcCpu` of each process of ``pids`` that can be read, by pid."""
    found: dict[int, ProcCpu] = {}
    for pid in pids:
        proc = read_proc(pid)
        if proc is not None:
            found[pid] = proc
    return found


def descendants(root_pid: int) -> list[int]:
    """``root_pid`` and every process under it (by the parent pid of each process)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _read_stat(f"/proc/{entry}/stat")
        if stat is not None:
            parents.setdefault(int(stat[1][1]), []).append(int(entry))
    found = [root_pid]
    for pid in found:
        found += sorted(parents.get(pid, []))
    return found


def cpu_delta(before: dict[int, ProcCpu], after: dict[int, ProcCpu]) -> dict[int, ProcCpu]:
    """The CPU time each process of ``after`` spent since ``before``.

    A process missing from ``before`` (or a pid reused by a new process) counts from 0;
    one missing from ``after`` is left out. Threads are matched by thread id, and each
    thread's time goes to its name in ``after``; threads that ended in between are lost
    from ``threads_cpu_s`` (not from ``cpu_s``).
    """
    delta: dict[int, ProcCpu] = {}
    for pid, now in after.items():
        then = before.get(pid)
        if then is not None and then.start_ticks != now.start_ticks:
            then = None
        if then is None:
            delta[pid] = now
            continue
        tasks: dict[int, tuple[str, float]] = {}
        threads: dict[str, float] = {}
        if now.tasks:
            for tid, (name, cpu) in now.tasks.items():
                spent = max(0.0, cpu - then.tasks.get(tid, (name, 0.0))[1])
                tasks[tid] = (name, spent)
                threads[name] = threads.get(name, 0.0) + spent
        else:
            threads = {
                name: max(0.0, cpu - then.threads_cpu_s.get(name, 0.0))
                for name, cpu in now.threads_cpu_s.items()
            }
        delta[pid] = ProcCpu(
            pid=pid,
            name=now.name,
            cmdline=now.cmdline,
            cpu_s=max(0.0, now.cpu_s - then.cpu_s),
            threads_cpu_s=threads,
            start_ticks=now.start_ticks,
            tasks=tasks,
        )
    return delta


def classify(proc: ProcCpu) -> str:
    """The process's role, from its process title (command line) and name.

    One of ``proxy`` (Serve's ``ray::ProxyActor``), ``ingress`` (a replica of our
    ``Ingress`` or of Ray Serve LLM's ``OpenAiIngress``/``LLMRouter``), ``engine`` (our
    ``EngineServer`` replica, Ray Serve LLM's ``LLMServer``, vLLM's ``VLLM::`` processes),
    ``controller`` (``ray::ServeController``), ``ray-daemon`` (GCS, raylet, dashboard,
    Ray's agents, idle workers, and any other ``ray::`` worker but a Serve replica) or
    ``other``.
    """
    # The title, not other arguments: "ray::ServeReplica:cloudllm:Ingress", "VLLM::Worker".
    title = proc.cmdline.split(" ", 1)[0] or proc.name
    for role, markers in ROLE_MARKERS:
        if any(marker in title for marker in markers):
            return role
    text = f"{proc.cmdline} {proc.name}"
    if proc.name in RAY_DAEMON_NAMES or any(marker in text for marker in RAY_DAEMON_MARKERS):
        return "ray-daemon"
    # Any other Ray worker but a replica: the telemetry agent, a job supervisor...
    if title.startswith("ray::") and not title.startswith("ray::ServeReplica"):
        return "ray-daemon"
    return "other"


def simulator_cpu_s(proc: ProcCpu) -> float:
    """CPU seconds of the simulated engine's step loop thread in ``proc`` (0 if none)."""
    return proc.threads_cpu_s.get(SIMULATOR_THREAD, 0.0)
