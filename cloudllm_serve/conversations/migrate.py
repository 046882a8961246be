"""One-shot move of conversations stored before keys had hash tags (issue 34).

Before, a conversation's keys were ``{p}conv:<id>``, ``{p}conv:<id>:messages`` and
``{p}conv:<id>:images``, and a tenant's ``{p}conversations`` and ``{p}image_bytes``;
now the id and the tenant's prefix are Redis Cluster hash tags (see
:mod:`cloudllm_serve.conversations.store`). This copies every key of the old layout to
its new name (``DUMP``/``RESTORE``, the time to live kept) on the Redis the settings name
(one Redis, Sentinel's primary or a Redis Cluster), then deletes the old key::

    python -m cloudllm_serve.conversations.migrate --from redis://old-redis:6379/0

``--from`` defaults to ``REDIS_URL`` (a migration in place). Run it with the service
stopped: a turn written meanwhile under the old name would be missed. It can be run
again; a key already moved is not found under its old name.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

import redis

from cloudllm_serve.conversations.redis_connect import parse_host_ports
from cloudllm_serve.errors import SettingsError
from cloudllm_serve.settings import Settings, load_settings


def new_name(key: str, root: str) -> str | None:
    """The hash-tagged name of an old-layout ``key`` under ``root`` (``None``: not one)."""
    prefix = rf"(?P<p>{re.escape(root)}(?:t:[A-Za-z0-9._-]+:)?)"
    conversation = re.fullmatch(
        prefix + r"conv:(?P<id>[A-Za-z0-9_-]{1,128})(?P<rest>:messages|:images)?", key
    )
    if conversation:
        p, cid, rest = conversation.group("p", "id", "rest")
        return f"{p}conv:{{{cid}}}{rest or ''}"
    tenant = re.fullmatch(prefix + r"(?P<name>conversations|image_bytes)", key)
    if tenant:
        p, name = tenant.group("p", "name")
        return f"{p}{{{p.rstrip(':')}}}:{name}"
    return None


def target_client(settings: Settings) -> Any:
    """A synchronous client of the Redis the settings name."""
    options: dict[str, Any] = {"socket_timeout": settings.REDIS_TIMEOUT_S}
    if settings.REDIS_SENTINELS:
        sentinel = redis.Sentinel(parse_host_ports(settings.REDIS_SENTINELS), **options)
        return sentinel.master_for(settings.REDIS_SENTINEL_MASTER)
    if settings.REDIS_CLUSTER:
        return redis.RedisCluster.from_url(settings.REDIS_URL, **options)
    return redis.Redis.from_url(settings.REDIS_URL, **options)


def migrate(source: Any, target: Any, root: str = "cloudllm:", *, dry_run: bool = False) -> int:
    """Move every old-layout key under ``root`` from ``source`` to ``target``; return the count."""
    moved = 0
    for raw in source.scan_iter(match=f"{root}*", count=1000):
        key = raw.decode() if isinstance(raw, bytes) else raw
        renamed = new_name(key, root)
        if renamed is None:
            continue
        moved += 1
        if dry_run:
            continue
        dumped = source.dump(key)
        if dumped is None:  # expired meanwhile
            continue
        ttl = source.pttl(key)
        target.restore(renamed, max(ttl, 0), dumped, replace=True)
        source.delete(key)
    return moved


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", help="the Redis holding the old layout")
    parser.add_argument("--key-prefix", default="cloudllm:", help="the keys' root prefix")
    parser.add_argument("--dry-run", action="store_true", help="count, move nothing")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as error:
        print(error, file=sys.stderr)
        return 2
    target = target_client(settings)
    source = redis.Redis.from_url(args.source) if args.source else target
    moved = migrate(source, target, args.key_prefix, dry_run=args.dry_run)
    print(f"{'would move' if args.dry_run else 'moved'} {moved} keys")
    return 0


if __name__ == "__main__":
    sys.exit(main())
