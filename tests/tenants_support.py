"""Tenants, keys and key files shared by the HTTP-layer and stack tests of API keys."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import yaml

from cloudllm_serve.keys import key_digest
from cloudllm_serve.keys.__main__ import new_key


@dataclass(frozen=True)
class TenantKeys:
    """Every key made for a test: tenant id -> its keys (plaintext, only in the test)."""

    keys: dict[str, list[str]]

    def key(self, tenant: str, index: int = 0) -> str:
        return self.keys[tenant][index]

    def auth(self, tenant: str, index: int = 0) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key(tenant, index)}"}

    def all_keys(self) -> list[str]:
        return [key for keys in self.keys.values() for key in keys]


#: The tenants of the tests: two plain ones (A with two keys), an admin, and one per limit.
TENANTS: list[dict[str, Any]] = [
    {"id": "tenant-a", "keys": 2},
    {"id": "tenant-b", "keys": 1},
    {"id": "ops", "keys": 1, "admin": True},
    {"id": "rpm-3", "keys": 1, "requests_per_minute": 3},
    {"id": "tpm-100", "keys": 1, "tokens_per_minute": 100},
    {"id": "conc-1", "keys": 1, "max_concurrent_requests": 1},
]


def write_key_file(path: Path, tenants: list[dict[str, Any]] = TENANTS) -> TenantKeys:
    """Write a key file (digests only) for ``tenants``; return the plaintext keys."""
    keys: dict[str, list[str]] = {}
    entries = []
    for spec in tenants:
        made = [new_key() for _ in range(spec["keys"])]
        keys[spec["id"]] = made
        entry = {k: v for k, v in spec.items() if k != "keys"}
        entry["keys"] = [
            {"id": f"{spec['id']}-k{index}", "sha256": key_digest(key)}
            for index, key in enumerate(made)
        ]
        entries.append(entry)
    path.write_text(yaml.safe_dump({"tenants": entries}, sort_keys=False))
    return TenantKeys(keys)


def redis_dump(client: redis.Redis, pattern: str = "*") -> list[str]:
    """Every key matching ``pattern`` and every value it holds, as text (to scan for secrets)."""
    dump: list[str] = []
    for key in client.scan_iter(pattern):
        kind = client.type(key)
        if kind == "string":
            dump.append(str(client.get(key)))
        elif kind == "hash":
            dump.append(json.dumps(client.hgetall(key)))
        elif kind == "list":
            dump.extend(client.lrange(key, 0, -1))
        elif kind == "zset":
            dump.extend(client.zrange(key, 0, -1))
        dump.append(key)
    return dump
