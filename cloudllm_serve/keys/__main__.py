"""Make an API key: ``python -m cloudllm_serve.keys new --tenant ID [--key-id ID]``.

Prints the key once (it is not stored anywhere) and the entry to paste into the key
file (``API_KEYS_FILE``), which holds only the key's SHA-256 digest.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time

import yaml

from cloudllm_serve.keys.registry import TENANT_ID, key_digest

KEY_PREFIX = "sk-cllm-"


def new_key() -> str:
    """A new random key: 256 bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_file_entry(tenant: str, key_id: str, key: str) -> str:
    """The key file's YAML for one tenant with this one key."""
    entry = {"tenants": [{"id": tenant, "keys": [{"id": key_id, "sha256": key_digest(key)}]}]}
    return yaml.safe_dump(entry, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m cloudllm_serve.keys", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser("new", help="print a new key and its key-file entry")
    new.add_argument("--tenant", required=True, help="tenant id (letters, digits, . _ -)")
    new.add_argument("--key-id", help="a name for the key (default: <tenant>-<date>-<random>)")
    args = parser.parse_args(argv)
    key_id = args.key_id or f"{args.tenant}-{time.strftime('%Y%m%d')}-{secrets.token_hex(3)}"
    for name, value in (("--tenant", args.tenant), ("--key-id", key_id)):
        if not TENANT_ID.match(value):
            parser.error(f"{name} must be 1-64 letters, digits, '.', '_' or '-' (got {value!r})")
    key = new_key()
    print(f"API key (shown once; give it to the tenant, it is stored nowhere):\n\n  {key}\n")
    print("Key file entry (add the key to the tenant's 'keys' if the tenant exists):\n")
    print(key_file_entry(args.tenant, key_id, key), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
