"""The conversation store: ordered message history per conversation, in Redis.

Layout (``{p}`` is the key prefix, ``cloudllm:`` by default; with API keys on, each
tenant's conversations live under ``{p}t:{tenant}:`` instead, see :meth:`for_tenant`,
so a lookup made for one tenant cannot reach another tenant's keys):

* ``{p}conv:{<id>}``          hash: ``created_at``, ``updated_at`` (Unix seconds),
  ``metadata`` (JSON, set by ``/v1/conversations``) and ``engine_replica`` (the engine
  replica that answered the last turn: its prefix cache holds the conversation, see
  :mod:`cloudllm_serve.engine.routing`)
* ``{p}conv:{<id>}:messages`` list of JSON messages, oldest first
* ``{p}conv:{<id>}:images``   hash: SHA-256 of an image → the image as a data URL. Each
  image a conversation was shown is kept once, however many messages show it; a
  message names its images by digest (``images``)
* ``{p}{<p>}:conversations``  sorted set of ids scored by ``updated_at`` (list, count)
* ``{p}{<p>}:image_bytes``    hash: conversation id → bytes of the images it keeps (the
  tenant's total, for the ``max_image_bytes`` quota; entries of conversations no
  longer in the index are dropped when the total is next needed)

The braces are Redis Cluster hash tags (``<p>`` is ``{p}`` without its last colon): a
conversation's three keys share one hash slot, and a tenant's index and image totals
another, so on a Redis Cluster (``REDIS_CLUSTER=true``) conversations spread over the
primaries and every script touches one slot. On one Redis (or under Sentinel) a write is
one script over both groups of keys, atomic as a whole. On a cluster it is two scripts,
the tenant's index first (``create``, ``append``) or last (``delete``), so a crash in
between leaves at most an index entry without its conversation: listings skip such an
entry (and drop it after :data:`ORPHAN_GRACE_S`), but ``total`` and
``active_conversations`` count it until then. Data written under the layout without
hash tags is moved with ``python -m cloudllm_serve.conversations.migrate``.

An id is ``[A-Za-z0-9_-]{1,128}`` (:func:`is_conversation_id`; those we make are 32 hex
characters). Any other id a client names is unknown (:class:`ConversationNotFoundError`,
404), before Redis is asked: ``<id>:messages`` would otherwise name another key of
conversation ``<id>``.

With a retention (``ttl_s`` > 0, ``CONVERSATION_TTL_S``) every write sets the keys of
the conversation (and the index) to expire ``ttl_s`` after it, and index entries older
than that are dropped before the index is read, so a conversation without a new turn
for ``ttl_s`` is gone with everything it holds.

Each method is one network round trip (a pipeline, a script or a single command),
except :meth:`list_page` (three, four with a retention); on a cluster, writes take two
(three for a turn with images).

With ``REDIS_MIN_REPLICAS_ACK`` = n > 0, each write script is followed on its own
connection by ``WAIT n REDIS_ACK_TIMEOUT_MS`` (sent with it, so no extra round trip, but
the answer waits for the replicas): a write that fewer replicas acknowledged in time is
a 503 (:class:`~cloudllm_serve.errors.StoreUnavailableError`; the turn may or may not
be kept), so every turn answered 200 is on n replicas and survives a failover.

A turn (the user message and the answer) is appended by one Lua script (on a cluster,
the one of its conversation's slot) that also checks the conversation still exists, so
concurrent turns on one conversation never overwrite each other and a deleted
conversation is never brought back half-way.

Storage quotas (:class:`StorageQuota`, per tenant) are checked by the same scripts that
write, atomically: :meth:`create` refuses past ``conversations``, :meth:`append` past
``messages_per_conversation`` or ``image_bytes``, with
:class:`~cloudllm_serve.errors.StorageQuotaError` (409) and nothing written. The message
quota also bounds what each turn loads (:meth:`get` reads the whole history).

Every Redis failure (refused, timed out, frozen server) becomes
:class:`~cloudllm_serve.errors.StoreUnavailableError`; calls are bounded by the
client's socket timeouts, so a dead Redis costs a request at most ``REDIS_TIMEOUT_S``, not a hang.
The client reconnects by itself when Redis is back. A Redis at its ``maxmemory`` (policy
``noeviction``) refuses a script's first write, so a refused turn leaves nothing behind:
that is :class:`~cloudllm_serve.errors.StoreFullError` (503).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, OutOfMemoryError, RedisError, ResponseError

from cloudllm_serve.conversations.redis_connect import RedisClient, RedisTopology, redis_client
from cloudllm_serve.errors import (
    ConversationNotFoundError,
    StorageQuotaError,
    StoreFullError,
    StoreUnavailableError,
)

T = TypeVar("T")

#: Longest conversation id taken from a client (ids we make are 32 hex characters).
MAX_CONVERSATION_ID_CHARS = 128
_CONVERSATION_ID = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_CONVERSATION_ID_CHARS}}}")


def is_conversation_id(value: str) -> bool:
    """Whether ``value`` can name a conversation: ``[A-Za-z0-9_-]{1,128}``, nothing else."""
    return _CONVERSATION_ID.fullmatch(value) is not None


def _known_form(conversation_id: str) -> None:
    """Raise :class:`ConversationNotFoundError` for an id that no conversation can have."""
    if not is_conversation_id(conversation_id):
        raise ConversationNotFoundError(conversation_id)


# KEYS: meta. ARGV: the metadata as JSON, ttl. Returns 0 when there is no conversation.
_SET_METADATA_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], 'metadata', ARGV[1])
if tonumber(ARGV[2]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return 1
"""
# KEYS: meta, messages. ARGV: the message as stored. Returns how many were removed.
_REMOVE_MESSAGE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
return redis.call('LREM', KEYS[2], 1, ARGV[1])
"""

# KEYS: meta, index. ARGV: now, id, ttl, max conversations (0: unlimited).
# Returns {1} when created, {0, count} when the tenant already keeps the most it may.
_CREATE_SCRIPT = """
local ttl, limit = tonumber(ARGV[3]), tonumber(ARGV[4])
if ttl > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. (tonumber(ARGV[1]) - ttl))
end
if limit > 0 then
  local count = redis.call('ZCARD', KEYS[2])
  if count >= limit then
    return {0, count}
  end
end
redis.call('HSET', KEYS[1], 'created_at', ARGV[1], 'updated_at', ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
return {1}
"""

# The tenant's image bytes (KEYS: index, image_bytes) of conversations still in its index
# (and within the retention), dropping the others' entries.
_LIVE_IMAGE_BYTES = """
local function live_image_bytes(index, totals, now, ttl)
  local total = 0
  local entries = redis.call('HGETALL', totals)
  for i = 1, #entries, 2 do
    local score = redis.call('ZSCORE', index, entries[i])
    if score and (ttl == 0 or tonumber(score) >= now - ttl) then
      total = total + tonumber(entries[i + 1])
    else
      redis.call('HDEL', totals, entries[i])
    end
  end
  return total
end
"""

# KEYS: meta, messages, index, images, image_bytes. ARGV: now, id, engine replica, ttl,
# image count, max messages, max image bytes (0: unlimited), then (digest, data URL)
# pairs, then the messages. Returns {1} when appended, {0} when the conversation is
# gone, {-1, messages held} or {-2, image bytes held} when over a quota (nothing written).
_APPEND_SCRIPT = (
    _LIVE_IMAGE_BYTES
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0}
end
local images = tonumber(ARGV[5])
local first = 8
local adding = #ARGV - (first - 1) - 2 * images
local max_messages, max_bytes = tonumber(ARGV[6]), tonumber(ARGV[7])
if max_messages > 0 then
  local held = redis.call('LLEN', KEYS[2])
  if held + adding > max_messages then
    return {-1, held}
  end
end
local new_bytes = 0
for i = 0, images - 1 do
  if redis.call('HEXISTS', KEYS[4], ARGV[first + 2 * i]) == 0 then
    new_bytes = new_bytes + string.len(ARGV[first + 1 + 2 * i])
  end
end
if new_bytes > 0 and max_bytes > 0 then
  local total = live_image_bytes(KEYS[3], KEYS[5], tonumber(ARGV[1]), tonumber(ARGV[4]))
  if total + new_bytes > max_bytes then
    return {-2, total}
  end
end
for i = 0, images - 1 do
  redis.call('HSETNX', KEYS[4], ARGV[first + 2 * i], ARGV[first + 1 + 2 * i])
end
redis.call('RPUSH', KEYS[2], unpack(ARGV, first + 2 * images))
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
if new_bytes > 0 then
  redis.call('HINCRBY', KEYS[5], ARGV[2], new_bytes)
  if ttl > 0 then
    redis.call('EXPIRE', KEYS[5], ttl)
  end
end
return {1}
"""
)


# Reads and deletes are scripts, not MULTI transactions: a Redis at its maxmemory refuses
# every command queued in a transaction, reads and deletes too, but runs a script until
# its first write that may grow memory. So a full Redis still answers reads, and deleting
# conversations frees it.

# KEYS: meta, messages, images. ARGV: 1 to read the images too. Returns {} when the
# conversation does not exist, else {meta pairs, messages, image pairs}.
_GET_SCRIPT = """
local meta = redis.call('HGETALL', KEYS[1])
if #meta == 0 then
  return {}
end
local images = {}
if ARGV[1] == '1' then
  images = redis.call('HGETALL', KEYS[3])
end
return {meta, redis.call('LRANGE', KEYS[2], 0, -1), images}
"""

# KEYS: meta, messages, images, index, image_bytes. ARGV: id. Returns 1 if it existed.
_DELETE_SCRIPT = """
local deleted = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
return deleted
"""


# A Redis Cluster's writes: one script per hash slot (see the module docstring).

# KEYS: index. ARGV: now, id, ttl, max conversations. The index half of _CREATE_SCRIPT.
_CLUSTER_INDEX_NEW_SCRIPT = """
local ttl, limit = tonumber(ARGV[3]), tonumber(ARGV[4])
if ttl > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (tonumber(ARGV[1]) - ttl))
end
if limit > 0 then
  local count = redis.call('ZCARD', KEYS[1])
  if count >= limit then
    return {0, count}
  end
end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
end
return {1}
"""

# KEYS: meta. ARGV: now, ttl. The conversation half of _CREATE_SCRIPT.
_CLUSTER_META_NEW_SCRIPT = """
redis.call('HSET', KEYS[1], 'created_at', ARGV[1], 'updated_at', ARGV[1])
if tonumber(ARGV[2]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return {1}
"""

# KEYS: meta, messages, images. ARGV: max messages, adding, then digests. Returns {1,
# bytes of the images the conversation does not hold yet} (ARGV digest i's length is
# ARGV[2 + images + i]), {0} when it is gone, {-1, messages held} when over the quota.
_CLUSTER_TURN_CHECK_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0}
end
local max_messages, adding = tonumber(ARGV[1]), tonumber(ARGV[2])
if max_messages > 0 then
  local held = redis.call('LLEN', KEYS[2])
  if held + adding > max_messages then
    return {-1, held}
  end
end
local images = (#ARGV - 2) / 2
local new_bytes = 0
for i = 1, images do
  if redis.call('HEXISTS', KEYS[3], ARGV[2 + i]) == 0 then
    new_bytes = new_bytes + tonumber(ARGV[2 + images + i])
  end
end
return {1, new_bytes}
"""

# KEYS: index, image_bytes. ARGV: now, id, ttl, new image bytes, max image bytes.
# The index half of _APPEND_SCRIPT: {1} done, {0} not in the index (deleted), {-2, image
# bytes held} over the quota (nothing written).
_CLUSTER_INDEX_TOUCH_SCRIPT = (
    _LIVE_IMAGE_BYTES
    + """
local now, ttl = tonumber(ARGV[1]), tonumber(ARGV[3])
local new_bytes, max_bytes = tonumber(ARGV[4]), tonumber(ARGV[5])
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  return {0}
end
if new_bytes > 0 and max_bytes > 0 then
  local total = live_image_bytes(KEYS[1], KEYS[2], now, ttl)
  if total + new_bytes > max_bytes then
    return {-2, total}
  end
end
redis.call('ZADD', KEYS[1], now, ARGV[2])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - ttl))
end
if new_bytes > 0 then
  redis.call('HINCRBY', KEYS[2], ARGV[2], new_bytes)
  if ttl > 0 then
    redis.call('EXPIRE', KEYS[2], ttl)
  end
end
return {1}
"""
)

# KEYS: meta, messages, images. ARGV: now, engine replica, ttl, image count, max
# messages, then (digest, data URL) pairs, then the messages. The conversation half of
# _APPEND_SCRIPT: {1}, {0} gone, {-1, messages held} over the quota.
_CLUSTER_TURN_WRITE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0}
end
local images, first = tonumber(ARGV[4]), 6
local max_messages = tonumber(ARGV[5])
if max_messages > 0 then
  local held = redis.call('LLEN', KEYS[2])
  if held + #ARGV - (first - 1) - 2 * images > max_messages then
    return {-1, held}
  end
end
for i = 0, images - 1 do
  redis.call('HSETNX', KEYS[3], ARGV[first + 2 * i], ARGV[first + 1 + 2 * i])
end
redis.call('RPUSH', KEYS[2], unpack(ARGV, first + 2 * images))
redis.call('HSET', KEYS[1], 'updated_at', ARGV[1])
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], 'engine_replica', ARGV[2])
end
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
  if redis.call('EXISTS', KEYS[3]) == 1 then
    redis.call('EXPIRE', KEYS[3], ttl)
  end
end
return {1}
"""

# KEYS: meta, messages, images. Returns 1 if it existed. The conversation half of
# _DELETE_SCRIPT.
_CLUSTER_CONVERSATION_DELETE_SCRIPT = """
local deleted = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2], KEYS[3])
return deleted
"""

# KEYS: index, image_bytes. ARGV: ids. The index half of _DELETE_SCRIPT (also drops
# entries left without their conversation).
_CLUSTER_UNINDEX_SCRIPT = """
redis.call('ZREM', KEYS[1], unpack(ARGV))
redis.call('HDEL', KEYS[2], unpack(ARGV))
return 1
"""

#: An index entry older than this whose conversation does not exist is dropped by a
#: listing (a cluster's create or delete that failed half-way); younger ones may be a
#: create in progress.
ORPHAN_GRACE_S = 60.0


def _pairs(flat: list[str]) -> dict[str, str]:
    """A hash as a Lua script returns it (field, value, ...) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def store_error(error: RedisError | OSError) -> StoreUnavailableError:
    """The 503 of a failed Redis call: :class:`StoreFullError` when Redis is at maxmemory."""
    if isinstance(error, OutOfMemoryError) or str(error).startswith("OOM "):
        return StoreFullError(
            "Redis is full (it reached its maxmemory and refuses writes): nothing was "
            "stored; retry after conversations are deleted or Redis is given more memory "
            "(REDIS_MAXMEMORY)"
        )
    return StoreUnavailableError(f"Redis is unavailable: {error}")


@dataclass(frozen=True)
class StorageQuota:
    """What one tenant may keep (each 0: unlimited); see the module docstring."""

    conversations: int = 0
    messages_per_conversation: int = 0
    image_bytes: int = 0


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
    #: Its id as an item of OpenAI's Conversations API, when it was given one there;
    #: otherwise :attr:`item` derives one from the message itself.
    item_id: str | None = None

    @property
    def item(self) -> str:
        """Its item id (``/v1/conversations/{id}/items``).

        The one it was given, or one derived from its time, role and text: the same at
        every read.
        """
        if self.item_id:
            return self.item_id
        seed = f"{self.timestamp!r}|{self.role}|{self.content}|{self.tool_call_id}"
        return "msg_" + hashlib.sha256(seed.encode()).hexdigest()[:32]

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
        if self.item_id is not None:
            data["id"] = self.item_id
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
            item_id=data.get("id"),
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
    #: Set by ``/v1/conversations`` (``{}`` when never set).
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class StoreStats:
    """Network round trips made so far and the time spent in them (``/status/detailed``)."""

    round_trips: int = 0
    busy_s: float = 0.0


class ConversationStore:
    """Conversations in Redis; see the module docstring for layout and failure behaviour."""

    def __init__(
        self,
        client: RedisClient,
        *,
        key_prefix: str = "cloudllm:",
        ttl_s: int = 0,
        stats: StoreStats | None = None,
        quota: StorageQuota | None = None,
        min_replicas_ack: int = 0,
        ack_timeout_ms: int = 1000,
    ) -> None:
        if "{" in key_prefix or "}" in key_prefix:
            raise ValueError(f"key prefix {key_prefix!r}: braces are Redis Cluster hash tags")
        self._redis = client
        self._root_prefix = key_prefix
        self._prefix = key_prefix
        self.ttl_s = ttl_s
        self.quota = quota or StorageQuota()
        #: Replicas that must acknowledge each write (``REDIS_MIN_REPLICAS_ACK``), and for
        #: how long the write waits for them (``REDIS_ACK_TIMEOUT_MS``).
        self.min_replicas_ack = min_replicas_ack
        self.ack_timeout_ms = ack_timeout_ms
        #: Whether the client is a Redis Cluster's: writes then go slot by slot.
        self.cluster = isinstance(client, RedisCluster)
        script = client.register_script
        self._create = script(_CREATE_SCRIPT)
        self._get = script(_GET_SCRIPT)
        self._delete = script(_DELETE_SCRIPT)
        self._append = script(_APPEND_SCRIPT)
        self._index_new = script(_CLUSTER_INDEX_NEW_SCRIPT)
        self._meta_new = script(_CLUSTER_META_NEW_SCRIPT)
        self._turn_check = script(_CLUSTER_TURN_CHECK_SCRIPT)
        self._index_touch = script(_CLUSTER_INDEX_TOUCH_SCRIPT)
        self._turn_write = script(_CLUSTER_TURN_WRITE_SCRIPT)
        self._conversation_delete = script(_CLUSTER_CONVERSATION_DELETE_SCRIPT)
        self._unindex = script(_CLUSTER_UNINDEX_SCRIPT)
        self._set_metadata = script(_SET_METADATA_SCRIPT)
        self._remove_message = script(_REMOVE_MESSAGE_SCRIPT)
        self.stats = stats or StoreStats()
        #: Called after each operation with its name, seconds taken and whether it failed
        #: (the ingress's metrics); shared by every tenant's view.
        self.observer: Callable[[str, float, bool], None] | None = None

    @classmethod
    def from_url(
        cls, url: str, *, timeout_s: float, key_prefix: str = "cloudllm:", ttl_s: int = 0
    ) -> ConversationStore:
        """Connect lazily to the one Redis at ``url`` with bounded timeouts and one quick retry."""
        return cls(redis_client(url, timeout_s=timeout_s), key_prefix=key_prefix, ttl_s=ttl_s)

    @classmethod
    def from_settings(
        cls, settings: Any, *, key_prefix: str = "cloudllm:", ttl_s: int | None = None
    ) -> ConversationStore:
        """The store a :class:`~cloudllm_serve.settings.Settings` describes.

        Its Redis topology (one Redis, Sentinel or a cluster), timeouts, replica
        acknowledgements and retention (``ttl_s``, default ``CONVERSATION_TTL_S``).
        """
        return cls(
            RedisTopology.from_settings(settings).client(),
            key_prefix=key_prefix,
            ttl_s=settings.CONVERSATION_TTL_S if ttl_s is None else ttl_s,
            min_replicas_ack=settings.REDIS_MIN_REPLICAS_ACK,
            ack_timeout_ms=settings.REDIS_ACK_TIMEOUT_MS,
        )

    @property
    def client(self) -> RedisClient:
        """The Redis client (shared with the rate limiter: one connection pool)."""
        return self._redis

    @property
    def key_prefix(self) -> str:
        """The prefix of every key this store writes (the deployment's, not a tenant's)."""
        return self._root_prefix

    def for_tenant(
        self, tenant_id: str | None, quota: StorageQuota | None = None
    ) -> ConversationStore:
        """The same store seeing only ``tenant_id``'s conversations (``None``: no tenants).

        Tenant ids are restricted to ``[A-Za-z0-9._-]`` by the key file, so one tenant's
        prefix is never a prefix of another's keys. ``quota`` (default: this store's)
        applies to what the view writes.
        """
        if tenant_id is None and quota is None:
            return self
        view = ConversationStore.__new__(ConversationStore)
        view.__dict__.update(self.__dict__)
        if tenant_id is not None:
            view._prefix = f"{self._root_prefix}t:{tenant_id}:"
        if quota is not None:
            view.quota = quota
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
        return f"{self._prefix}conv:{{{conversation_id}}}"

    def _messages_key(self, conversation_id: str) -> str:
        return f"{self._prefix}conv:{{{conversation_id}}}:messages"

    def _images_key(self, conversation_id: str) -> str:
        return f"{self._prefix}conv:{{{conversation_id}}}:images"

    @property
    def _index_key(self) -> str:
        return f"{self._prefix}{{{self._prefix.rstrip(':')}}}:conversations"

    @property
    def _image_bytes_key(self) -> str:
        return f"{self._prefix}{{{self._prefix.rstrip(':')}}}:image_bytes"

    async def _write(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """Run a write script; with ``min_replicas_ack``, answer once replicas have it."""
        if not self.min_replicas_ack:
            return await script(keys=keys, args=args)
        if not self.cluster:
            assert not isinstance(self._redis, RedisCluster)
            pool = self._redis.connection_pool
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                return await self._script_then_wait(connection, script, keys, args)
            finally:
                await pool.release(connection)
        cluster = self._redis
        assert isinstance(cluster, RedisCluster)
        await cluster.initialize()
        node = cluster.get_node_from_key(keys[0])
        assert node is not None
        connection = node.acquire_connection()
        try:
            await node.disconnect_if_needed(connection)
            return await self._script_then_wait(connection, script, keys, args)
        except (RedisError, OSError):
            # The slot map may be stale (a failover): a command through the cluster
            # client has it re-read, so the next write goes to the new primary.
            with contextlib.suppress(RedisError, OSError):
                await cluster.exists(keys[0])
            raise
        finally:
            node.release(connection)

    async def _script_then_wait(
        self, connection: Any, script: AsyncScript, keys: list[str], args: list[Any]
    ) -> Any:
        """The script, then ``WAIT`` on the same connection, both sent at once.

        ``WAIT`` counts the replicas that have this connection's writes, so it must follow
        the script on its connection. A failure leaves the connection closed (its replies
        unread), never retried: the script may have run.
        """
        wait = ("WAIT", self.min_replicas_ack, self.ack_timeout_ms)
        call: tuple[Any, ...] = ("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            for attempt in range(2):
                await connection.send_packed_command(connection.pack_commands([call, wait]))
                error: ResponseError | None = None
                try:
                    reply = await connection.read_response()
                except ResponseError as raised:
                    error = raised
                acked = int(await connection.read_response())
                if isinstance(error, NoScriptError) and attempt == 0:
                    call = ("EVAL", script.script, len(keys), *keys, *args)
                    continue
                if error is not None:
                    raise error
                break
        except BaseException:
            await connection.disconnect()
            raise
        if acked < self.min_replicas_ack:
            raise StoreUnavailableError(
                f"Redis: {acked} of the {self.min_replicas_ack} replicas REDIS_MIN_REPLICAS_ACK "
                f"asks for acknowledged the write within {self.ack_timeout_ms} ms; it may or "
                "may not be kept"
            )
        return reply

    async def _call(
        self, name: str, operation: Callable[[], Awaitable[T]], round_trips: int = 1
    ) -> T:
        started = time.perf_counter()
        failed = False
        try:
            return await operation()
        except StoreUnavailableError:
            failed = True
            raise
        except (RedisError, OSError) as error:
            failed = True
            raise store_error(error) from None
        finally:
            took = time.perf_counter() - started
            self.stats.round_trips += round_trips
            self.stats.busy_s += took
            if self.observer is not None:
                self.observer(name, took, failed)

    async def create(self) -> str:
        """Create an empty conversation with a new unguessable id; return the id.

        Past the ``conversations`` quota: :class:`StorageQuotaError`, nothing created.
        """
        conversation_id = uuid.uuid4().hex
        meta, index = self._meta_key(conversation_id), self._index_key
        limit = self.quota.conversations
        now = time.time()
        args: list[Any] = [now, conversation_id, self.ttl_s, limit]

        async def on_cluster() -> Any:
            reply = await self._write(self._index_new, [index], args)
            if int(reply[0]) == 1:
                await self._write(self._meta_new, [meta], [now, self.ttl_s])
            return reply

        if self.cluster:
            reply = await self._call("create", on_cluster, round_trips=2)
        else:
            reply = await self._call(
                "create", lambda: self._write(self._create, [meta, index], args)
            )
        if int(reply[0]) != 1:
            raise StorageQuotaError(
                f"this tenant keeps {int(reply[1])} conversations, the most "
                f"max_conversations ({limit}) allows; delete some "
                "(DELETE /conversations/{id}) to start another",
                quota="max_conversations",
            )
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
        ``images`` (digest → data URL) the messages show are kept, each once. Past the
        ``messages_per_conversation`` or ``image_bytes`` quota:
        :class:`StorageQuotaError`, nothing written.
        """
        _known_form(conversation_id)
        if not messages:
            return
        now = time.time()
        keys = [
            self._meta_key(conversation_id),
            self._messages_key(conversation_id),
            self._index_key,
            self._images_key(conversation_id),
            self._image_bytes_key,
        ]
        pairs = [item for pair in (images or {}).items() for item in pair]
        args: list[Any] = [
            now,
            conversation_id,
            engine_replica or "",
            self.ttl_s,
            len(pairs) // 2,
            self.quota.messages_per_conversation,
            self.quota.image_bytes,
            *pairs,
            *(m.to_json() for m in messages),
        ]
        if self.cluster:
            reply = await self._call(
                "append",
                lambda: self._append_on_cluster(
                    conversation_id, messages, now, engine_replica, pairs
                ),
                round_trips=3 if pairs else 2,
            )
        else:
            reply = await self._call("append", lambda: self._write(self._append, keys, args))
        outcome = int(reply[0])
        if outcome == 0:
            raise ConversationNotFoundError(conversation_id)
        if outcome == -1:
            raise self.messages_quota_error(conversation_id, int(reply[1]), len(messages))
        if outcome == -2:
            limit = self.quota.image_bytes
            raise StorageQuotaError(
                f"this tenant's stored images take {int(reply[1])} bytes; this turn's new "
                f"images would pass max_image_bytes ({limit}); delete conversations with "
                "images to make room",
                quota="max_image_bytes",
            )

    async def _append_on_cluster(
        self,
        conversation_id: str,
        messages: Sequence[StoredMessage],
        now: float,
        engine_replica: str | None,
        pairs: list[str],
    ) -> Any:
        """:meth:`append` slot by slot: check, the tenant's index, then the conversation."""
        conversation = [
            self._meta_key(conversation_id),
            self._messages_key(conversation_id),
            self._images_key(conversation_id),
        ]
        new_bytes = 0
        if pairs:
            digests, urls = pairs[::2], pairs[1::2]
            checked = await self._turn_check(
                keys=conversation,
                args=[
                    self.quota.messages_per_conversation,
                    len(messages),
                    *digests,
                    *(len(url) for url in urls),
                ],
            )
            if int(checked[0]) != 1:
                return checked
            new_bytes = int(checked[1])
        touched = await self._write(
            self._index_touch,
            [self._index_key, self._image_bytes_key],
            [now, conversation_id, self.ttl_s, new_bytes, self.quota.image_bytes],
        )
        if int(touched[0]) != 1:
            return touched
        return await self._write(
            self._turn_write,
            conversation,
            [
                now,
                engine_replica or "",
                self.ttl_s,
                len(pairs) // 2,
                self.quota.messages_per_conversation,
                *pairs,
                *(m.to_json() for m in messages),
            ],
        )

    def messages_quota_error(
        self, conversation_id: str, held: int, adding: int
    ) -> StorageQuotaError:
        """The refusal of ``adding`` messages to a conversation holding ``held``."""
        limit = self.quota.messages_per_conversation
        return StorageQuotaError(
            f"conversation '{conversation_id}' holds {held} messages; this turn's {adding} "
            f"more would pass max_messages_per_conversation ({limit}); start a new "
            "conversation",
            quota="max_messages_per_conversation",
            param="conversation_id",
        )

    async def get(self, conversation_id: str, *, with_images: bool = False) -> Conversation:
        """One conversation with all its messages (and its images, when asked)."""
        _known_form(conversation_id)
        keys = [
            self._meta_key(conversation_id),
            self._messages_key(conversation_id),
            self._images_key(conversation_id),
        ]

        async def run() -> tuple[dict[str, str], list[str], dict[str, str] | None]:
            reply = await self._get(keys=keys, args=[1 if with_images else 0])
            if not reply:
                return {}, [], None
            meta, raw, images = reply
            return _pairs(meta), raw, _pairs(images) if with_images else None

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
            metadata=json.loads(meta["metadata"]) if meta.get("metadata") else {},
        )

    async def set_metadata(self, conversation_id: str, metadata: Mapping[str, str]) -> None:
        """Replace a conversation's metadata; 404 error when it does not exist."""
        _known_form(conversation_id)
        args = [json.dumps(dict(metadata), ensure_ascii=False), self.ttl_s]
        keys = [self._meta_key(conversation_id)]
        done = await self._call("set_metadata", lambda: self._write(self._set_metadata, keys, args))
        if not int(done):
            raise ConversationNotFoundError(conversation_id)

    async def remove_message(self, conversation_id: str, message: StoredMessage) -> bool:
        """Remove one message (as :meth:`get` read it); whether it was still there.

        404 error when the conversation does not exist.
        """
        _known_form(conversation_id)
        keys = [self._meta_key(conversation_id), self._messages_key(conversation_id)]
        removed = await self._call(
            "remove_message",
            lambda: self._write(self._remove_message, keys, [message.to_json()]),
        )
        if int(removed) < 0:
            raise ConversationNotFoundError(conversation_id)
        return int(removed) > 0

    async def list_page(
        self, *, offset: int = 0, limit: int = 100
    ) -> tuple[int, list[Conversation]]:
        """The total count and a page of conversations, most recently updated first."""

        async def run() -> tuple[int, list[Conversation]]:
            if self.ttl_s:
                await self._drop_expired(self._redis, time.time())
            total = await self._redis.zcard(self._index_key)
            scored: list[Any] = await self._redis.zrevrange(
                self._index_key, offset, offset + limit - 1, withscores=True
            )
            ids = [str(item) for item, _ in scored]
            if not ids:
                return total, []
            async with self._redis.pipeline(transaction=False) as pipe:
                for conversation_id in ids:
                    pipe.hgetall(self._meta_key(conversation_id))
                    pipe.llen(self._messages_key(conversation_id))
                replies = await pipe.execute()
            page = []
            orphans = []
            for index, conversation_id in enumerate(ids):
                meta, count = replies[2 * index], replies[2 * index + 1]
                if not meta:  # deleted between the two reads, or (cluster) half-written
                    if float(scored[index][1]) < time.time() - ORPHAN_GRACE_S:
                        orphans.append(conversation_id)
                    continue
                page.append(
                    Conversation(
                        conversation_id=conversation_id,
                        created_at=float(meta["created_at"]),
                        updated_at=float(meta["updated_at"]),
                        message_count=int(count),
                    )
                )
            if orphans and self.cluster:
                await self._write(self._unindex, [self._index_key, self._image_bytes_key], orphans)
            return total, page

        return await self._call("list", run, round_trips=4 if self.ttl_s else 3)

    async def delete(self, conversation_id: str) -> None:
        """Delete a conversation; 404 error when it does not exist."""
        _known_form(conversation_id)
        keys = [
            self._meta_key(conversation_id),
            self._messages_key(conversation_id),
            self._images_key(conversation_id),
            self._index_key,
            self._image_bytes_key,
        ]

        async def on_cluster() -> Any:
            deleted = await self._write(self._conversation_delete, keys[:3], [])
            await self._write(self._unindex, keys[3:], [conversation_id])
            return deleted

        if self.cluster:
            deleted = await self._call("delete", on_cluster, round_trips=2)
        else:
            deleted = await self._call(
                "delete", lambda: self._write(self._delete, keys, [conversation_id])
            )
        if not deleted:
            raise ConversationNotFoundError(conversation_id)

    async def count(self) -> int:
        """How many conversations exist (``active_conversations``)."""
        if not self.ttl_s:
            return int(await self._call("count", lambda: self._redis.zcard(self._index_key)))

        async def run() -> int:
            # Not MULTI: a full Redis refuses every command queued in a transaction.
            async with self._redis.pipeline(transaction=False) as pipe:
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
