"""CPU priority: vLLM's engine processes first, the serving layer after them.

On a host where generation saturates the CPU (vLLM's CPU build; on a GPU host, the
engine core's scheduling loop that feeds the GPU), every cycle the serving layer takes
is taken from the engine: Ray's daemons, Serve's controller and proxy, and our replicas
use some 25 % of a core even when idle or light, which raw ``vllm serve`` does not pay.
``SERVING_NICENESS`` lowers their scheduling priority (a higher nice value needs no
privilege) while vLLM's ``EngineCore`` and worker processes stay where they started, so
the engine gets the CPU it asks for and the serving layer runs in what is left; when the
CPU is not short, nice values change nothing (docs/performance.md, "CPU priority").

Linux keeps a nice value per thread, and a process or thread inherits its parent's. The
``make serve`` launcher's ``serve_run`` sets them all from outside, every time it looks
at the cluster (:func:`settle_priorities`); nothing in a replica does:

- the Ray daemons it started and Serve's controller and proxy (:func:`serving_daemons`)
  go to ``SERVING_NICENESS``, but not ``raylet``, whose children (new replicas, and the
  vLLM processes they start) inherit its value;
- an ingress replica goes to ``SERVING_NICENESS``;
- an engine replica is left at the value it started with until its constructor has
  returned (a replica added under load does not start vLLM at the busy engines' lower
  priority); then vLLM's processes under it go to ``ENGINE_NICENESS`` (0 by default)
  and its own threads, the serving layer's, to ``SERVING_NICENESS``; with vLLM in the
  replica's own process (the simulated engine), its threads are the engine's and take
  ``ENGINE_NICENESS``.

On a cluster, CPU placement is the platform's (cpusets, the Kubernetes CPU manager,
``VLLM_CPU_OMP_THREADS_BIND``): nothing of this runs there.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from cloudllm_serve.devhost.procfs import children, command_line, process_name, threads
from cloudllm_serve.placement import ENGINE_DEPLOYMENT

#: Ray worker processes (named ``ray::<actor>``) that belong to the serving layer and
#: run nothing of ours: Serve's control plane and Ray's per-node agents.
RAY_SERVING_WORKERS = (
    "ray::ServeController",
    "ray::ProxyActor",
    "ray::DashboardAgent",
    "ray::RuntimeEnvAgent",
)
#: Command lines of Serve's replicas (``ray::ServeReplica:<app>:<deployment>``, with
#: ``.<method>`` while Serve calls one).
SERVE_REPLICA_PREFIX = "ray::ServeReplica:"
#: The method Serve calls on a new replica, which runs its constructor.
REPLICA_CONSTRUCTOR = "initialize_and_get_metadata"
#: Process names of vLLM's engine processes (``VLLM::EngineCore``, ``VLLM::Worker``...).
ENGINE_PROCESS_PREFIX = "VLLM::"


def lower_priority(pid: int, niceness: int) -> int:
    """Raise every thread of ``pid`` to at least ``niceness``; return how many changed.

    A thread already at that value or above is left alone (lowering a nice value needs
    privileges, and an operator's higher one stays). Threads and processes that have
    gone, or that this user may not change, are skipped.
    """
    changed = 0
    for tid in threads(pid):
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < niceness:
                os.setpriority(os.PRIO_PROCESS, tid, niceness)
                changed += 1
        except OSError:
            continue
    return changed


def engine_processes(pid: int) -> list[int]:
    """The engine processes vLLM started under ``pid``: none when vLLM runs in ``pid``.

    Its ``EngineCore`` and the workers under it (``VLLM::...``), not other children.
    """
    found = []
    todo = children(pid)
    while todo:
        child = todo.pop()
        if process_name(child).startswith(ENGINE_PROCESS_PREFIX):
            found.append(child)
            todo += children(child)
    return found


def serving_daemons(root: int) -> list[int]:
    """The serving layer's processes in the Ray cluster that ``root`` started.

    ``root`` itself, Ray's head daemons under it (GCS, dashboard, log monitor) with their
    children, and, under ``raylet``, Serve's controller and proxy and Ray's agents. Not
    ``raylet`` itself (new replicas inherit its value), not its other workers (replicas,
    which set their own, idle workers that may become one), and so not vLLM's processes.
    """
    found = []
    todo = [root]
    while todo:
        pid = todo.pop()
        if process_name(pid) == "raylet":
            # Its children are workers: only the named serving ones. Any other may be, or
            # become, a replica (a worker just started is still called "python").
            found += [c for c in children(pid) if _is_serving_worker(c)]
            continue
        found.append(pid)
        todo += children(pid)
    return found


def _is_serving_worker(pid: int) -> bool:
    # comm is cut at 15 characters ("ray::ServeContr"): the command line has it whole.
    return command_line(pid).startswith(RAY_SERVING_WORKERS)


def lower_all(pids: Iterable[int], niceness: int) -> int:
    """:func:`lower_priority` for each pid; the number of threads changed."""
    return sum(lower_priority(pid, niceness) for pid in pids)


def serve_replicas(root: int) -> list[tuple[int, str, bool]]:
    """Serve's replicas in the cluster ``root`` started: (pid, deployment, constructed).

    ``constructed`` is false while Serve runs the replica's constructor.
    """
    found = []
    todo = [root]
    while todo:
        pid = todo.pop()
        title = command_line(pid).strip()
        if title.startswith(SERVE_REPLICA_PREFIX):
            name = title.split(" ", 1)[0].rsplit(":", 1)[-1]
            deployment, _, method = name.partition(".")
            found.append((pid, deployment, method != REPLICA_CONSTRUCTOR))
            continue
        todo += children(pid)
    return found


def settle_priorities(root: int, serving_niceness: int, engine_niceness: int) -> int:
    """Set the nice values of the cluster ``root`` started, as the module says.

    Returns the number of threads changed. Values are only ever raised
    (:func:`lower_priority`), so this may run as often as one likes.
    """
    changed = lower_all(serving_daemons(root), serving_niceness)
    for pid, deployment, constructed in serve_replicas(root):
        if deployment != ENGINE_DEPLOYMENT:
            changed += lower_priority(pid, serving_niceness)
        elif constructed:
            engine = engine_processes(pid)
            changed += lower_all(engine, engine_niceness)
            changed += lower_priority(pid, serving_niceness if engine else engine_niceness)
    return changed
