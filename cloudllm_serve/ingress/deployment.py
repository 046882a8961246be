"""The ingress deployment: the FastAPI app of :mod:`.routes` on a Serve replica.

The app is built on the replica after the constructor (``__serve_build_asgi_app__``),
so routes stay plain FastAPI functions over an injected service.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from ray import serve

from cloudllm_serve.autoscaling import REFUSED_DEMAND_METRIC
from cloudllm_serve.conversations.store import ConversationStore
from cloudllm_serve.heap import settle_heap
from cloudllm_serve.ingress.app import create_app
from cloudllm_serve.ingress.engine_client import ServeEngineClient
from cloudllm_serve.ingress.service import CloudLLMService
from cloudllm_serve.settings import Settings


@serve.ingress()
class Ingress:
    """HTTP front door: the seed's API, conversations in Redis, engines behind a handle."""

    def __init__(self, engine: Any, settings: Settings) -> None:
        store = ConversationStore.from_settings(settings)
        context = serve.get_replica_context()
        client = ServeEngineClient(engine, settings, app_name=context.app_name)
        self._service = CloudLLMService(settings, store, client)
        client.on_retry = lambda _replica: self._service.metrics.engine_retries.add()
        client.on_resume = lambda outcome: self._service.metrics.stream_resumes.add(outcome=outcome)
        self._service.replica_id = context.replica_id.unique_id

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics: the requests refused here lately.

        :func:`cloudllm_serve.autoscaling.scale_on_demand` adds them to the engines'
        demand, so a flood that deadline admission refuses still adds engine replicas.
        """
        return {REFUSED_DEMAND_METRIC: float(self._service.admission.refused_demand())}

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = create_app(self._service)
        # Start-up objects to the permanent generation: full collections then walk only
        # what requests allocate, and fewer of them run.
        settle_heap()
        return app
