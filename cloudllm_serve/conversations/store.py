"""The conversation store: ordered message history per conversation, in Redis.

Layout (``{p}`` is the key prefix, ``cloudllm:`` by default; with API keys on, each
tenant's conversations live under ``{p}t:{tenant}:`` instead, see :meth:`for_tenant`,
so a lookup made for one tenant cannot reach another tenant's keys):

* ``{p}conv:{id}``          hash: ``created_at``, ``updated_at`` (Unix seconds) and
  ``engine_replica`` (the engine replica that answered the last turn: its prefix cache
  holds the conversation, see :mod:`cloudllm_serve.engine.routing`)
* ``{p}conv:{id}:messages`` list of JSON messages, oldest first
* ``{p}conv:{id}:images``   hash: SHA-256 of an image → the image as a data URL. Each
  image a conversation was shown is kept once, however many messages show it; a
  message names its images by digest (``images``)
* ``{p}conversations``      sorted set of ids scored by ``updated_at`` (list, count)

With a retention (``ttl_s`` > 0, ``CONVERSATION_TTL_S``) every write sets the keys of
the conversation (and the index) to expire ``ttl_s`` after it, and index entries older
than that are dropped before the index is read, so a conversation without a new turn
for ``ttl_s`` is gone with everything it holds.

Each method is one network round trip (a pipeline, a script or a single command),
except :meth:`list_page` (three, four with a retention). A turn (the user message and
the answer) is appended by one Lua script that also checks the conversation still
exists, so concurrent turns on one conversation never overwrite each other and a
deleted conversation is never brought back half-way.

Every Redis failure (refused, timed out, frozen server) becomes
:class:`~cloudllm_serve.errors.StoreUnavailableError`; calls are bounded by the
client's socket timeouts, so a dead Redis costs a request at most ``REDIS_TIMEOUT_S``, not a hang.
The client reconnects by itself when Redis is back.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from cloudllm_serve.errors import ConversationNotFoundError, StoreUnavailableError

T = TypeVar("T")

_APPEND_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local images = tonumber(ARGV[5])
for i = 0, images - 1 do
  redis.call('HSETNX', KEYS[4], ARGV[6 + 2 * i], ARGV[7 + 2 * i])
end
redis.call('RPUSH', KEYS[2], unpack(ARGV, 6 + 2 * images))
redis.call('HSET', KEYS[1], 'updated_at', ARGV[1])
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'engine_replica', ARGV[3])
end
redis.call('ZADD', KEYS[3], ARGV[1], ARGV[2])
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('EXPIRE', KEYS[3], ttl)
  if redis.call('EXISTS', KEYS[4]) == 1 then
    redis.call('EXPIRE', KEYS[4], ttl)
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. (tonumber(ARGV[1]) - ttl))
end
return 1
"""


def redis_client(url: str, *, timeout_s: float) -> aioredis.Redis:
    """A lazily connecting client with bounded timeouts and a single quick retry.

    The retry is for a broken connection only (a pooled socket that Redis closed when it
    restarted), never for a timeout: retrying a frozen Redis would double the time a
    request waits before its 503 (redis-py retries timeouts too by default).
    """
    client: aioredis.Redis = aioredis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        health_check_interval=30,
    )
    return client


@dataclass(frozen=True)
class StoredMessage:
    """One message of a conversation.

    An assistant's ``tool_calls`` and a ``tool`` message's ``tool_call_id`` (and
    ``name``) are kept, in OpenAI's shapes, so a later turn shows the model its calls.
    ``images`` are the digests of the images the message showed, in order (shown
    before its text); the images themselves are kept once per conversation.
    """

    role: str
    content: str
    timestamp: float
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    images: list[str] | None = None

    def to_json(self) -> str:
        """Serialise for Redis."""
        data: dict[str, Any] = {
            "role": self.role,
            "content": self.content,
            "timestamp": self.timestamp,
        }
        for key in ("tool_calls", "tool_call_id", "name", "images"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        return json.dumps(data, ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: str | bytes) -> StoredMessage:
        """Parse a message written by :meth:`to_json`."""
        data = json.loads(raw)
        return cls(
            role=data["role"],
            content=data["content"],
            timestamp=float(data["timestamp"]),
            tool_calls=data.get("tool_calls"),
            tool_call_id=data.get("tool_call_id"),
            name=data.get("name"),
            images=data.get("images"),
        )

    def chat_message(self, images: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The message as a chat request carries it (no timestamp).

        A message with images gets OpenAI's content parts: an ``image_url`` part per
        image (its data URL from ``images``, digest → URL), then the text.
        """
        content: Any = self.content
        if self.images:
            known = images or {}
            content = [
                {"type": "image_url", "image_url": {"url": known[digest]}}
                for digest in self.images
                if digest in known
            ]
            content.append({"type": "text", "text": self.content})
        message: dict[str, Any] = {"role": self.role, "content": content}
        for key in ("tool_calls", "tool_call_id", "name"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        return message


@dataclass(frozen=True)
class Conversation:
    """A conversation's metadata and, when asked for, its messages."""

    conversation_id: str
    created_at: float
    updated_at: float
    message_count: int
    messages: list[StoredMessage] | None = None
    engine_replica: str | None = None
    #: The conversation's images (digest → data URL), when asked for.
    images: dict[str, str] | None = None


@dataclass
class StoreStats:
    """Network round trips made so far and the time spent in them (``/status/detailed``)."""

    round_trips: int = 0
    busy_s: float = 0.0


class ConversationStore:
    """Conversations in Redis; see the module docstring for layout and failure behaviour."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        key_prefix: str = "cloudllm:",
        ttl_s: int = 0,
        stats: StoreStats | None = None,
    ) -> None:
        self._redis = client
        self._root_prefix = key_prefix
        self._prefix = key_prefix
        self.ttl_s = ttl_s
        self._append = client.register_script(_APPEND_SCRIPT)
        self.stats = stats or StoreStats()
        #: Called after each operation with its name, seconds taken and whether it failed
        #: (the ingress's metrics); shared by every tenant's view.
        self.observer: Callable[[str, float, bool], None] | None = None

    @classmethod
    def from_url(
        cls, url: str, *, timeout_s: float, key_prefix: str = "cloudllm:", ttl_s: int = 0
    ) -> ConversationStore:
        """Connect lazily to ``url`` with bounded timeouts and a single quick retry."""
        return cls(redis_client(url, timeout_s=timeout_s), key_prefix=key_prefix, ttl_s=ttl_s)

    @property
    def client(self) -> aioredis.Redis:
        """The Redis client (shared with the rate limiter: one connection pool)."""
        return self._redis

    @property
    def key_prefix(self) -> str:
        """The prefix of every key this store writes (the deployment's, not a tenant's)."""
        return self._root_prefix

    def for_tenant(self, tenant_id: str | None) -> ConversationStore:
        """The same store seeing only ``tenant_id``'s conversations (``None``: no tenants).

        Tenant ids are restricted to ``[A-Za-z0-9._-]`` by the key file, so one tenant's
        prefix is never a prefix of another's keys.
        """
        if tenant_id is None:
            return self
        view = ConversationStore.__new__(ConversationStore)
        view.__dict__.update(self.__dict__)
        view._prefix = f"{self._root_prefix}t:{tenant_id}:"
        return view

    @property
    def round_trips(self) -> int:
        """Network round trips made so far (every tenant's view together)."""
        return self.stats.round_trips

    @property
    def busy_s(self) -> float:
        """Seconds spent in those round trips."""
        return self.stats.busy_s

    def _meta_key(self, conversation_id: str) -> str:
        return f"{self._prefix}conv:{conversation_id}"

    def _messages_key(self, conversation_id: str) -> str:
        return f"{self._prefix}conv:{conversation_id}:messages"

    def _images_key(self, conversation_id: str) -> str:
        return f"{self._prefix}conv:{conversation_id}:images"

    @property
    def _index_key(self) -> str:
        return f"{self._prefix}conversations"

    async def _call(
        self, name: str, operation: Callable[[], Awaitable[T]], round_trips: int = 1
    ) -> T:
        started = time.perf_counter()
        failed = False
        try:
            return await operation()
        except (RedisError, OSError) as error:
            failed = True
            raise StoreUnavailableError(f"Redis is unavailable: {error}") from None
        finally:
            took = time.perf_counter() - started
            self.stats.round_trips += round_trips
            self.stats.busy_s += took
            if self.observer is not None:
                self.observer(name, took, failed)

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
                if self.ttl_s:
                    pipe.expire(self._meta_key(conversation_id), self.ttl_s)
                    pipe.expire(self._index_key, self.ttl_s)
                    self._drop_expired(pipe, now)
                await pipe.execute()

        await self._call("create", run)
        return conversation_id

    async def append(
        self,
        conversation_id: str,
        messages: Sequence[StoredMessage],
        *,
        engine_replica: str | None = None,
        images: Mapping[str, str] | None = None,
    ) -> None:
        """Append messages atomically; 404 error when the conversation was deleted.

        ``engine_replica`` (which engine replica answered) is recorded with them;
        ``images`` (digest → data URL) the messages show are kept, each once.
        """
        if not messages:
            return
        now = time.time()
        keys = [
            self._meta_key(conversation_id),
            self._messages_key(conversation_id),
            self._index_key,
            self._images_key(conversation_id),
        ]
        pairs = [item for pair in (images or {}).items() for item in pair]
        args: list[Any] = [
            now,
            conversation_id,
            engine_replica or "",
            self.ttl_s,
            len(pairs) // 2,
            *pairs,
            *(m.to_json() for m in messages),
        ]
        appended = await self._call("append", lambda: self._append(keys=keys, args=args))
        if not appended:
            raise ConversationNotFoundError(conversation_id)

    async def get(self, conversation_id: str, *, with_images: bool = False) -> Conversation:
        """One conversation with all its messages (and its images, when asked)."""

        async def run() -> tuple[dict[str, str], list[str], dict[str, str] | None]:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(self._meta_key(conversation_id))
                pipe.lrange(self._messages_key(conversation_id), 0, -1)
                if with_images:
                    pipe.hgetall(self._images_key(conversation_id))
                replies = await pipe.execute()
            return replies[0], replies[1], replies[2] if with_images else None

        meta, raw, images = await self._call("get", run)
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
            images=images,
        )

    async def list_page(
        self, *, offset: int = 0, limit: int = 100
    ) -> tuple[int, list[Conversation]]:
        """The total count and a page of conversations, most recently updated first."""

        async def run() -> tuple[int, list[Conversation]]:
            if self.ttl_s:
                await self._drop_expired(self._redis, time.time())
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

        return await self._call("list", run, round_trips=4 if self.ttl_s else 3)

    async def delete(self, conversation_id: str) -> None:
        """Delete a conversation; 404 error when it does not exist."""

        async def run() -> int:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._meta_key(conversation_id))
                pipe.delete(self._messages_key(conversation_id))
                pipe.delete(self._images_key(conversation_id))
                pipe.zrem(self._index_key, conversation_id)
                deleted, _, _, _ = await pipe.execute()
            return int(deleted)

        if not await self._call("delete", run):
            raise ConversationNotFoundError(conversation_id)

    async def count(self) -> int:
        """How many conversations exist (``active_conversations``)."""
        if not self.ttl_s:
            return int(await self._call("count", lambda: self._redis.zcard(self._index_key)))

        async def run() -> int:
            async with self._redis.pipeline(transaction=True) as pipe:
                self._drop_expired(pipe, time.time())
                pipe.zcard(self._index_key)
                _, total = await pipe.execute()
            return int(total)

        return await self._call("count", run)

    def _drop_expired(self, target: Any, now: float) -> Any:
        """Remove index entries untouched for ``ttl_s`` (their keys have expired)."""
        return target.zremrangebyscore(self._index_key, "-inf", f"({now - self.ttl_s}")

    async def ping(self) -> float:
        """Round-trip time to Redis in milliseconds."""
        started = time.perf_counter()
        await self._call("ping", self._redis.ping)
        return (time.perf_counter() - started) * 1000

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()
