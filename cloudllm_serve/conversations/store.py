"""The conversation store: ordered message history per conversation, in Redis.

Layout (``{p}`` is the key prefix, ``cloudllm:`` by default):

* ``{p}conv:{id}``          hash: ``created_at``, ``updated_at`` (Unix seconds) and
  ``engine_replica`` (the engine replica that answered the last turn: its prefix cache
  holds the conversation, see :mod:`cloudllm_serve.engine.routing`)
* ``{p}conv:{id}:messages`` list of JSON messages, oldest first
* ``{p}conversations``      sorted set of ids scored by ``updated_at`` (list, count)

Each method is one network round trip (a pipeline, a script or a single command),
except :meth:`list_page` (three). A turn (the user message and the answer) is appended by
one Lua script that also
checks the conversation still exists, so concurrent turns on one conversation never
overwrite each other and a deleted conversation is never brought back half-way.

Every Redis failure (refused, timed out, frozen server) becomes
:class:`~cloudllm_serve.errors.StoreUnavailableError`; calls are bounded by the
client's socket timeouts, so a dead Redis costs a request at most ``REDIS_TIMEOUT_S``, not a hang.
The client reconnects by itself when Redis is back.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from redis import asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from cloudllm_serve.errors import ConversationNotFoundError, StoreUnavailableError

T = TypeVar("T")

_APPEND_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('RPUSH', KEYS[2], unpack(ARGV, 4))
redis.call('HSET', KEYS[1], 'updated_at', ARGV[1])
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'engine_replica', ARGV[3])
end
redis.call('ZADD', KEYS[3], ARGV[1], ARGV[2])
return 1
"""


@dataclass(frozen=True)
class StoredMessage:
    """One message of a conversation."""

    role: str
    content: str
    timestamp: float

    def to_json(self) -> str:
        """Serialise for Redis."""
        return json.dumps(
            {"role": self.role, "content": self.content, "timestamp": self.timestamp},
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> StoredMessage:
        """Parse a message written by :meth:`to_json`."""
        data = json.loads(raw)
        return cls(role=data["role"], content=data["content"], timestamp=float(data["timestamp"]))


@dataclass(frozen=True)
class Conversation:
    """A conversation's metadata and, when asked for, its messages."""

    conversation_id: str
    created_at: float
    updated_at: float
    message_count: int
    messages: list[StoredMessage] | None = None
    engine_replica: str | None = None


class ConversationStore:
    """Conversations in Redis; see the module docstring for layout and failure behaviour."""

    def __init__(self, client: aioredis.Redis, *, key_prefix: str = "cloudllm:") -> None:
        self._redis = client
        self._prefix = key_prefix
        self._append = client.register_script(_APPEND_SCRIPT)
        #: Network round trips made so far and the time spent in them (``/status/detailed``).
        self.round_trips = 0
        self.busy_s = 0.0

    @classmethod
    def from_url(
        cls, url: str, *, timeout_s: float, key_prefix: str = "cloudllm:"
    ) -> ConversationStore:
        """Connect lazily to ``url`` with bounded timeouts and a single quick retry."""
        client = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
            health_check_interval=30,
        )
        return cls(client, key_prefix=key_prefix)

    def _meta_key(self, conversation_id: str) -> str:
        return f"{self._prefix}conv:{conversation_id}"

    def _messages_key(self, conversation_id: str) -> str:
        return f"{self._prefix}conv:{conversation_id}:messages"

    @property
    def _index_key(self) -> str:
        return f"{self._prefix}conversations"

    async def _call(self, operation: Callable[[], Awaitable[T]], round_trips: int = 1) -> T:
        started = time.perf_counter()
        try:
            return await operation()
        except (RedisError, OSError) as error:
            raise StoreUnavailableError(f"Redis is unavailable: {error}") from None
        finally:
            self.round_trips += round_trips
            self.busy_s += time.perf_counter() - started

    async def create(self) -> str:
        """Create an empty conversation with a new unguessable id; return the id."""
        conversation_id = uuid.uuid4().hex
        now = time.time()

        async def run() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(
                    self._meta_key(conversation_id), mapping={"created_at": now, "updated_at": now}
                )
                pipe.zadd(self._index_key, {conversation_id: now})
                await pipe.execute()

        await self._call(run)
        return conversation_id

    async def messages(self, conversation_id: str) -> list[StoredMessage]:
        """All messages of a conversation, oldest first; 404 error when it does not exist."""
        return (await self.get(conversation_id)).messages or []

    async def append(
        self,
        conversation_id: str,
        messages: Sequence[StoredMessage],
        *,
        engine_replica: str | None = None,
    ) -> None:
        """Append messages atomically; 404 error when the conversation was deleted.

        ``engine_replica`` (which engine replica answered) is recorded with them.
        """
        if not messages:
            return
        now = time.time()
        keys = [
            self._meta_key(conversation_id),
            self._messages_key(conversation_id),
            self._index_key,
        ]
        args: list[Any] = [
            now,
            conversation_id,
            engine_replica or "",
            *(m.to_json() for m in messages),
        ]
        appended = await self._call(lambda: self._append(keys=keys, args=args))
        if not appended:
            raise ConversationNotFoundError(conversation_id)

    async def get(self, conversation_id: str) -> Conversation:
        """One conversation with all its messages."""

        async def run() -> tuple[dict[str, str], list[str]]:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(self._meta_key(conversation_id))
                pipe.lrange(self._messages_key(conversation_id), 0, -1)
                meta, raw = await pipe.execute()
            return meta, raw

        meta, raw = await self._call(run)
        if not meta:
            raise ConversationNotFoundError(conversation_id)
        messages = [StoredMessage.from_json(item) for item in raw]
        return Conversation(
            conversation_id=conversation_id,
            created_at=float(meta["created_at"]),
            updated_at=float(meta["updated_at"]),
            message_count=len(messages),
            messages=messages,
            engine_replica=meta.get("engine_replica") or None,
        )

    async def list_page(
        self, *, offset: int = 0, limit: int = 100
    ) -> tuple[int, list[Conversation]]:
        """The total count and a page of conversations, most recently updated first."""

        async def run() -> tuple[int, list[Conversation]]:
            total = await self._redis.zcard(self._index_key)
            ids = [
                str(item)
                for item in await self._redis.zrevrange(self._index_key, offset, offset + limit - 1)
            ]
            if not ids:
                return total, []
            async with self._redis.pipeline(transaction=False) as pipe:
                for conversation_id in ids:
                    pipe.hgetall(self._meta_key(conversation_id))
                    pipe.llen(self._messages_key(conversation_id))
                replies = await pipe.execute()
            page = []
            for index, conversation_id in enumerate(ids):
                meta, count = replies[2 * index], replies[2 * index + 1]
                if not meta:  # deleted between the two reads
                    continue
                page.append(
                    Conversation(
                        conversation_id=conversation_id,
                        created_at=float(meta["created_at"]),
                        updated_at=float(meta["updated_at"]),
                        message_count=int(count),
                    )
                )
            return total, page

        return await self._call(run, round_trips=3)

    async def delete(self, conversation_id: str) -> None:
        """Delete a conversation; 404 error when it does not exist."""

        async def run() -> int:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._meta_key(conversation_id))
                pipe.delete(self._messages_key(conversation_id))
                pipe.zrem(self._index_key, conversation_id)
                deleted, _, _ = await pipe.execute()
            return int(deleted)

        if not await self._call(run):
            raise ConversationNotFoundError(conversation_id)

    async def count(self) -> int:
        """How many conversations exist (``active_conversations``)."""
        return int(await self._call(lambda: self._redis.zcard(self._index_key)))

    async def ping(self) -> float:
        """Round-trip time to Redis in milliseconds."""
        started = time.perf_counter()
        await self._call(self._redis.ping)
        return (time.perf_counter() - started) * 1000

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()
