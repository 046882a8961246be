"""CPU affinity: the serving layer off the cores vLLM computes on.

vLLM's CPU build binds each worker's compute threads to cores of its own
(``VLLM_CPU_OMP_THREADS_BIND=auto``: on a 2-core host, core 0) and leaves the rest
"reserved for the scheduler process" and the front end, but nothing keeps other
processes off the worker's cores. Ray's daemons, Serve's controller and our replicas
then run there too, and each time one of them is scheduled on that core the worker's
matrix multiplications wait, however low its priority (:mod:`cloudllm_serve.devhost.cpu_priority`).

With ``SERVING_OFF_ENGINE_CPUS`` (on in the CPU profile), the ``make serve`` launcher's
``serve_run`` keeps the serving layer on the other cores: every few seconds it reads
the cores vLLM's workers in its cluster are bound to (:func:`bound_engine_cpus`) and
sets the affinity of every thread of the serving layer's processes
(:func:`serving_processes`) to the cores it may use that are not among them. Nothing
changes while no worker is bound to a strict subset of those cores (a GPU host, or
before vLLM has started), and vLLM's own processes, ``raylet``, workers that may
become a replica and engine replicas whose vLLM has not started yet are never touched:
a process inherits its parent's affinity, and vLLM sizes its thread binding from the
cores its process may use.
"""

from __future__ import annotations

import os

from cloudllm_serve.devhost.cpu_priority import engine_processes, serve_replicas, serving_daemons
from cloudllm_serve.devhost.procfs import descendants, process_name, threads
from cloudllm_serve.placement import ENGINE_DEPLOYMENT

#: Process names of vLLM's workers (``VLLM::Worker``, ``VLLM::Worker_TP0``...).
ENGINE_WORKER_PREFIX = "VLLM::Worker"


def bound_engine_cpus(root: int) -> set[int]:
    """The cores vLLM's workers under ``root`` are bound to (empty when none is found)."""
    cores: set[int] = set()
    for pid in descendants(root):
        if process_name(pid).startswith(ENGINE_WORKER_PREFIX):
            try:
                cores |= os.sched_getaffinity(pid)
            except OSError:  # gone
                continue
    return cores


def serving_cpus(allowed: set[int], engine: set[int]) -> set[int]:
    """Where the serving layer runs: ``allowed`` less ``engine``, or ``allowed`` if that is empty.

    ``engine`` covering all of ``allowed`` means vLLM's workers are not bound (or share
    every core), so there is nothing to keep apart.
    """
    rest = allowed - engine
    return rest or set(allowed)


def serving_processes(root: int) -> list[int]:
    """The serving layer of the cluster ``root`` started, Serve's replicas included.

    :func:`~cloudllm_serve.devhost.cpu_priority.serving_daemons`, plus the processes titled as a
    Serve replica: ingress replicas, and engine replicas once vLLM's ``EngineCore`` has
    started under them. Before that, an engine replica's binding would pass to vLLM's
    processes, and vLLM would bind its worker inside it (an engine replica added while
    another one's worker is bound).
    """
    found = serving_daemons(root)
    for pid, deployment, _ in serve_replicas(root):
        if deployment != ENGINE_DEPLOYMENT or engine_processes(pid):
            found.append(pid)
    return found


def set_affinity(pid: int, cpus: set[int]) -> int:
    """Bind every thread of ``pid`` to ``cpus``; return how many threads changed.

    Threads (and processes) that have gone, or that this user may not change, are skipped.
    """
    changed = 0
    for tid in threads(pid):
        try:
            if os.sched_getaffinity(tid) != cpus:
                os.sched_setaffinity(tid, cpus)
                changed += 1
        except OSError:
            continue
    return changed


def keep_off_engine_cpus(root: int, allowed: set[int]) -> set[int]:
    """Bind the serving layer under ``root`` to the cores vLLM's workers do not use.

    ``allowed``: the cores this cluster may use. Returns the cores the serving layer
    was bound to.
    """
    cpus = serving_cpus(allowed, bound_engine_cpus(root))
    for pid in serving_processes(root):
        set_affinity(pid, cpus)
    return cpus
