"""The seed's API (docs/api.md): ``/health``, ``/generate``, conversations, ``/status/detailed``."""
