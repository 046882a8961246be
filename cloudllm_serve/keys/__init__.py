"""API keys and tenants (README "Security"); ``python -m cloudllm_serve.keys`` makes keys."""

from cloudllm_serve.keys.registry import KeyRegistry, Principal, Tenant, key_digest

__all__ = ["KeyRegistry", "Principal", "Tenant", "key_digest"]
