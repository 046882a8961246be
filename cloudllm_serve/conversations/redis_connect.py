"""The Redis client of the store and the rate limiter: one Redis, Sentinel, or a Redis Cluster.

- **One Redis** (``REDIS_URL``): :func:`redis_client`.
- **Sentinel** (``REDIS_SENTINELS`` + ``REDIS_SENTINEL_MASTER``): redis-py's
  :class:`~redis.asyncio.sentinel.Sentinel` and ``master_for``; every new connection asks
  the sentinels where the primary is, so after a failover the client follows the new
  primary by itself. ``REDIS_URL``'s user, password and database apply to the primary
  (its host and port are not used).
- **Redis Cluster** (``REDIS_CLUSTER=true``): redis-py's
  :class:`~redis.asyncio.cluster.RedisCluster` with ``REDIS_URL`` as the seed node; it
  learns the other nodes and follows slot moves and failovers itself.

Every client connects lazily, with the same bounded timeouts, so building one never
waits for Redis and a dead Redis costs a request at most ``REDIS_TIMEOUT_S``. One Redis
and Sentinel use redis-py's blocking pool: past ``REDIS_MAX_CONNECTIONS`` a call waits
for a free connection (redis-py's default pool refuses it, "Too many connections", which
a flood of a few hundred requests reaches). redis-py's cluster client has no blocking
pool: there ``REDIS_MAX_CONNECTIONS`` per node is a hard cap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

from redis import asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

#: The client of any topology: both have the same commands and ``register_script``.
RedisClient = aioredis.Redis | RedisCluster

#: redis-py's own default pool size.
DEFAULT_MAX_CONNECTIONS = 100


class BlockingSentinelConnectionPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's pool (finds the primary) that waits for a free connection when full."""


def _retry_once() -> Retry:
    """Retry a broken connection once, never a timeout.

    For a pooled socket that Redis closed when it restarted; retrying a frozen Redis would
    double the time a request waits before its 503 (redis-py retries timeouts by default).
    """
    return Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))


def redis_client(
    url: str, *, timeout_s: float, max_connections: int = DEFAULT_MAX_CONNECTIONS
) -> aioredis.Redis:
    """A lazily connecting client of one Redis with bounded timeouts and one quick retry."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=_retry_once(),
        health_check_interval=30,
    )
    client: aioredis.Redis = aioredis.Redis.from_pool(pool)
    return client


def parse_host_ports(value: str) -> list[tuple[str, int]]:
    """``host:port,host:port`` as pairs; :class:`ValueError` naming the bad entry."""
    pairs = []
    for entry in (item.strip() for item in value.split(",")):
        if not entry:
            continue
        host, sep, port = entry.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"{entry!r} is not host:port (port 1-65535)")
        pairs.append((host, int(port)))
    if not pairs:
        raise ValueError("no sentinel named (comma-separated host:port)")
    return pairs


def sentinel_client(
    sentinels: list[tuple[str, int]],
    master: str,
    url: str,
    *,
    timeout_s: float,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> aioredis.Redis:
    """A client of the primary that ``sentinels`` name ``master`` (see the module docstring)."""
    parsed = urlparse(url)
    options: dict[str, Any] = {}
    if parsed.username:
        options["username"] = unquote(parsed.username)
    if parsed.password:
        options["password"] = unquote(parsed.password)
    database = parsed.path.lstrip("/")
    sentinel = Sentinel(
        sentinels,
        # A sentinel that does not answer is skipped for the next one: each may take
        # this long, so keep it well under the request's own timeout.
        sentinel_kwargs={"socket_timeout": timeout_s / 3, "socket_connect_timeout": timeout_s / 3},
    )
    client: aioredis.Redis = sentinel.master_for(
        master,
        connection_pool_class=BlockingSentinelConnectionPool,
        max_connections=max_connections,
        timeout=timeout_s,
        db=int(database) if database.isdigit() else 0,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=_retry_once(),
        health_check_interval=30,
        **options,
    )
    return client


def cluster_client(
    url: str, *, timeout_s: float, max_connections: int = DEFAULT_MAX_CONNECTIONS
) -> RedisCluster:
    """A client of the Redis Cluster that ``url`` (one node) belongs to."""
    # Cluster-level retries follow a failover: the client re-reads the slot map and
    # sends again (a write script may then run twice: REDIS_MIN_REPLICAS_ACK's path
    # sends its writes itself, once).
    return RedisCluster.from_url(
        url,
        max_connections=max_connections,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 2),
    )


@dataclass(frozen=True)
class RedisTopology:
    """Where the store's Redis is: the settings ``REDIS_*`` as one value."""

    url: str
    timeout_s: float
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    sentinels: str = ""
    sentinel_master: str = ""
    cluster: bool = False

    @classmethod
    def from_settings(cls, settings: Any) -> RedisTopology:
        """The topology a :class:`~cloudllm_serve.settings.Settings` names."""
        return cls(
            url=settings.REDIS_URL,
            timeout_s=settings.REDIS_TIMEOUT_S,
            sentinels=settings.REDIS_SENTINELS,
            sentinel_master=settings.REDIS_SENTINEL_MASTER,
            cluster=settings.REDIS_CLUSTER,
        )

    def client(self) -> RedisClient:
        """A new lazily connecting client of this topology."""
        if self.sentinels:
            return sentinel_client(
                parse_host_ports(self.sentinels),
                self.sentinel_master,
                self.url,
                timeout_s=self.timeout_s,
                max_connections=self.max_connections,
            )
        if self.cluster:
            return cluster_client(
                self.url, timeout_s=self.timeout_s, max_connections=self.max_connections
            )
        return redis_client(
            self.url, timeout_s=self.timeout_s, max_connections=self.max_connections
        )
