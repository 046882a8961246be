"""Stored responses of ``/v1/responses`` (OpenAI's Responses API) in Redis.

Layout, beside the conversations (:mod:`cloudllm_serve.conversations.store`), under the
same prefix (a tenant's own, ``{p}t:{tenant}:``, with API keys on):

* ``{p}resp:{<id>}``  a JSON string: the response as the client got it (``response``),
  the input items it was asked with (``input``, ids added), the ``previous_response_id``
  it continued and the engine replica that answered it (``engine_replica``).

The braces are a Redis Cluster hash tag: one key, one slot. A response expires after
``CONVERSATION_TTL_S`` (0: kept until deleted). Writes go through the conversation store's
write path, so ``REDIS_MIN_REPLICAS_ACK`` applies to them as it does to turns. A chain of
responses is read by following ``previous_response_id`` one key (one round trip) at a
time, at most :data:`MAX_CHAIN` deep.
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

# KEYS: the response. ARGV: the record, retention in seconds (0: none).
_PUT_SCRIPT = """
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
return 1
"""
# KEYS: the response. Returns 1 when deleted, 0 when there was none.
_DELETE_SCRIPT = "return redis.call('DEL', KEYS[1])"


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

    def _key(self, response_id: str) -> str:
        # The tenant's prefix, as the conversation store keys it (one rule, one place).
        return f"{self._store._prefix}resp:{{{response_id}}}"

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
        key = self._key(response_id)
        deleted = await self._store._call(
            "response_delete", lambda: self._store._write(self._delete, [key], [])
        )
        return int(deleted) == 1

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
