"""The ingress's ASGI app: both API surfaces, error handlers, access control and limits."""

from __future__ import annotations

from fastapi import FastAPI

from cloudllm_serve import __version__
from cloudllm_serve.ingress.access import AccessMiddleware
from cloudllm_serve.ingress.audit import AuditLog
from cloudllm_serve.ingress.conversations_api.routes import router as conversations_router
from cloudllm_serve.ingress.docs import install_offline_docs
from cloudllm_serve.ingress.errors import install_error_handlers
from cloudllm_serve.ingress.middleware import RequestLimitsMiddleware, image_body_limit
from cloudllm_serve.ingress.openai_api.routes import router as openai_router
from cloudllm_serve.ingress.responses_api.routes import router as responses_router
from cloudllm_serve.ingress.seed_api.routes import router as seed_router
from cloudllm_serve.ingress.seed_api.status import HealthCheck
from cloudllm_serve.ingress.service import CloudLLMService


def create_app(service: CloudLLMService) -> FastAPI:
    """The FastAPI app serving the seed API and the OpenAI API over ``service``."""
    app = FastAPI(
        title="CloudLLM Serve",
        version=__version__,
        description="The CloudLLM API and an OpenAI-compatible API on vLLM, Ray Serve and Redis.",
        docs_url=None,
        redoc_url=None,
    )
    install_offline_docs(app)
    app.state.service = service
    app.state.health = HealthCheck(service)
    app.include_router(seed_router)
    app.include_router(openai_router)
    app.include_router(responses_router)
    app.include_router(conversations_router)
    install_error_handlers(app)
    app.add_middleware(
        RequestLimitsMiddleware,
        max_body_bytes=service.settings.MAX_UPLOAD_BYTES,
        image_body_bytes=image_body_limit(service.settings),
        body_timeout_s=service.settings.REQUEST_BODY_TIMEOUT_S,
    )
    # Outermost: a request without a valid key goes no further than this.
    app.add_middleware(
        AccessMiddleware,
        registry=service.registry,
        limiter=service.limiter,
        audit=AuditLog(service.settings.AUDIT_LOG, replica=service.replica_id or None),
        metrics=service.metrics,
        # Serve answers X-Request-Id itself (the id it took from the request or made).
        add_request_id=not service.replica_id,
    )
    return app
