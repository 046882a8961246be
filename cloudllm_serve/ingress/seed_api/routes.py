"""The seed's HTTP endpoints (docs/api.md) over a :class:`CloudLLMService`."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from cloudllm_serve.ingress.context import RequestContext
from cloudllm_serve.ingress.dependencies import Admitted, Context, Service, charge_request
from cloudllm_serve.ingress.errors import ErrorResponses
from cloudllm_serve.ingress.middleware import RECEIVED_AT
from cloudllm_serve.ingress.seed_api import status
from cloudllm_serve.ingress.seed_api.generation import GenerateCall
from cloudllm_serve.ingress.seed_api.image_input import (
    MultimodalRequest,
    RawImage,
    VisionRequest,
    openapi_body,
    read_image_request,
)
from cloudllm_serve.ingress.seed_api.schemas import (
    ConversationDeleted,
    ConversationDetail,
    ConversationList,
    ConversationSummary,
    GenerateRequest,
    GenerationResponse,
    HealthResponse,
    MessageOut,
)
from cloudllm_serve.ingress.service import CloudLLMService
from cloudllm_serve.ingress.sse import SSE_HEADERS, SSE_MEDIA_TYPE

router = APIRouter()

#: Largest ``offset`` of ``GET /conversations`` (Redis takes 64-bit ranges; a page that far
#: in is empty anyway).
MAX_OFFSET = 1_000_000_000


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def health(request: Request) -> JSONResponse:
    """Liveness of the model and Redis: 200 when both answer, 503 naming what is wrong.

    Public even with API keys on; ``active_conversations`` is then left out (null). The
    answer is at most ``HEALTH_CACHE_S`` old and names problems without their detail.
    """
    check: status.HealthCheck = request.app.state.health
    code, body = await check.answer()
    return JSONResponse(body.model_dump(), status_code=code)


_GENERATION_ANSWER: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {SSE_MEDIA_TYPE: {}},
        "description": "GenerationResponse, or with stream=true server-sent events: "
        '{"type":"delta","delta":...} per text delta, then '
        '{"type":"final","response":GenerationResponse} (or {"type":"error",...})',
    },
}


async def _run_turn(
    request: Request,
    service: CloudLLMService,
    context: RequestContext,
    body: GenerateRequest,
    images: list[RawImage] | None = None,
) -> Any:
    """Run one turn (``/generate``, ``/vision``, ``/multimodal``): whole, or as events.

    ``images`` are checked after the tenant was charged (:meth:`GenerateCall.prepare`).
    """
    received_at = request.scope.get("state", {}).get(RECEIVED_AT, time.perf_counter())
    call = await GenerateCall.prepare(service, body, received_at, context, images)
    if body.stream:
        events = await call.start_events()
        return StreamingResponse(events, media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)
    return await call.run()


@router.post(
    "/generate",
    response_model=GenerationResponse,
    responses={**ErrorResponses, **_GENERATION_ANSWER},
)
async def generate(
    body: GenerateRequest, request: Request, service: Service, context: Context
) -> Any:
    """Generate the answer to ``message``, in a new or a stored conversation."""
    return await _run_turn(request, service, context, body)


async def _image_turn(
    request: Request,
    service: CloudLLMService,
    context: RequestContext,
    model: type[GenerateRequest],
    image_field: str,
) -> Any:
    """``/vision`` and ``/multimodal``: read the body, then run as ``/generate``.

    The images are fetched and decoded only once the tenant is admitted.
    """
    await service.require_images(f"POST {request.url.path}")
    body, raw_images = await read_image_request(request, model, image_field, service.settings)
    return await _run_turn(request, service, context, body, raw_images)


@router.post(
    "/vision",
    response_model=GenerationResponse,
    responses={**ErrorResponses, **_GENERATION_ANSWER},
    openapi_extra=openapi_body(VisionRequest, "image"),
)
async def vision(request: Request, service: Service, context: Context) -> Any:
    """Answer ``message`` about one image (JSON with base64, or a multipart upload).

    The image is checked (413, 415, 400 naming ``image``), turned upright, made RGB and
    downscaled to ``MAX_IMAGE_SIDE``; it stays in the conversation. 501 on a text-only model.
    """
    return await _image_turn(request, service, context, VisionRequest, "image")


@router.post(
    "/multimodal",
    response_model=GenerationResponse,
    responses={**ErrorResponses, **_GENERATION_ANSWER},
    openapi_extra=openapi_body(MultimodalRequest, "images"),
)
async def multimodal(request: Request, service: Service, context: Context) -> Any:
    """One turn of a conversation with text and up to ``MAX_IMAGES_PER_REQUEST`` images.

    Later turns (with or without images) still show the model the earlier turns' images
    (oldest turns dropped first when the context is full). 501 on a text-only model.
    """
    return await _image_turn(request, service, context, MultimodalRequest, "images")


@router.get("/conversations", response_model=ConversationList, responses=ErrorResponses)
async def list_conversations(
    service: Service,
    context: Admitted,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> ConversationList:
    """The caller's conversations, most recently updated first (``offset``/``limit`` page)."""
    total, page = await service.conversations(context).list_page(offset=offset, limit=limit)
    return ConversationList(
        total=total,
        offset=offset,
        limit=limit,
        conversations=[
            ConversationSummary(
                conversation_id=c.conversation_id,
                created_at=c.created_at,
                updated_at=c.updated_at,
                message_count=c.message_count,
            )
            for c in page
        ],
    )


@router.get(
    "/conversations/{conversation_id}",
    response_model=ConversationDetail,
    response_model_exclude_none=True,
    responses=ErrorResponses,
)
async def get_conversation(
    conversation_id: str, service: Service, context: Admitted
) -> ConversationDetail:
    """One of the caller's conversations with every message in order.

    An id is letters, digits, ``_`` and ``-`` (1 to 128); any other is unknown (404).
    """
    context.conversation_id = conversation_id
    conversation = await service.conversations(context).get(conversation_id)
    return ConversationDetail(
        conversation_id=conversation.conversation_id,
        created_at=conversation.created_at,
        updated_at=conversation.updated_at,
        message_count=conversation.message_count,
        messages=[
            MessageOut(
                role=m.role,
                content=m.content,
                timestamp=m.timestamp,
                tool_calls=m.tool_calls,
                tool_call_id=m.tool_call_id,
                name=m.name,
                images=m.images,
            )
            for m in conversation.messages or []
        ],
    )


@router.delete(
    "/conversations/{conversation_id}", response_model=ConversationDeleted, responses=ErrorResponses
)
async def delete_conversation(
    conversation_id: str, service: Service, context: Admitted
) -> ConversationDeleted:
    """Delete one of the caller's conversations and its messages (404 as for a GET)."""
    context.conversation_id = conversation_id
    await service.conversations(context).delete(conversation_id)
    return ConversationDeleted(conversation_id=conversation_id)


@router.get("/status/detailed", responses=ErrorResponses)
async def detailed_status(service: Service, context: Context) -> dict[str, Any]:
    """Engine state and performance: per-replica batching, KV cache, GPU, Redis, counters.

    With API keys on, an admin key only (403 otherwise).
    """
    context.require_admin()
    await charge_request(service, context)
    return await status.detailed_status(service)
