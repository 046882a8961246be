"""Tenants and their API keys: the key file, development keys, and authentication.

The key file (``API_KEYS_FILE``, YAML) holds only SHA-256 digests of keys::

    tenants:
      - id: acme                     # letters, digits, '.', '_', '-' (at most 64)
        keys:                        # several keys per tenant: rotate without downtime
          - {id: acme-2026-11, sha256: 9f86d0...}
        requests_per_minute: 600     # each limit optional: absent or 0 = unlimited
        tokens_per_minute: 200000
        max_concurrent_requests: 32
        max_conversations: 1000      # storage quotas: absent = the environment's default
        max_messages_per_conversation: 200   # (MAX_CONVERSATIONS, ...), 0 = unlimited
        max_image_bytes: 104857600
        admin: false                 # admin keys may read /status/detailed

``API_KEYS`` (comma-separated plaintext keys) is the development shortcut: one tenant
``default`` with no limits and admin rights. :class:`KeyRegistry` re-reads a changed
file at most :data:`RELOAD_CHECK_S` seconds after the change is first seen; a file that
no longer parses is reported and the previous tenants stay in force.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cloudllm_serve.errors import SettingsError
from cloudllm_serve.settings import Settings

logger = logging.getLogger(__name__)

#: How often (at most) the key file's modification time is looked at.
RELOAD_CHECK_S = 5.0
TENANT_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
DEV_TENANT = "default"
_LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "max_concurrent_requests")
#: Storage quotas: absent (``None``) means the environment's default, 0 unlimited.
_QUOTA_FIELDS = ("max_conversations", "max_messages_per_conversation", "max_image_bytes")


def key_digest(key: str) -> str:
    """The SHA-256 hex digest under which a key is stored."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    """A tenant: its limits (0 = unlimited) and whether its keys are admin keys.

    Its storage quotas are ``None`` where the key file leaves them to the environment
    (``MAX_CONVERSATIONS``, ``MAX_MESSAGES_PER_CONVERSATION``, ``MAX_IMAGE_BYTES``).
    """

    id: str
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    max_concurrent_requests: int = 0
    admin: bool = False
    max_conversations: int | None = None
    max_messages_per_conversation: int | None = None
    max_image_bytes: int | None = None

    @property
    def limited(self) -> bool:
        """Whether any limit applies."""
        return bool(
            self.requests_per_minute or self.tokens_per_minute or self.max_concurrent_requests
        )


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant and the id of the key used (never the key)."""

    tenant: Tenant
    key_id: str

    @property
    def tenant_id(self) -> str:
        """The tenant's id."""
        return self.tenant.id


@dataclass(frozen=True)
class _KeyEntry:
    digest: bytes
    key_id: str
    tenant: Tenant


@dataclass
class KeyTable:
    """Parsed tenants and key digests."""

    tenants: list[Tenant] = field(default_factory=list)
    entries: list[_KeyEntry] = field(default_factory=list)


def parse_key_file(data: Any, source: str) -> KeyTable:
    """Validate the key file's content; :class:`SettingsError` names what is wrong."""

    def fail(message: str) -> SettingsError:
        return SettingsError(f"{source}: {message}")

    if not isinstance(data, dict) or not isinstance(data.get("tenants"), list):
        raise fail("must be a mapping with a 'tenants' list")
    table = KeyTable()
    seen_tenants: set[str] = set()
    seen_digests: set[str] = set()
    for index, item in enumerate(data["tenants"]):
        where = f"tenants[{index}]"
        if not isinstance(item, dict):
            raise fail(f"{where} must be a mapping")
        unknown = set(item) - {"id", "keys", "admin", *_LIMIT_FIELDS, *_QUOTA_FIELDS}
        if unknown:
            raise fail(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
        tenant_id = item.get("id")
        if not isinstance(tenant_id, str) or not TENANT_ID.match(tenant_id):
            raise fail(f"{where}.id must be 1-64 letters, digits, '.', '_' or '-'")
        if tenant_id in seen_tenants:
            raise fail(f"{where}.id: tenant '{tenant_id}' appears twice")
        seen_tenants.add(tenant_id)
        limits = {}
        for name in _LIMIT_FIELDS:
            value = item.get(name) or 0
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise fail(f"{where}.{name} must be a whole number >= 0 (0: unlimited)")
            limits[name] = value
        quotas: dict[str, int | None] = {}
        for name in _QUOTA_FIELDS:
            value = item.get(name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 0
            ):
                raise fail(
                    f"{where}.{name} must be a whole number >= 0 (0: unlimited; "
                    "absent: the environment's default)"
                )
            quotas[name] = value
        admin = item.get("admin", False)
        if not isinstance(admin, bool):
            raise fail(f"{where}.admin must be true or false")
        tenant = Tenant(
            id=tenant_id,
            admin=admin,
            requests_per_minute=limits["requests_per_minute"],
            tokens_per_minute=limits["tokens_per_minute"],
            max_concurrent_requests=limits["max_concurrent_requests"],
            max_conversations=quotas["max_conversations"],
            max_messages_per_conversation=quotas["max_messages_per_conversation"],
            max_image_bytes=quotas["max_image_bytes"],
        )
        table.tenants.append(tenant)
        keys = item.get("keys")
        if not isinstance(keys, list) or not keys:
            raise fail(f"{where}.keys must be a non-empty list of {{id, sha256}}")
        for key_index, key in enumerate(keys):
            key_where = f"{where}.keys[{key_index}]"
            if not isinstance(key, dict) or set(key) != {"id", "sha256"}:
                raise fail(f"{key_where} must be {{id, sha256}}")
            key_id, digest = key["id"], key["sha256"]
            if not isinstance(key_id, str) or not TENANT_ID.match(key_id):
                raise fail(f"{key_where}.id must be 1-64 letters, digits, '.', '_' or '-'")
            if not isinstance(digest, str) or not SHA256_HEX.match(digest):
                raise fail(
                    f"{key_where}.sha256 must be 64 lowercase hex digits (the key's SHA-256; "
                    "python -m cloudllm_serve.keys new prints it)"
                )
            if digest in seen_digests:
                raise fail(f"{key_where}: the same key appears twice")
            seen_digests.add(digest)
            table.entries.append(_KeyEntry(bytes.fromhex(digest), key_id, tenant))
    return table


def dev_key_table(keys: str) -> KeyTable:
    """The table of ``API_KEYS``: tenant ``default`` (admin, no limits), keys ``dev-N``."""
    tenant = Tenant(id=DEV_TENANT, admin=True)
    entries = [
        _KeyEntry(bytes.fromhex(key_digest(key)), f"dev-{index}", tenant)
        for index, key in enumerate(k.strip() for k in keys.split(",") if k.strip())
    ]
    return KeyTable([tenant], entries)


class KeyRegistry:
    """Authenticates keys against the configured tenants; follows the key file's changes.

    ``enabled`` is false when no key is configured: every request is then let through
    as before, without a tenant.
    """

    def __init__(self, settings: Settings) -> None:
        self._path = Path(settings.API_KEYS_FILE) if settings.API_KEYS_FILE else None
        self._dev = (
            dev_key_table(settings.API_KEYS.get_secret_value()) if settings.API_KEYS else None
        )
        self.enabled = settings.auth_enabled
        self._file_table = KeyTable()
        self._file_stamp: tuple[float, int] | None = None
        self._checked_at = 0.0
        #: Times the key file was (re)loaded, and the last reload error, for status.
        self.loads = 0
        self.reload_error: str | None = None
        if self._path is not None:
            self._load(self._stamp(), initial=True)
            self._checked_at = time.monotonic()

    def _stamp(self) -> tuple[float, int]:
        assert self._path is not None
        try:
            info = os.stat(self._path)
        except OSError as error:
            raise SettingsError(
                f"API_KEYS_FILE={str(self._path)!r} cannot be read: {error.strerror}"
            ) from None
        return (info.st_mtime, info.st_size)

    def _load(self, stamp: tuple[float, int], *, initial: bool = False) -> None:
        assert self._path is not None
        source = f"API_KEYS_FILE={str(self._path)!r}"
        try:
            text = self._path.read_text()
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as error:
                raise SettingsError(f"{source}: not valid YAML ({error})") from None
            table = parse_key_file(data, source)
        except (OSError, SettingsError) as error:
            message = error.message if isinstance(error, SettingsError) else str(error)
            if initial:
                raise SettingsError(message) from None
            if message != self.reload_error:
                logger.error("key file not reloaded, the previous tenants stay: %s", message)
            self.reload_error = message
            self._file_stamp = stamp
            return
        self._file_table = table
        self._file_stamp = stamp
        self.reload_error = None
        self.loads += 1
        if not initial:
            logger.warning(
                "key file reloaded: %d tenant(s), %d key(s)", len(table.tenants), len(table.entries)
            )

    def refresh(self, now: float | None = None) -> None:
        """Re-read the key file if it changed (checked at most every RELOAD_CHECK_S)."""
        if self._path is None:
            return
        now = time.monotonic() if now is None else now
        if now - self._checked_at < RELOAD_CHECK_S:
            return
        self._checked_at = now
        try:
            stamp = self._stamp()
        except SettingsError as error:
            if error.message != self.reload_error:
                logger.error("key file not reloaded, the previous tenants stay: %s", error.message)
            self.reload_error = error.message
            return
        if stamp != self._file_stamp:
            self._load(stamp)

    @property
    def tenants(self) -> list[Tenant]:
        """Every configured tenant."""
        return [*self._file_table.tenants, *(self._dev.tenants if self._dev else [])]

    def authenticate(self, key: str) -> Principal | None:
        """The principal of ``key``, or ``None``.

        Every stored digest is compared (``hmac.compare_digest``, no early exit), so the
        time taken does not depend on which key, or which part of it, matched.
        """
        self.refresh()
        digest = hashlib.sha256(key.encode()).digest()
        found: _KeyEntry | None = None
        for table in (self._file_table, self._dev):
            if table is None:
                continue
            for entry in table.entries:
                if hmac.compare_digest(entry.digest, digest) and found is None:
                    found = entry
        return Principal(found.tenant, found.key_id) if found is not None else None
