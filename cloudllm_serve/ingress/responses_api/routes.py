"""OpenAI's Responses API (``/v1/responses``) over :class:`CloudLLMService`.

Creating a response is vLLM's (:mod:`.serving`); keeping, reading, listing the input
items of and deleting one is ours, in Redis, per tenant: another tenant's id is an
unknown id (404, the same body).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from cloudllm_serve.ingress.dependencies import Admitted, Context, Service
from cloudllm_serve.ingress.item_lists import item_page
from cloudllm_serve.ingress.openai_api.routes import OPENAI_ERRORS, STREAM_DOC
from cloudllm_serve.ingress.openai_api.serving import BadBody, bad_body_response, read_json_body
from cloudllm_serve.ingress.responses_api.serving import (
    ResponseCall,
    ResponseNotFoundError,
    as_read,
    cancel_response,
    response_store,
)

router = APIRouter(prefix="/v1")


@router.post("/responses", responses={**OPENAI_ERRORS, **STREAM_DOC})
async def create_response(request: Request, service: Service, context: Context) -> Response:
    """Create a model response, answered by vLLM's own Responses serving layer.

    ``store`` (default true) keeps it in Redis for ``CONVERSATION_TTL_S``;
    ``previous_response_id`` continues a kept response on any replica.
    """
    try:
        body = await read_json_body(request)
    except BadBody as error:
        return bad_body_response(error)
    call = await ResponseCall.prepare(service, body, context)
    return await call.respond()


@router.get("/responses/{response_id}", responses=OPENAI_ERRORS)
async def get_response(response_id: str, service: Service, context: Admitted) -> JSONResponse:
    """A kept response, as it was answered (a background one: as it stands)."""
    stored, state = await response_store(service, context).get_running(response_id)
    if stored is None:
        raise ResponseNotFoundError(response_id)
    return JSONResponse(as_read(stored, state))


@router.post("/responses/{response_id}/cancel", responses=OPENAI_ERRORS)
async def cancel(response_id: str, service: Service, context: Context) -> JSONResponse:
    """Cancel a background response that is queued or in progress: it stops in the engine.

    Only background responses can be cancelled (400 for others, and for one that ended);
    cancelling a cancelled one answers it again. Not charged to the tenant's limits: the
    running response holds one of its ``max_concurrent_requests`` until it ends, and a
    tenant at its limit can still stop it.
    """
    return JSONResponse(await cancel_response(response_store(service, context), response_id))


@router.delete("/responses/{response_id}", responses=OPENAI_ERRORS)
async def delete_response(response_id: str, service: Service, context: Admitted) -> JSONResponse:
    """Delete a kept response.

    A chain that went through it starts after it; a background one still running stops.
    """
    if not await response_store(service, context).delete(response_id):
        raise ResponseNotFoundError(response_id)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


@router.get("/responses/{response_id}/input_items", responses=OPENAI_ERRORS)
async def list_input_items(
    response_id: str,
    service: Service,
    context: Admitted,
    limit: int = Query(20, ge=1, le=100),
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
) -> JSONResponse:
    """The input items a kept response was asked with, in OpenAI's list shape."""
    stored = await response_store(service, context).get(response_id)
    if stored is None:
        raise ResponseNotFoundError(response_id)
    items = [_listed(item) for item in stored.input]
    return JSONResponse(
        item_page(
            items,
            limit=limit,
            order=order,
            after=after,
            unknown_after=lambda unknown: ResponseNotFoundError(unknown, param="after"),
        )
    )


def _listed(item: dict[str, Any]) -> dict[str, Any]:
    """An input item as OpenAI lists it: a message's text content as ``input_text`` parts."""
    if item.get("type", "message") != "message" or not isinstance(item.get("content"), str):
        return item
    return {
        **item,
        "type": "message",
        "status": item.get("status", "completed"),
        "content": [{"type": "input_text", "text": item["content"]}],
    }
