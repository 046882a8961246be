"""The prefix-cache salt of a request: derived from its tenant, never chosen by a client.

vLLM's prefix cache is shared by every request an engine replica serves: a prompt whose
leading blocks are cached starts sooner, so without a salt a tenant could tell from its
own time to first token whether another tenant sent a given text. vLLM keys the first
block of a prompt by its ``cache_salt`` too (and every later block hangs off the first),
so requests with different salts never share a cached block.

Every request that reaches an engine gets :func:`cache_salt` of its tenant: ``/generate``,
``/vision`` and ``/multimodal`` on the ``GenerationRequest``, ``/v1`` in the body vLLM
validates. All keys of a tenant, and both APIs, share the tenant's cache. Without keys
there is one tenant, so one salt (the same caching as none).

A ``/v1`` client may send vLLM's ``cache_salt`` to divide its cache further (one per end
user, say): it is checked as vLLM checks it, then mixed into the tenant's salt, so it
separates within the tenant and can never select another tenant's cache, not even by
sending that tenant's salt.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from cloudllm_serve.errors import InvalidRequestError

#: vLLM's rules for a ``cache_salt`` (``validate_cache_salt``): at most this long...
MAX_CLIENT_SALT_CHARS = 128
#: ...and none of these characters.
_FORBIDDEN = frozenset("@/\\\0")


def cache_salt(tenant_id: str | None, client_salt: str | None = None) -> str:
    """The salt of ``tenant_id``'s requests (``None``: keys off), with a client's own part.

    64 hex characters (what vLLM accepts). The tenant and the client's part are encoded
    unambiguously before hashing, so no client part of one tenant gives another's salt.
    """
    encoded = json.dumps(["cloudllm-cache-salt", tenant_id, client_salt])
    return hashlib.sha256(encoded.encode()).hexdigest()


def client_cache_salt(value: Any) -> str | None:
    """A ``/v1`` body's ``cache_salt`` if it is one vLLM would take; else a 400 naming it."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(
            "Parameter 'cache_salt' must be a non-empty string if provided.", param="cache_salt"
        )
    if len(value) > MAX_CLIENT_SALT_CHARS or not _FORBIDDEN.isdisjoint(value):
        raise InvalidRequestError(
            f"Parameter 'cache_salt' must be at most {MAX_CLIENT_SALT_CHARS} characters and "
            "must not contain '@', '/', '\\', or NUL.",
            param="cache_salt",
        )
    return value
