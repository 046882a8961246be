"""Several Ray nodes: where replicas may run, which nodes are lost, and no hang without one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from cloudllm_serve.cluster_nodes import ClusterNode, lost_nodes, node_names, parse_nodes
from cloudllm_serve.errors import EngineUnavailableError
from cloudllm_serve.ingress.unserved import ENDED, first_item
from cloudllm_serve.placement import capacity_problem, engine_deployment_options
from cloudllm_serve.settings import Settings


def test_engine_and_ingress_node_resources_and_simulated_cpus() -> None:
    settings = Settings(
        LLM_MODEL="sim",
        ENGINE_DEVICE="cpu",
        VLLM_BLOCK_SIZE=32,
        SIM_REPLICA_CPUS=0.1,
        ENGINE_NODE_RESOURCE="cloudllm_engine",
    )
    actor = engine_deployment_options(settings)["ray_actor_options"]
    assert actor == {"num_cpus": 0.1, "num_gpus": 0, "resources": {"cloudllm_engine": 1.0}}
    plain = engine_deployment_options(Settings(ENGINE_DEVICE="gpu"))["ray_actor_options"]
    assert "resources" not in plain
    tp = engine_deployment_options(
        Settings(ENGINE_DEVICE="gpu", VLLM_TENSOR_PARALLEL_SIZE=2, ENGINE_NODE_RESOURCE="gpu_node")
    )
    assert tp["placement_group_bundles"][0] == {"CPU": 1.0, "GPU": 1.0, "gpu_node": 1.0}
    assert "resources" not in tp["ray_actor_options"]


def test_capacity_problem_names_a_missing_node_resource() -> None:
    settings = Settings(
        ENGINE_DEVICE="cpu", VLLM_BLOCK_SIZE=32, ENGINE_NODE_RESOURCE="cloudllm_engine"
    )
    problem = capacity_problem(settings, [{"CPU": 2.0}])
    assert problem is not None and "cloudllm_engine" in problem
    assert capacity_problem(settings, [{"CPU": 2.0}, {"cloudllm_engine": 16.0}]) is None


def _table() -> list[dict[str, object]]:
    return [
        {"NodeID": "a" * 56, "NodeName": "head", "Alive": True, "Resources": {"CPU": 1}},
        {"NodeID": "b" * 56, "NodeName": "worker", "Alive": False, "DeathReason": 2},
        {"NodeID": "c" * 56, "NodeName": "10.0.0.7", "Alive": False, "DeathReason": 2},
        {"NodeID": "d" * 56, "NodeName": "drained", "Alive": False, "DeathReason": 4},
    ]


def test_lost_nodes_by_name_until_one_of_that_name_returns() -> None:
    nodes = parse_nodes(_table())
    lost = lost_nodes(nodes)
    assert [node.name for node in lost] == ["worker", "10.0.0.7"]
    # An address is not shown on public surfaces: the id's prefix is.
    assert [node.public_name for node in lost] == ["worker", "node cccccccccccc"]
    back = [*nodes, ClusterNode(node_id="e" * 56, name="worker", alive=True)]
    assert [node.name for node in lost_nodes(back)] == ["10.0.0.7"]
    assert node_names(nodes)["a" * 56] == "head"


async def _slow(delay_s: float, items: list[str]) -> AsyncIterator[str]:
    await asyncio.sleep(delay_s)
    for item in items:
        yield item


def test_a_slow_first_item_is_awaited_while_a_replica_runs() -> None:
    asyncio.run(_slow_first_item())


async def _slow_first_item() -> None:
    asked: list[float] = []
    released = asyncio.Event()

    async def unserved() -> str | None:
        asked.append(1.0)
        if len(asked) == 2:  # the item comes only after two checks: no race with the clock
            released.set()
        return None

    async def after_two_checks() -> AsyncIterator[str]:
        await released.wait()
        yield "a"

    first = await first_item(after_two_checks(), unserved, check_after_s=0.05)
    assert first == "a" and len(asked) >= 2
    assert await first_item(_slow(0, []), unserved, check_after_s=0.1) is ENDED


def test_no_replica_running_refuses_and_cancels_the_wait() -> None:
    asyncio.run(_refused())


async def _refused() -> None:
    cancelled = asyncio.Event()

    async def never() -> AsyncIterator[str]:
        try:
            await asyncio.sleep(3600)
            yield "never"
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def unserved() -> str | None:
        return "no engine replica is running"

    with pytest.raises(EngineUnavailableError, match="no engine replica") as refused:
        await first_item(never(), unserved, check_after_s=0.05)
    assert refused.value.status_code == 503 and refused.value.retry_after_s > 0
    await asyncio.wait_for(cancelled.wait(), 1)
