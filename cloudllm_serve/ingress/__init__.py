"""The HTTP ingress: FastAPI routes, schemas and the service logic behind them.

Only this package imports FastAPI; it reaches the engines through an
:class:`~cloudllm_serve.engine.protocol.EngineClient`.
"""
