"""CPU priority and affinity of the serving layer: real processes, titled as Ray and vLLM do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudllm_serve.devhost.cpu_affinity import (
    bound_engine_cpus,
    keep_off_engine_cpus,
    serving_cpus,
    serving_processes,
    set_affinity,
)
from cloudllm_serve.devhost.cpu_priority import (
    engine_processes,
    lower_priority,
    serving_daemons,
    settle_priorities,
)
from cloudllm_serve.devhost.procfs import children, command_line, descendants, process_name

#: A process that takes a title (as Ray's workers and vLLM's processes do), starts the
#: children described by its argument (a nested list of titles), and sleeps.
TREE = textwrap.dedent(
    """
    import json, subprocess, sys, threading, time
    import setproctitle
    title, kids = json.loads(sys.argv[1])
    setproctitle.setproctitle(title)
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    procs = [subprocess.Popen([sys.executable, __file__, json.dumps(k)]) for k in kids]
    time.sleep(60)
    """
)


def _names(pids: list[int]) -> list[str]:
    return sorted(process_name(pid) for pid in pids)


def start_tree(folder: Path, tree: list[Any], count: int) -> subprocess.Popen[bytes]:
    """Start ``tree`` (see :data:`TREE`); return its root once its ``count`` processes
    (itself included) run with their titles."""
    script = folder / "tree.py"
    script.write_text(TREE)
    root = subprocess.Popen([sys.executable, str(script), json.dumps(tree)])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        every = descendants(root.pid)
        # A child forked but not yet exec'd still has its parent's name; one exec'd but
        # not yet titled is "python...".
        if len(every) == count and all(
            not process_name(p).startswith("python")
            and all(process_name(c) != process_name(p) for c in children(p))
            for p in every
        ):
            return root
        time.sleep(0.1)
    root.kill()
    pytest.fail("the process tree did not start")


def stop_tree(root: subprocess.Popen[bytes]) -> None:
    for pid in descendants(root.pid):
        os.kill(pid, 9)
    root.kill()
    root.wait()


@pytest.fixture
def ray_like_tree(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """serve_run → gcs, raylet → controller, agent, replicas (one → EngineCore → worker)."""
    tree = [
        "serve_run",
        [
            ["gcs_server", []],
            [
                "raylet",
                [
                    ["ray::ServeController", []],
                    ["ray::DashboardAgent", []],
                    [
                        "ray::ServeReplica:app:EngineServer",
                        [
                            ["VLLM::EngineCore", [["VLLM::Worker_TP0", []]]],
                            # multiprocessing's resource tracker, beside vLLM's processes
                            ["resource_tracker", []],
                        ],
                    ],
                    ["ray::ServeReplica:app:Ingress", []],
                    # An engine replica whose vLLM has not started yet: Ray adds the method
                    # Serve is calling (the constructor) to its title.
                    ["ray::ServeReplica:app:EngineServer.initialize_and_get_metadata", []],
                    ["ray::IDLE", []],
                    # A worker Ray has just started, not yet titled: it may become a replica.
                    ["default_worker.py", []],
                ],
            ],
        ],
    ]
    root = start_tree(tmp_path, tree, 13)
    yield root
    stop_tree(root)


def _nice(pid: int) -> set[int]:
    """The nice values of ``pid``'s threads."""
    return {os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir(f"/proc/{pid}/task")}


def test_settle_priorities_puts_vllm_first_and_leaves_starting_replicas_alone(
    ray_like_tree: subprocess.Popen[bytes],
) -> None:
    """The serving layer at SERVING_NICENESS (10), vLLM's processes at ENGINE_NICENESS
    (15), and what may still become an engine (raylet, idle workers, a replica in its
    constructor) at the value it started with."""
    root = ray_like_tree.pid
    assert settle_priorities(root, serving_niceness=10, engine_niceness=15) > 0
    by_title = {command_line(p).strip().split(" ")[0]: p for p in descendants(root)}
    expected = {
        "gcs_server": 10,
        "ray::ServeController": 10,
        "ray::DashboardAgent": 10,
        "ray::ServeReplica:app:Ingress": 10,
        "ray::ServeReplica:app:EngineServer": 10,  # its own threads: the serving layer
        "VLLM::EngineCore": 15,
        "VLLM::Worker_TP0": 15,
        "resource_tracker": 0,
        "raylet": 0,
        "ray::IDLE": 0,
        "default_worker.py": 0,
        "ray::ServeReplica:app:EngineServer.initialize_and_get_metadata": 0,
    }
    assert {title: _nice(by_title[title]) for title in expected} == {
        title: {value} for title, value in expected.items()
    }
    assert _nice(root) == {10}
    assert settle_priorities(root, serving_niceness=10, engine_niceness=15) == 0  # settled


def test_an_engine_in_the_replica_process_gets_engine_niceness(tmp_path: Path) -> None:
    """With no vLLM process of its own (the simulated engine), a replica's threads are the
    engine's."""
    tree = ["serve_run", [["raylet", [["ray::ServeReplica:app:EngineServer", []]]]]]
    root = start_tree(tmp_path, tree, 3)
    try:
        settle_priorities(root.pid, serving_niceness=10, engine_niceness=15)
        (replica,) = [p for p in descendants(root.pid) if process_name(p) == "ray::ServeRepli"]
        assert _nice(replica) == {15}
    finally:
        stop_tree(root)


def test_serving_daemons_are_the_control_plane_not_replicas_raylet_or_vllm(
    ray_like_tree: subprocess.Popen[bytes],
) -> None:
    found = serving_daemons(ray_like_tree.pid)
    assert _names(found) == sorted(
        ["serve_run", "gcs_server", "ray::ServeContr", "ray::DashboardA"]
    )


def test_lower_priority_reaches_every_thread_and_never_lowers_a_value(
    ray_like_tree: subprocess.Popen[bytes],
) -> None:
    pid = ray_like_tree.pid
    threads = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    assert len(threads) >= 2
    assert lower_priority(pid, 7) == len(threads)
    assert {os.getpriority(os.PRIO_PROCESS, t) for t in threads} == {7}
    assert lower_priority(pid, 3) == 0  # 7 stays: never lowered
    assert {os.getpriority(os.PRIO_PROCESS, t) for t in threads} == {7}
    # Children started before keep their own value.
    assert all(os.getpriority(os.PRIO_PROCESS, c) == 0 for c in children(pid))


def test_engine_processes_are_vllms_under_the_replica(
    ray_like_tree: subprocess.Popen[bytes],
) -> None:
    replica = next(
        p
        for p in descendants(ray_like_tree.pid)
        if process_name(p).startswith("ray::ServeRepli") and children(p)
    )
    assert _names(engine_processes(replica)) == ["VLLM::EngineCor", "VLLM::Worker_TP"]
    assert engine_processes(ray_like_tree.pid) == []


def test_serving_processes_add_settled_replicas_not_vllm_raylet_or_untitled_workers(
    ray_like_tree: subprocess.Popen[bytes],
) -> None:
    found = serving_processes(ray_like_tree.pid)
    daemons = ["serve_run", "gcs_server", "ray::ServeContr", "ray::DashboardA"]
    assert _names(found) == sorted([*daemons, "ray::ServeRepli", "ray::ServeRepli"])
    titles = sorted(
        command_line(p).strip() for p in found if p not in serving_daemons(ray_like_tree.pid)
    )
    # The ingress, and the engine replica whose vLLM runs; not the one still starting.
    assert titles == ["ray::ServeReplica:app:EngineServer", "ray::ServeReplica:app:Ingress"]
    starting = [
        p
        for p in descendants(ray_like_tree.pid)
        if command_line(p).startswith("ray::ServeReplica:app:EngineServer") and not children(p)
    ]
    assert len(starting) == 1 and starting[0] not in found


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_serving_layer_is_kept_off_the_cores_the_vllm_worker_is_bound_to(
    ray_like_tree: subprocess.Popen[bytes],
) -> None:
    every = descendants(ray_like_tree.pid)
    worker = next(p for p in every if process_name(p).startswith("VLLM::Worker"))
    engine_core = next(p for p in every if process_name(p).startswith("VLLM::EngineCor"))
    allowed = os.sched_getaffinity(0)
    assert bound_engine_cpus(ray_like_tree.pid) == allowed  # not bound yet: nothing to avoid
    assert keep_off_engine_cpus(ray_like_tree.pid, allowed) == allowed

    bound = min(allowed)
    os.sched_setaffinity(worker, {bound})  # as vLLM binds its worker's threads
    assert bound_engine_cpus(ray_like_tree.pid) == {bound}
    rest = allowed - {bound}
    assert keep_off_engine_cpus(ray_like_tree.pid, allowed) == rest
    for pid in serving_processes(ray_like_tree.pid):
        threads = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        assert {frozenset(os.sched_getaffinity(t)) for t in threads} == {frozenset(rest)}
    # vLLM's processes, raylet and workers that may become a replica keep every core.
    untouched = [p for p in every if p not in serving_processes(ray_like_tree.pid)]
    assert {process_name(p) for p in untouched} >= {"raylet", "ray::IDLE", "VLLM::EngineCor"}
    assert len([p for p in untouched if process_name(p) == "ray::ServeRepli"]) == 1
    assert all(os.sched_getaffinity(p) == allowed for p in untouched if p != worker)
    assert os.sched_getaffinity(engine_core) == allowed
    assert set_affinity(ray_like_tree.pid, rest) == 0  # already there: nothing changes


def test_serving_cpus_never_leave_the_serving_layer_without_a_core() -> None:
    assert serving_cpus({0, 1}, {0}) == {1}
    assert serving_cpus({0, 1, 2, 3}, {0, 1, 2}) == {3}
    assert serving_cpus({0, 1}, set()) == {0, 1}
    assert serving_cpus({0, 1}, {0, 1}) == {0, 1}
