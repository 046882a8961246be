"""CloudLLM Serve: the CloudLLM HTTP API on Ray Serve, vLLM and Redis.

The serve config's import path is :func:`cloudllm_serve.app.build_app`.
"""

__version__ = "0.1.0"
