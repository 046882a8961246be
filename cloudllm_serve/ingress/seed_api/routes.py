"""The seed's HTTP endpoints (SPEC §2) over a :class:`CloudLLMService`."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from cloudllm_serve.errors import FeatureNotImplementedError
from cloudllm_serve.ingress.errors import ErrorResponses
from cloudllm_serve.ingress.middleware import RECEIVED_AT
from cloudllm_serve.ingress.seed_api import status
from cloudllm_serve.ingress.seed_api.generation import GenerateCall
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


def get_service(request: Request) -> CloudLLMService:
    """The service this app was built with."""
    service: CloudLLMService = request.app.state.service
    return service


Service = Annotated[CloudLLMService, Depends(get_service)]


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def health(service: Service) -> JSONResponse:
    """Liveness of the model and Redis: 200 when both answer, 503 naming what is wrong."""
    code, body = await status.health(service)
    return JSONResponse(body.model_dump(), status_code=code)


@router.post(
    "/generate",
    response_model=GenerationResponse,
    responses={
        **ErrorResponses,
        200: {
            "content": {SSE_MEDIA_TYPE: {}},
            "description": "GenerationResponse, or with stream=true server-sent events: "
            '{"type":"delta","delta":...} per text delta, then '
            '{"type":"final","response":GenerationResponse} (or {"type":"error",...})',
        },
    },
)
async def generate(body: GenerateRequest, request: Request, service: Service) -> Any:
    """Generate the answer to ``message``, in a new or a stored conversation."""
    received_at = request.scope.get("state", {}).get(RECEIVED_AT, time.perf_counter())
    call = await GenerateCall.prepare(service, body, received_at)
    if body.stream:
        events = await call.start_events()
        return StreamingResponse(events, media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)
    return await call.run()


@router.post("/vision", status_code=501, responses=ErrorResponses)
async def vision() -> None:
    """Image + prompt analysis: not available yet (501)."""
    raise FeatureNotImplementedError(
        "POST /vision is not implemented yet: image input needs a vision-language model "
        "and lands in a later release; use POST /generate for text"
    )


@router.post("/multimodal", status_code=501, responses=ErrorResponses)
async def multimodal() -> None:
    """Text + images in a conversation: not available yet (501)."""
    raise FeatureNotImplementedError(
        "POST /multimodal is not implemented yet: image input needs a vision-language model "
        "and lands in a later release; use POST /generate for text"
    )


@router.get("/conversations", response_model=ConversationList, responses=ErrorResponses)
async def list_conversations(
    service: Service,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> ConversationList:
    """Conversations, most recently updated first (``offset``/``limit`` page through them)."""
    total, page = await service.store.list_page(offset=offset, limit=limit)
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
    "/conversations/{conversation_id}", response_model=ConversationDetail, responses=ErrorResponses
)
async def get_conversation(conversation_id: str, service: Service) -> ConversationDetail:
    """One conversation with every message in order."""
    conversation = await service.store.get(conversation_id)
    return ConversationDetail(
        conversation_id=conversation.conversation_id,
        created_at=conversation.created_at,
        updated_at=conversation.updated_at,
        message_count=conversation.message_count,
        messages=[
            MessageOut(role=m.role, content=m.content, timestamp=m.timestamp)
            for m in conversation.messages or []
        ],
    )


@router.delete(
    "/conversations/{conversation_id}", response_model=ConversationDeleted, responses=ErrorResponses
)
async def delete_conversation(conversation_id: str, service: Service) -> ConversationDeleted:
    """Delete a conversation and its messages."""
    await service.store.delete(conversation_id)
    return ConversationDeleted(conversation_id=conversation_id)


@router.get("/status/detailed", responses=ErrorResponses)
async def detailed_status(service: Service) -> dict[str, Any]:
    """Engine state and performance: per-replica batching, KV cache, GPU, Redis, counters."""
    return await status.detailed_status(service)
