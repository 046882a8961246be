"""API keys and tenants (docs/security.md); ``python -m cloudllm_serve.keys`` makes keys."""

from cloudllm_serve.keys.registry import KeyRegistry, Principal, Tenant, key_digest

__all__ = ["KeyRegistry", "Principal", "Tenant", "key_digest"]
