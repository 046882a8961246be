"""Two Ray nodes on one machine: engines on the worker, the worker lost under load and back.

The cluster is ``make cluster-demo``'s (``cloudllm_serve/devhost/cluster_demo.py``): a head node
with the ingress, a worker node with the engine replicas (custom resources), the app
deployed with ``serve deploy``. The worker is stopped as a machine is lost: its raylet
and every process under it get SIGKILL (never ``ray stop``: it would end every Ray of
the machine).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from cloudllm_serve.devhost import cluster_demo
from cloudllm_serve.devhost.cluster_demo import HEAD_NODE, WORKER_NODE, ClusterState
from tests.support import wait_for

#: The simulated engine's times: an answer of 24 tokens takes about half a second.
SIM = {"SIM_TTFT_MS": 50, "SIM_TTFT_MS_PER_TOKEN": 0, "SIM_STEP_MS": 20, "SIM_STEP_MS_PER_SEQ": 0}
#: Longest any request may wait while the worker is lost (no hang): Ray's verdict on the
#: node (3 missed health checks, one a second, in the demo cluster) and the 2 s after which
#: a request with no replica running is refused, beside make test's other stacks.
NO_HANG_S = 15.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterState]:
    folder = Path(tmp_path_factory.mktemp("cluster"))
    state = cluster_demo.up(folder, {**SIM, "ENGINE_MIN_REPLICAS": 2, "ENGINE_MAX_REPLICAS": 2})
    try:
        wait_for(lambda: health(state)[0] == 200, timeout_s=240, interval_s=1)
        yield state
    finally:
        cluster_demo.down(state)


def health(state: ClusterState) -> tuple[int, dict[str, Any]]:
    try:
        answer = requests.get(f"{state.http_url}/health", timeout=10)
        return answer.status_code, answer.json()
    except (requests.RequestException, ValueError):
        return 0, {}


def detailed(state: ClusterState) -> dict[str, Any]:
    answer = requests.get(f"{state.http_url}/status/detailed", timeout=10)
    assert answer.status_code == 200, answer.text
    status: dict[str, Any] = answer.json()
    return status


def generate(state: ClusterState, timeout_s: float = 60) -> requests.Response:
    return requests.post(
        f"{state.http_url}/generate",
        json={"message": "Where does the river run?", "max_tokens": 24},
        timeout=timeout_s,
    )


def engine_replica(answer: requests.Response) -> str:
    replica: str = answer.json()["model_info"]["timings"]["engine_replica"]
    return replica


@dataclass
class Outcome:
    sent_at: float
    took_s: float
    status: int
    retry_after: str | None
    replica: str | None


class Load:
    """Four clients sending ``/generate`` one after the other until stopped."""

    def __init__(self, state: ClusterState) -> None:
        self.state = state
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client) for _ in range(4)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(NO_HANG_S * 4)

    def _client(self) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                answer = generate(self.state, timeout_s=NO_HANG_S * 3)
                replica = engine_replica(answer) if answer.ok else None
                outcome = Outcome(
                    sent,
                    time.monotonic() - sent,
                    answer.status_code,
                    answer.headers.get("Retry-After"),
                    replica,
                )
            except requests.RequestException:
                outcome = Outcome(sent, time.monotonic() - sent, 0, None, None)
            self.outcomes.append(outcome)
            time.sleep(0.1)


def engine_nodes(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Running engine replicas: id -> (node id, node name)."""
    return {
        r["replica_id"]: (r["node_id"], r["node_name"])
        for r in status["engine"]["replicas"]
        if r["state"] == "RUNNING"
    }


def test_engines_run_on_the_worker_and_survive_its_loss(cluster: ClusterState) -> None:
    # Engine replicas on the worker node, named; the answer names its replica. /health is
    # 200 with one running; the second may still start (slowly beside make test's stacks).
    def both_running() -> dict[str, Any] | None:
        found = detailed(cluster)
        return found if len(engine_nodes(found)) >= 2 else None

    status = wait_for(both_running, timeout_s=180, interval_s=1)
    before = engine_nodes(status)
    assert len(before) == 2 and {name for _, name in before.values()} == {WORKER_NODE}
    answer = generate(cluster)
    assert answer.status_code == 200, answer.text
    assert engine_replica(answer) in before
    # The ingress runs on the head: Serve's own details say so (node ids).
    ingress_node = serve_replica_nodes(cluster)["Ingress"]
    assert ingress_node and ingress_node.isdisjoint({node for node, _ in before.values()})

    with Load(cluster) as load:
        wait_for(lambda: sum(o.status == 200 for o in load.outcomes) >= 8, timeout_s=30)
        killed_at = time.monotonic()
        assert cluster_demo.stop_node(cluster, WORKER_NODE) is not None

        def lost() -> dict[str, Any] | None:
            code, body = health(cluster)
            return body if code == 503 and body.get("lost_nodes") == [WORKER_NODE] else None

        body = wait_for(lost, timeout_s=60, interval_s=0.5)
        assert any(WORKER_NODE in problem for problem in body["problems"]), body
        lost_view = detailed(cluster)["engine"]
        assert [node["name"] for node in lost_view["lost_nodes"]] == [WORKER_NODE]
        assert WORKER_NODE in lost_view["error"]
        # Refusals while no engine is reachable, at once, with Retry-After.
        wait_for(
            lambda: sum(o.status == 503 and o.sent_at > killed_at + 10 for o in load.outcomes) >= 4,
            timeout_s=30,
        )

        restarted_at = time.monotonic()
        cluster_demo.start_node(cluster, WORKER_NODE)
        wait_for(lambda: health(cluster)[0] == 200, timeout_s=120, interval_s=0.5)
        back_at = time.monotonic()
        wait_for(
            lambda: sum(o.status == 200 and o.sent_at > back_at for o in load.outcomes) >= 8,
            timeout_s=30,
        )
    # Seconds each request spent waiting while the node was lost (up to the restart; after
    # it, a request may wait for the replica starting on the returned node, as in a
    # redeploy).
    waited_lost = [
        min(o.sent_at + o.took_s, restarted_at) - max(o.sent_at, killed_at)
        for o in load.outcomes
        if o.sent_at < restarted_at and o.sent_at + o.took_s > killed_at
    ]
    print(
        f"\n[cluster] worker lost: {sum(o.status == 503 for o in load.outcomes)} refusals; "
        f"longest wait while lost {max(waited_lost):.1f} s; back "
        f"{back_at - restarted_at:.1f} s after ray start; slowest answer "
        f"{max(o.took_s for o in load.outcomes):.1f} s"
    )
    during = [o for o in load.outcomes if o.sent_at >= killed_at]
    assert {o.status for o in during} <= {200, 503}, [
        o for o in during if o.status not in (200, 503)
    ]
    assert all(o.retry_after for o in during if o.status == 503)
    assert max(waited_lost) < NO_HANG_S
    # Service resumed by itself on replicas Serve placed on the returned worker node.
    after = engine_nodes(detailed(cluster))
    assert after and {name for _, name in after.values()} == {WORKER_NODE}
    assert {node for node, _ in after.values()}.isdisjoint({node for node, _ in before.values()})
    served = {o.replica for o in load.outcomes if o.status == 200 and o.sent_at > back_at}
    assert served and served <= set(after)
    assert health(cluster)[1]["lost_nodes"] == []
    assert cluster_demo.raylet_pid(cluster, HEAD_NODE) is not None


def serve_replica_nodes(state: ClusterState) -> dict[str, set[str]]:
    """Each deployment's replicas' node ids, from Serve's REST API on the dashboard."""
    token = (Path.home() / ".ray" / "auth_token").read_text().strip()
    answer = requests.get(
        f"{state.dashboard_url}/api/serve/applications/",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text[:500]
    deployments = answer.json()["applications"]["cloudllm"]["deployments"]
    return {
        name: {r["node_id"] for r in deployment["replicas"]}
        for name, deployment in deployments.items()
    }
