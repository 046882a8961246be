"""Conversations outlive a Redis node: Sentinel failover and a Redis Cluster's (issue 34).

Real ``redis-server`` processes (``--sentinel`` for the sentinels, cluster mode for the
cluster), the real app over the fake engine, ``REDIS_MIN_REPLICAS_ACK=1``: a turn
answered 200 is on a replica before the answer, so a SIGKILL of the primary loses none.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from cloudllm_serve.conversations.redis_connect import RedisTopology
from cloudllm_serve.conversations.store import ConversationStore, StoredMessage
from cloudllm_serve.errors import StoreUnavailableError
from tests.fakes import FakeEngine
from tests.http.conftest import build_app
from tests.support import RedisClusterNodes, SentinelGroup, replicates, wait_for

#: Sentinel and Redis Cluster failovers: in make test, not in make test-fast.
pytestmark = pytest.mark.redis_ha

CLIENTS = 8
ROUNDS = 3
#: Sentinel's down-after-milliseconds: the failover starts this long after the kill.
DOWN_AFTER_MS = 1000
#: From the kill to a new primary: detection, then the sentinels' election (a split vote
#: is retried after 2 x failover-timeout), with room for a loaded 2-core machine.
ELECTION_S = DOWN_AFTER_MS / 1000 + 29
#: From the new primary to every client's next 200 (and to the servers paired again).
RECOVERY_S = 15.0


@dataclass
class Client:
    """One client's conversation: the turns sent, and which of them were answered 200."""

    index: int
    conversation_id: str = ""
    sent: list[str] = field(default_factory=list)
    acked: list[str] = field(default_factory=list)
    #: (time, status, Retry-After) of every answer.
    answers: list[tuple[float, int, str | None]] = field(default_factory=list)


def run_client(http: TestClient, client: Client, stop: threading.Event) -> None:
    """Send turns one after the other until ``stop``; record what each got."""
    turn = 0
    while not stop.is_set():
        message = f"c{client.index}-t{turn}"
        body: dict[str, str] = {"message": message}
        if client.conversation_id:
            body["conversation_id"] = client.conversation_id
        response = http.post("/generate", json=body)
        if client.conversation_id:
            client.sent.append(message)
        if response.status_code == 200:
            client.conversation_id = response.json()["conversation_id"]
            if body.get("conversation_id"):
                client.acked.append(message)
            else:
                client.sent.append(message)
                client.acked.append(message)
        client.answers.append(
            (time.monotonic(), response.status_code, response.headers.get("Retry-After"))
        )
        turn += 1
        time.sleep(0.02)


def check_conversation(http: TestClient, client: Client) -> None:
    """Every turn answered 200 is stored, in order, once; nothing else but unanswered turns."""
    stored = http.get(f"/conversations/{client.conversation_id}").json()["messages"]
    users = [m["content"] for m in stored if m["role"] == "user"]
    assert [m["role"] for m in stored] == ["user", "assistant"] * len(users)
    assert len(users) == len(set(users)), f"a turn stored twice: {users}"
    assert set(users) <= set(client.sent)
    assert [u for u in users if u in set(client.acked)] == client.acked


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelGroup]:
    group = SentinelGroup(tmp_path, down_after_ms=DOWN_AFTER_MS, failover_timeout_ms=2000)
    try:
        group.start()
        yield group
    finally:
        group.stop()


def test_sentinel_failover_keeps_every_acknowledged_turn(sentinels: SentinelGroup) -> None:
    app, _ = build_app(
        sentinels,
        FakeEngine(),
        REDIS_MIN_REPLICAS_ACK=1,
        REDIS_ACK_TIMEOUT_MS=500,
        MAX_MESSAGES_PER_CONVERSATION=0,
    )
    clients = [Client(index) for index in range(CLIENTS)]
    stop = threading.Event()
    with TestClient(app) as http:
        threads = [
            threading.Thread(target=run_client, args=(http, client, stop)) for client in clients
        ]
        for thread in threads:
            thread.start()
        try:
            for round_ in range(ROUNDS):
                wait_for(lambda: all(len(c.acked) >= 2 for c in clients), 20)
                # As in production, a kill is survivable once the sentinels know a healthy
                # replica (after the last round: from their next INFO of it).
                wait_for(sentinels.can_fail_over, 30)
                primary = sentinels.primary()
                primary.kill()
                killed = time.monotonic()
                # No primary: stateless generation goes on; turns get 503 + Retry-After.
                stateless = http.post("/v1/completions", json={"prompt": "x"})
                assert stateless.status_code == 200, stateless.text
                try:
                    wait_for(lambda old=primary: sentinels.primary() is not old, ELECTION_S)
                except TimeoutError:
                    pytest.fail(f"no new primary in {ELECTION_S} s\n{sentinels.logs()}")
                promoted = time.monotonic() - killed
                # Restarted as a supervisor would, it rejoins as the new primary's replica;
                # only then can writes be acknowledged again (it is the one replica).
                sentinels.restart_as_replica(primary)

                def all_answered_since(moment: float) -> bool:
                    return all(
                        any(at > moment and status == 200 for at, status, _ in c.answers)
                        for c in clients
                    )

                wait_for(lambda moment=killed: all_answered_since(moment), promoted + RECOVERY_S)
                recovered = time.monotonic() - killed
                refused = [
                    (status, retry)
                    for c in clients
                    for at, status, retry in c.answers
                    if at > killed and status != 200
                ]
                assert all(status == 503 and retry for status, retry in refused), refused
                print(
                    f"round {round_ + 1}: new primary after {promoted:.1f} s, every client "
                    f"answered again after {recovered:.1f} s, {len(refused)} turns got 503"
                )

                # The other server replicates the primary. Usually the restarted one follows
                # the promoted one; on a loaded machine the sentinels may fail over once more
                # (back to the restarted one), so whichever is primary now.
                def paired() -> bool:
                    try:
                        current = sentinels.primary()
                    except (redis.RedisError, OSError, StopIteration):
                        return False  # mid-failover
                    return any(
                        replicates(server, current)
                        for server in sentinels.servers
                        if server is not current
                    )

                wait_for(paired, RECOVERY_S)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        for client in clients:
            check_conversation(http, client)
        assert sum(len(c.acked) for c in clients) > CLIENTS * ROUNDS * 2


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[RedisClusterNodes]:
    cluster = RedisClusterNodes(tmp_path)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_cluster_failover_keeps_every_acknowledged_turn(own_cluster: RedisClusterNodes) -> None:
    """A primary of the cluster killed, its replica promoted: no acknowledged turn is lost."""

    async def scenario() -> None:
        client = RedisTopology(own_cluster.url, 1.0, cluster=True).client()
        store = ConversationStore(client, key_prefix="fo:", min_replicas_ack=1, ack_timeout_ms=500)
        ids = [await store.create() for _ in range(12)]
        acked: dict[str, list[str]] = {cid: [] for cid in ids}
        sent: dict[str, list[str]] = {cid: [] for cid in ids}
        stop = asyncio.Event()

        async def converse(cid: str) -> None:
            turn = 0
            while not stop.is_set():
                message = f"{cid}-{turn}"
                sent[cid].append(message)
                try:
                    await store.append(cid, [StoredMessage("user", message, 0.0)])
                    acked[cid].append(message)
                except StoreUnavailableError:
                    await asyncio.sleep(0.1)
                turn += 1
                await asyncio.sleep(0.01)

        tasks = [asyncio.create_task(converse(cid)) for cid in ids]
        await asyncio.sleep(0.5)
        primary = own_cluster.server_of(f"fo:conv:{{{ids[0]}}}")
        replica = own_cluster.server_of(f"fo:conv:{{{ids[0]}}}", primary=False)
        primary.kill()
        killed = time.monotonic()
        while replica.client().info("replication")["role"] != "master":
            assert time.monotonic() - killed < 15, "the replica was not promoted"
            await asyncio.sleep(0.2)
        promoted = time.monotonic() - killed
        # Restarted, the old primary rejoins as its successor's replica (the cluster's
        # configuration says so); only then can that shard's writes be acknowledged again.
        primary.start()
        counts = {cid: len(acked[cid]) for cid in ids}
        while not all(len(acked[cid]) > counts[cid] for cid in ids):
            assert time.monotonic() - killed < 20, "turns did not succeed again"
            await asyncio.sleep(0.2)
        print(
            f"cluster: replica promoted after {promoted:.1f} s, every conversation "
            f"answered again after {time.monotonic() - killed:.1f} s"
        )
        wait_for(lambda: replicates(primary, replica), 15)
        stop.set()
        await asyncio.gather(*tasks)
        for cid in ids:
            stored = [m.content for m in (await store.get(cid)).messages or []]
            assert len(stored) == len(set(stored))
            assert set(stored) <= set(sent[cid])
            assert [m for m in stored if m in set(acked[cid])] == acked[cid]
        await store.close()

    asyncio.run(scenario())
