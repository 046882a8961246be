"""The OpenAI-compatible endpoints over :class:`CloudLLMService`."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from cloudllm_serve.errors import ModelNotFoundError
from cloudllm_serve.ingress.dependencies import Admitted, Context, Service
from cloudllm_serve.ingress.errors import documented_errors
from cloudllm_serve.ingress.openai_api.schemas import (
    CHAT_BODY_DOC,
    COMPLETION_BODY_DOC,
    OpenAIErrorBody,
    request_body_doc,
)
from cloudllm_serve.ingress.openai_api.serving import (
    BadBody,
    CompletionCall,
    bad_body_response,
    read_json_body,
)
from cloudllm_serve.ingress.service import CloudLLMService
from cloudllm_serve.ingress.sse import SSE_MEDIA_TYPE

router = APIRouter(prefix="/v1")

OPENAI_ERRORS = documented_errors(
    OpenAIErrorBody,
    {
        400: "invalid parameter (names it in error.param)",
        401: "no API key or an invalid one (code invalid_api_key)",
        404: "unknown model or conversation",
        429: "over a rate limit of the tenant (code rate_limit_exceeded, Retry-After)",
        503: "Redis or the engine is unavailable (with Retry-After)",
    },
)
#: A completion's further errors: a body too large, and (chat) image input.
COMPLETION_ERRORS = {
    **OPENAI_ERRORS,
    **documented_errors(
        OpenAIErrorBody, {413: "request body (or an image) larger than MAX_UPLOAD_BYTES"}
    ),
}
CHAT_ERRORS = {
    **COMPLETION_ERRORS,
    **documented_errors(
        OpenAIErrorBody,
        {
            415: "an image that is not PNG, JPEG, WEBP or GIF",
            501: "a media content part (an image, audio, video), and the model takes text only",
        },
    ),
}
STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {"content": {SSE_MEDIA_TYPE: {}}, "description": "JSON, or SSE chunks when stream=true"}
}


@router.get("/models", responses=OPENAI_ERRORS)
async def list_models(service: Service, _: Admitted) -> JSONResponse:
    """The served model, as vLLM lists it."""
    return JSONResponse(await service.engine.models())


@router.get("/models/{model_id:path}", responses=OPENAI_ERRORS)
async def get_model(model_id: str, service: Service, _: Admitted) -> JSONResponse:
    """One served model by id (an extension: vllm serve lists models only)."""
    listed = await service.engine.models()
    for card in listed.get("data", []):
        if card.get("id") == model_id:
            return JSONResponse(card)
    raise ModelNotFoundError(model_id)


async def _complete(
    request: Request, service: CloudLLMService, context: Any, kind: Literal["chat", "completion"]
) -> Response:
    try:
        body = await read_json_body(request)
    except BadBody as error:
        return bad_body_response(error)
    call = await CompletionCall.prepare(service, kind, body, context)
    return await call.respond()


@router.post(
    "/chat/completions",
    responses={**CHAT_ERRORS, **STREAM_DOC},
    openapi_extra=request_body_doc(CHAT_BODY_DOC),
)
async def chat_completions(request: Request, service: Service, context: Context) -> Response:
    """Chat completion, answered by vLLM's own OpenAI serving layer.

    ``conversation_id`` continues a stored conversation (send only the new messages),
    ``store`` starts one; its id comes back in the ``X-Conversation-Id`` header (and in
    the body's ``conversation_id`` when not streaming).
    """
    return await _complete(request, service, context, "chat")


@router.post(
    "/completions",
    responses={**COMPLETION_ERRORS, **STREAM_DOC},
    openapi_extra=request_body_doc(COMPLETION_BODY_DOC),
)
async def completions(request: Request, service: Service, context: Context) -> Response:
    """Text completion of a raw prompt, answered by vLLM's own OpenAI serving layer."""
    return await _complete(request, service, context, "completion")
