"""Per-tenant rate limits, shared by every ingress replica through Redis.

Three limits per tenant (each optional, see :class:`~cloudllm_serve.keys.Tenant`):
requests per minute, tokens per minute and concurrent requests. Minutes are fixed
windows of Redis's clock (``TIME``), so every ingress replica counts in the same
window. A generation is admitted by one Lua script, one round trip: it checks the
three limits and, only when all pass, counts the request, charges its token estimate
(prompt estimate plus ``max_tokens``) and holds a concurrency slot (an entry of a
sorted set scored by its lease's end, so a crashed replica's slots lapse by
themselves). After the answer is sent, :meth:`RateLimiter.settle` charges the tokens
used instead of the estimate (in the window charged; once that has passed, what the
estimate left out goes to the current one) and frees the slot (a second round trip, off
the request's path, made only when the tenant has a token or concurrency limit).

Keys: ``{p}rl:{<tenant>}`` (hash: window, requests, tokens) and
``{p}rl:{<tenant>}:inflight`` (sorted set); the braces are a Redis Cluster hash tag, so
both keys of a tenant share a slot and each script touches one (``REDIS_CLUSTER``).

While Redis is down, stateless requests are limited in this replica's memory with
each limit divided by the number of ingress replicas, and those decisions are counted
(``fallback_decisions``); a request that needs Redis anyway fails with its 503.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from cloudllm_serve.conversations.redis_connect import RedisClient
from cloudllm_serve.conversations.store import store_error
from cloudllm_serve.errors import RateLimitError
from cloudllm_serve.keys import Principal, Tenant

logger = logging.getLogger(__name__)

WINDOW_S = 60.0
#: Retry-After of a refusal for concurrency: a slot frees when a request ends.
CONCURRENCY_RETRY_S = 1.0

#: The time: Redis's clock, or the limiter's own (``ARGV[n]`` not empty, in tests).
_NOW = """
local function clock(given)
  if given ~= '' then return tonumber(given) end
  local parts = redis.call('TIME')
  return tonumber(parts[1]) + tonumber(parts[2]) / 1000000
end
"""

_ADMIT_SCRIPT = (
    _NOW
    + """
local now = clock(ARGV[8])
local rpm, tpm, conc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens, lease, window_s = tonumber(ARGV[4]), tonumber(ARGV[6]), tonumber(ARGV[7])
local window = math.floor(now / window_s)
local reset = (window + 1) * window_s - now
local r, t = 0, 0
if tonumber(redis.call('HGET', KEYS[1], 'w') or '-1') == window then
  r = tonumber(redis.call('HGET', KEYS[1], 'r') or '0')
  t = tonumber(redis.call('HGET', KEYS[1], 't') or '0')
end
local inflight = 0
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  inflight = redis.call('ZCARD', KEYS[2])
end
local reason = ''
if rpm > 0 and r + 1 > rpm then reason = 'requests'
elseif tpm > 0 and tokens > tpm then reason = 'tokens_never_fit'
elseif tpm > 0 and t + tokens > tpm then reason = 'tokens'
elseif conc > 0 and inflight + 1 > conc then reason = 'concurrency'
end
if reason == '' then
  r = r + 1
  t = t + tokens
  redis.call('HSET', KEYS[1], 'w', window, 'r', r, 't', t)
  redis.call('EXPIRE', KEYS[1], math.ceil(window_s * 2))
  if conc > 0 then
    redis.call('ZADD', KEYS[2], now + lease, ARGV[5])
    redis.call('EXPIRE', KEYS[2], math.ceil(lease) + 1)
  end
end
return {reason, r, t, window, tostring(reset)}
"""
)

_SETTLE_SCRIPT = (
    _NOW
    + """
local charged, delta, window_s = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[5])
local window = math.floor(clock(ARGV[4]) / window_s)
local held = tonumber(redis.call('HGET', KEYS[1], 'w') or '-1')
if delta ~= 0 and window == charged then
  if held == charged and redis.call('HINCRBY', KEYS[1], 't', delta) < 0 then
    redis.call('HSET', KEYS[1], 't', 0)
  end
elseif delta > 0 then
  -- The window charged has passed: what the estimate left out goes to this one.
  if held == window then
    redis.call('HINCRBY', KEYS[1], 't', delta)
  else
    redis.call('HSET', KEYS[1], 'w', window, 'r', 0, 't', delta)
    redis.call('EXPIRE', KEYS[1], math.ceil(window_s * 2))
  end
end
redis.call('ZREM', KEYS[2], ARGV[3])
return 1
"""
)


def go_duration(seconds: float) -> str:
    """A duration as OpenAI's ``x-ratelimit-reset-*`` headers write it: ``17ms``, ``6m0s``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    secs = f"{rest:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{secs}s" if minutes else f"{secs}s"


@dataclass
class Admission:
    """One admitted request: what it was charged, and the counts for the headers."""

    tenant: Tenant
    request_id: str
    window: int
    charged_tokens: int
    requests_used: int
    tokens_used: int
    reset_s: float
    in_memory: bool = False

    @property
    def needs_settling(self) -> bool:
        """Whether :meth:`RateLimiter.settle` has anything to do."""
        return bool(self.tenant.tokens_per_minute or self.tenant.max_concurrent_requests)

    def headers(self) -> list[tuple[str, str]]:
        """OpenAI's ``x-ratelimit-*`` headers for the limits the tenant has."""
        return limit_headers(self.tenant, self.requests_used, self.tokens_used, self.reset_s)


def limit_headers(
    tenant: Tenant, requests_used: int, tokens_used: int, reset_s: float
) -> list[tuple[str, str]]:
    """``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` for ``tenant``'s limits."""
    headers = []
    for kind, limit, used in (
        ("requests", tenant.requests_per_minute, requests_used),
        ("tokens", tenant.tokens_per_minute, tokens_used),
    ):
        if limit:
            headers += [
                (f"x-ratelimit-limit-{kind}", str(limit)),
                (f"x-ratelimit-remaining-{kind}", str(max(0, limit - used))),
                (f"x-ratelimit-reset-{kind}", go_duration(reset_s)),
            ]
    return headers


class RateLimited(RateLimitError):
    """A refusal by the limiter, with the counts for the ``x-ratelimit-*`` headers."""

    def __init__(
        self, tenant: Tenant, reason: str, requests_used: int, tokens_used: int, reset_s: float
    ) -> None:
        limits = {
            "requests": f"requests per minute ({tenant.requests_per_minute})",
            "tokens": f"tokens per minute ({tenant.tokens_per_minute})",
            "concurrency": f"concurrent requests ({tenant.max_concurrent_requests})",
        }
        if reason == "tokens_never_fit":
            message = (
                f"Request too large for tenant '{tenant.id}': its prompt and max_tokens need more "
                f"than the limit of tokens per minute ({tenant.tokens_per_minute}); lower "
                "max_tokens or shorten the prompt"
            )
            retry_after: float | None = None
        else:
            retry_after = CONCURRENCY_RETRY_S if reason == "concurrency" else reset_s
            message = (
                f"Rate limit reached for tenant '{tenant.id}' on {limits[reason]}; "
                f"retry in {go_duration(retry_after)}"
            )
        super().__init__(message, reason=reason, retry_after_s=retry_after)
        self.limit_headers = limit_headers(tenant, requests_used, tokens_used, reset_s)


@dataclass
class _MemoryWindow:
    window: int = -1
    requests: int = 0
    tokens: int = 0
    inflight: dict[str, float] = field(default_factory=dict)


class RateLimiter:
    """Admits generations against their tenant's limits (see the module docstring)."""

    def __init__(
        self,
        client: RedisClient,
        *,
        key_prefix: str,
        lease_s: float,
        ingress_replicas: int = 1,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._admit = client.register_script(_ADMIT_SCRIPT)
        self._settle = client.register_script(_SETTLE_SCRIPT)
        self._prefix = key_prefix
        self.lease_s = lease_s
        self.window_s = window_s
        self.ingress_replicas = ingress_replicas
        #: The time windows are counted in (Unix seconds); ``None``: Redis's clock.
        self.clock = clock
        self._memory: dict[str, _MemoryWindow] = {}
        #: Decisions made in memory because Redis was down, and Redis round trips made
        #: (``/status/detailed``).
        self.fallback_decisions = 0
        self.round_trips = 0
        #: Requests refused here, by the limit they hit (``/status/detailed``).
        self.refused: dict[str, int] = {}

    def _keys(self, tenant_id: str) -> list[str]:
        base = f"{self._prefix}rl:{{{tenant_id}}}"
        return [base, f"{base}:inflight"]

    async def admit(
        self, principal: Principal, *, tokens: int, request_id: str, stateless: bool
    ) -> Admission | None:
        """Count the request and charge ``tokens``, or raise :class:`RateLimited` (429).

        ``request_id`` names the concurrency slot: an id the server made for this request
        alone (requests sharing one would share a slot), never the client's ``X-Request-Id``.
        ``None`` when the tenant has no limit (no round trip). ``stateless`` requests
        fall back to in-memory limits while Redis is down; others get a 503.
        """
        tenant = principal.tenant
        if not tenant.limited:
            return None
        args: list[str | int | float] = [
            tenant.requests_per_minute,
            tenant.tokens_per_minute,
            tenant.max_concurrent_requests,
            tokens,
            request_id,
            self.lease_s,
            self.window_s,
            self._now_arg(),
        ]
        self.round_trips += 1
        try:
            reason, requests_used, tokens_used, window, reset = await self._admit(
                keys=self._keys(tenant.id), args=args
            )
        except (RedisError, OSError) as error:
            if not stateless:
                raise store_error(error) from None
            return self._admit_in_memory(tenant, tokens, request_id)
        reset_s = float(reset)
        if reason:
            raise self._refusal(
                RateLimited(tenant, str(reason), int(requests_used), int(tokens_used), reset_s)
            )
        return Admission(
            tenant, request_id, int(window), tokens, int(requests_used), int(tokens_used), reset_s
        )

    def _refusal(self, refusal: RateLimited) -> RateLimited:
        """``refusal``, counted in :attr:`refused`."""
        self.refused[refusal.reason] = self.refused.get(refusal.reason, 0) + 1
        return refusal

    def _now_arg(self) -> str:
        """The time for a script: the limiter's clock, or empty (Redis's clock)."""
        return "" if self.clock is None else repr(self.clock())

    def _admit_in_memory(self, tenant: Tenant, tokens: int, request_id: str) -> Admission:
        """The same decision against this replica's share of each limit."""
        self.fallback_decisions += 1
        now = self.clock() if self.clock is not None else time.time()
        window = math.floor(now / self.window_s)
        reset_s = (window + 1) * self.window_s - now
        state = self._memory.setdefault(tenant.id, _MemoryWindow())
        if state.window != window:
            state.window, state.requests, state.tokens = window, 0, 0
        state.inflight = {rid: end for rid, end in state.inflight.items() if end > now}

        def share(limit: int) -> int:
            return max(1, limit // self.ingress_replicas) if limit else 0

        local = Tenant(
            tenant.id,
            share(tenant.requests_per_minute),
            share(tenant.tokens_per_minute),
            share(tenant.max_concurrent_requests),
            tenant.admin,
        )
        reason = ""
        if local.requests_per_minute and state.requests + 1 > local.requests_per_minute:
            reason = "requests"
        elif local.tokens_per_minute and tokens > tenant.tokens_per_minute:
            reason = "tokens_never_fit"
        elif local.tokens_per_minute and state.tokens + tokens > local.tokens_per_minute:
            reason = "tokens"
        elif (
            local.max_concurrent_requests
            and len(state.inflight) + 1 > local.max_concurrent_requests
        ):
            reason = "concurrency"
        if reason:
            raise self._refusal(RateLimited(local, reason, state.requests, state.tokens, reset_s))
        state.requests += 1
        state.tokens += tokens
        if local.max_concurrent_requests:
            state.inflight[request_id] = now + self.lease_s
        return Admission(
            local, request_id, window, tokens, state.requests, state.tokens, reset_s, True
        )

    async def settle(self, admission: Admission, tokens_used: int) -> None:
        """Charge ``tokens_used`` instead of the estimate and free the concurrency slot.

        In the window the estimate was charged to; once that window has passed, only
        what the estimate left out is charged, to the current window (a passed window's
        overcharge is not refunded into a new one, where it would raise the limit).
        """
        delta = tokens_used - admission.charged_tokens
        if admission.in_memory:
            state = self._memory.get(admission.tenant.id)
            if state is not None:
                self._settle_in_memory(state, admission.window, delta)
                state.inflight.pop(admission.request_id, None)
            return
        if not admission.needs_settling:
            return
        self.round_trips += 1
        try:
            await self._settle(
                keys=self._keys(admission.tenant.id),
                args=[
                    admission.window,
                    delta if admission.tenant.tokens_per_minute else 0,
                    admission.request_id,
                    self._now_arg(),
                    self.window_s,
                ],
            )
        except (RedisError, OSError) as error:
            # The slot lapses with its lease; the estimate stays charged.
            logger.warning("rate limit not settled for tenant %s: %s", admission.tenant.id, error)

    def _settle_in_memory(self, state: _MemoryWindow, charged: int, delta: int) -> None:
        """:meth:`settle`'s token adjustment, on this replica's own count."""
        now = self.clock() if self.clock is not None else time.time()
        window = math.floor(now / self.window_s)
        if window == charged:
            if state.window == charged:
                state.tokens = max(0, state.tokens + delta)
        elif delta > 0:
            if state.window != window:
                state.window, state.requests, state.tokens = window, 0, 0
            state.tokens += delta
