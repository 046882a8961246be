"""FastAPI dependencies every API's routes share: the service, the caller, the charge.

The seed API, ``/v1`` and ``/v1/responses`` routes all take them from here.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from cloudllm_serve.ingress.context import RequestContext, context_of, request_context
from cloudllm_serve.ingress.service import CloudLLMService


async def get_service(request: Request) -> CloudLLMService:
    """The service this app was built with (``async``: see ``context.request_context``)."""
    service: CloudLLMService = request.app.state.service
    return service


Service = Annotated[CloudLLMService, Depends(get_service)]
#: The caller (tenant, key) and what the request was charged; see ``ingress.context``.
Context = Annotated[RequestContext, Depends(request_context)]


async def charge_request(service: CloudLLMService, context: RequestContext) -> None:
    """Count a request that generates nothing against the tenant's limits."""
    await service.admit(context, prompt_chars=0, max_tokens=0, stateless=True, generation=False)


async def admitted(request: Request, service: Service) -> RequestContext:
    """Dependency of every protected route that generates nothing: :func:`charge_request`.

    Generations are charged by their own handlers, with their token estimates.
    """
    context = context_of(request.scope)
    await charge_request(service, context)
    return context


Admitted = Annotated[RequestContext, Depends(admitted)]
