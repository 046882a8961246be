"""Stored responses of ``/v1/responses`` (OpenAI's Responses API) in Redis.

Layout, beside the conversations (:mod:`cloudllm_serve.conversations.store`), under the
same prefix (a tenant's own, ``{p}t:{tenant}:``, with API keys on):

* ``{p}resp:{<id>}``  a JSON string: the response as the client got it (``response``),
  the input items it was asked with (``input``, ids added), the ``previous_response_id``
  it continued and the engine replica that answered it (``engine_replica``).

* ``{p}resp:{<id>}:run``  while a background response runs: ``in_progress``, or
  ``cancel`` once a client cancelled it. The ingress replica running it refreshes its
  expiry (``lease``) every :data:`RUN_POLL_S` and reads it for a cancel; a record still in
  progress without it was left by a replica that stopped.

The braces are a Redis Cluster hash tag: one slot per response, its run key included.
A response expires after ``CONVERSATION_TTL_S`` (0: kept until deleted). Writes go
through the conversation store's write path, so ``REDIS_MIN_REPLICAS_ACK`` applies to
them as it does to turns. A chain of responses is read by following
``previous_response_id`` one key (one round trip) at a time, at most :data:`MAX_CHAIN`
deep.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from cloudllm_serve.conversations.store import ConversationStore
from cloudllm_serve.errors import InvalidRequestError

#: The most responses a ``previous_response_id`` chain may hold (a longer one is a 400).
MAX_CHAIN = 256
_RESPONSE_ID = re.compile(r"resp_[A-Za-z0-9_-]{1,128}")

# Writes the record ARGV[1] at KEYS[1], expiring after ARGV[2] seconds (0: never); every
# script that writes a response starts with it.
_PUT_RECORD = """
local function put_record()
  if tonumber(ARGV[2]) > 0 then
    redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  else
    redis.call('SET', KEYS[1], ARGV[1])
  end
end
"""
# KEYS: the response. ARGV: the record, retention in seconds (0: none).
_PUT_SCRIPT = (
    _PUT_RECORD
    + """
put_record()
return 1
"""
)
# KEYS: the response. Returns 1 when deleted, 0 when there was none.
_DELETE_SCRIPT = "redis.call('DEL', KEYS[2]) return redis.call('DEL', KEYS[1])"
# KEYS: the response, its run key. ARGV: the record, retention, the run lease in seconds.
_START_SCRIPT = (
    _PUT_RECORD
    + """
put_record()
redis.call('SET', KEYS[2], 'in_progress', 'EX', ARGV[3])
return 1
"""
)
# KEYS: the run key. ARGV: the lease. Returns the run's state after the refresh.
_HEARTBEAT_SCRIPT = """
local state = redis.call('GET', KEYS[1])
if state == 'in_progress' then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return state
"""
# KEYS: the response, its run key. ARGV: the final record, retention.
# Returns 0 (and writes nothing) when it no longer runs: cancelled or deleted meanwhile.
_FINISH_SCRIPT = (
    _PUT_RECORD
    + """
if redis.call('GET', KEYS[2]) ~= 'in_progress' then
  redis.call('DEL', KEYS[2])
  return 0
end
put_record()
redis.call('DEL', KEYS[2])
return 1
"""
)
# KEYS: the response, its run key. ARGV: the cancelled record, retention.
# Returns 1 when the response was running (now cancelled), 0 when it was not.
_CANCEL_SCRIPT = (
    _PUT_RECORD
    + """
local state = redis.call('GET', KEYS[2])
if state ~= 'in_progress' and state ~= 'cancel' then
  return 0
end
put_record()
redis.call('SET', KEYS[2], 'cancel', 'KEEPTTL')
return 1
"""
)
#: Statuses of a background response that has not ended.
RUNNING_STATUSES = ("queued", "in_progress")
#: How often the replica running a background response refreshes its lease and looks for
#: a cancel (seconds); the lease lasts :data:`RUN_LEASE_S`.
RUN_POLL_S = 0.5
RUN_LEASE_S = 10


def is_response_id(value: Any) -> bool:
    """Whether ``value`` can name a response: ``resp_`` then ``[A-Za-z0-9_-]{1,128}``."""
    return isinstance(value, str) and _RESPONSE_ID.fullmatch(value) is not None


@dataclass(frozen=True)
class StoredResponse:
    """One stored response: what the client got, and what it was asked."""

    response: dict[str, Any]
    input: list[dict[str, Any]]
    previous_response_id: str | None = None
    engine_replica: str = ""

    def to_json(self) -> str:
        """The record as stored."""
        return json.dumps(
            {
                "response": self.response,
                "input": self.input,
                "previous_response_id": self.previous_response_id,
                "engine_replica": self.engine_replica,
            },
            ensure_ascii=False,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> StoredResponse:
        """A record read back."""
        data = json.loads(raw)
        return cls(
            data["response"],
            list(data.get("input") or []),
            data.get("previous_response_id"),
            data.get("engine_replica") or "",
        )


class ResponseStore:
    """Responses of one tenant (the conversation store's view of it) in Redis."""

    def __init__(self, conversations: ConversationStore) -> None:
        self._store = conversations
        client = conversations.client
        self._put = client.register_script(_PUT_SCRIPT)
        self._delete = client.register_script(_DELETE_SCRIPT)
        self._start = client.register_script(_START_SCRIPT)
        self._heartbeat = client.register_script(_HEARTBEAT_SCRIPT)
        self._finish = client.register_script(_FINISH_SCRIPT)
        self._cancel = client.register_script(_CANCEL_SCRIPT)

    def _key(self, response_id: str) -> str:
        # The tenant's prefix, as the conversation store keys it (one rule, one place).
        return f"{self._store._prefix}resp:{{{response_id}}}"

    def _keys(self, response_id: str) -> list[str]:
        key = self._key(response_id)
        return [key, f"{key}:run"]

    async def put(self, stored: StoredResponse) -> None:
        """Write (or overwrite) a response; answered once Redis (and its replicas) have it."""
        key = self._key(stored.response["id"])
        args = [stored.to_json(), self._store.ttl_s]
        await self._store._call("response_put", lambda: self._store._write(self._put, [key], args))

    async def get(self, response_id: str) -> StoredResponse | None:
        """The response, or ``None`` (never made, deleted, expired, or another tenant's)."""
        if not is_response_id(response_id):
            return None
        raw = await self._store._call(
            "response_get", lambda: self._store.client.get(self._key(response_id))
        )
        return None if raw is None else StoredResponse.from_json(raw)

    async def delete(self, response_id: str) -> bool:
        """Delete a response; whether there was one."""
        if not is_response_id(response_id):
            return False
        keys = self._keys(response_id)
        deleted = await self._store._call(
            "response_delete", lambda: self._store._write(self._delete, keys, [])
        )
        return int(deleted) == 1

    async def start_background(self, stored: StoredResponse, lease_s: int = RUN_LEASE_S) -> None:
        """Write a background response that starts running here (its run key leased)."""
        keys = self._keys(stored.response["id"])
        args = [stored.to_json(), self._store.ttl_s, lease_s]
        await self._store._call("response_put", lambda: self._store._write(self._start, keys, args))

    async def heartbeat(self, response_id: str, lease_s: int = RUN_LEASE_S) -> str | None:
        """Renew a running response's lease; return its run state.

        ``in_progress``, ``cancel`` (a client cancelled it) or ``None`` (gone: deleted,
        or the lease ran out).
        """
        keys = self._keys(response_id)[1:]
        state = await self._store._call(
            "response_heartbeat", lambda: self._heartbeat(keys=keys, args=[lease_s])
        )
        return None if state is None else _text(state)

    async def finish_background(self, stored: StoredResponse) -> bool:
        """Write a background response's end.

        ``False`` (nothing written) when it no longer runs: cancelled or deleted meanwhile.
        """
        keys = self._keys(stored.response["id"])
        args = [stored.to_json(), self._store.ttl_s]
        done = await self._store._call(
            "response_put", lambda: self._store._write(self._finish, keys, args)
        )
        return int(done) == 1

    async def cancel(self, cancelled: StoredResponse) -> bool:
        """Mark a running background response cancelled (its replica stops it soon).

        ``False`` when it was not running (it ended first, or its replica stopped).
        """
        keys = self._keys(cancelled.response["id"])
        args = [cancelled.to_json(), self._store.ttl_s]
        done = await self._store._call(
            "response_put", lambda: self._store._write(self._cancel, keys, args)
        )
        return int(done) == 1

    async def get_running(self, response_id: str) -> tuple[StoredResponse | None, str | None]:
        """The response and its run state (see :meth:`heartbeat`), read together."""
        if not is_response_id(response_id):
            return None, None
        keys = self._keys(response_id)
        raw, state = await self._store._call("response_get", lambda: self._store.client.mget(keys))
        stored = None if raw is None else StoredResponse.from_json(raw)
        return stored, None if state is None else _text(state)

    async def chain(self, response_id: str) -> list[StoredResponse] | None:
        """The responses ``response_id`` continues, oldest first, itself last.

        ``None`` when ``response_id`` is unknown. A link that has expired or was deleted
        ends the chain there (the history starts after it).
        """
        newest = await self.get(response_id)
        if newest is None:
            return None
        chain = [newest]
        while (previous := chain[-1].previous_response_id) is not None:
            if len(chain) >= MAX_CHAIN:
                raise InvalidRequestError(
                    f"a previous_response_id chain may hold at most {MAX_CHAIN} responses",
                    param="previous_response_id",
                )
            earlier = await self.get(previous)
            if earlier is None:
                break
            chain.append(earlier)
        chain.reverse()
        return chain


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
