"""The seed's API (SPEC §2): ``/health``, ``/generate``, conversations, ``/status/detailed``."""
