"""Redis time per turn with and without replica acknowledgement (``REDIS_MIN_REPLICAS_ACK``).

Starts a primary and a replica (``redis-server`` as ``make serve`` starts it: AOF,
``appendfsync always``) on free ports, then times ``ConversationStore.append`` (one turn:
the user message and the answer) sequentially, first with ``REDIS_MIN_REPLICAS_ACK=0``,
then with 1::

    .venv/bin/python -m benchmarks.redis_ack_cost --turns 2000
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from cloudllm_serve.conversations.redis_connect import redis_client
from cloudllm_serve.conversations.store import ConversationStore, StoredMessage
from cloudllm_serve.devhost.launcher import REDIS_APPENDFSYNC, redis_server_command
from cloudllm_serve.devhost.ports import reserved_free_port


def start(folder: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    """A ``redis-server`` on ``port`` with its data in ``folder``."""
    folder.mkdir(parents=True)
    binary = shutil.which("redis-server") or "redis-server"
    command = redis_server_command(binary, "127.0.0.1", port, folder, appendfsync=REDIS_APPENDFSYNC)
    command += ["--repl-diskless-sync-delay", "0", *extra]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL)


async def time_turns(port: int, turns: int, acks: int) -> list[float]:
    """Milliseconds of each of ``turns`` appends to one conversation."""
    client = redis_client(f"redis://127.0.0.1:{port}/0", timeout_s=3.0)
    store = ConversationStore(client, key_prefix=f"bench-{acks}:", min_replicas_ack=acks)
    conversation_id = await store.create()
    took = []
    for turn in range(turns):
        messages = [
            StoredMessage("user", f"question {turn} " * 8, time.time()),
            StoredMessage("assistant", f"answer {turn} " * 30, time.time()),
        ]
        started = time.perf_counter()
        await store.append(conversation_id, messages)
        took.append((time.perf_counter() - started) * 1000)
        if len(took) % 500 == 0:  # keep one conversation under the store's sizes
            conversation_id = await store.create()
    await store.close()
    return took


def main() -> None:
    """Print mean, p50 and p99 per turn for each setting."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=2000)
    args = parser.parse_args()
    primary_port, replica_port = reserved_free_port("127.0.0.1"), reserved_free_port("127.0.0.1")
    with tempfile.TemporaryDirectory() as folder:
        processes = [start(Path(folder) / "primary", primary_port)]
        processes.append(
            start(
                Path(folder) / "replica",
                replica_port,
                "--replicaof",
                "127.0.0.1",
                str(primary_port),
            )
        )
        try:
            replica = redis.Redis(port=replica_port)
            deadline = time.monotonic() + 30
            while True:
                try:
                    if replica.info("replication").get("master_link_status") == "up":
                        break
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("the replica did not connect")
                time.sleep(0.1)
            for acks in (0, 1, 0, 1):
                took = asyncio.run(time_turns(primary_port, args.turns, acks))
                cut = sorted(took)
                print(
                    f"REDIS_MIN_REPLICAS_ACK={acks}: {len(took)} turns, mean "
                    f"{statistics.fmean(took):.3f} ms, p50 {cut[len(cut) // 2]:.3f} ms, "
                    f"p99 {cut[int(len(cut) * 0.99)]:.3f} ms"
                )
        finally:
            for process in processes:
                process.terminate()
                process.wait(10)


if __name__ == "__main__":
    main()
