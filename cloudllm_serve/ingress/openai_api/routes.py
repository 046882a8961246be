"""The OpenAI-compatible endpoints over :class:`CloudLLMService`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from cloudllm_serve.errors import ModelNotFoundError
from cloudllm_serve.ingress.errors import documented_errors
from cloudllm_serve.ingress.openai_api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    OpenAIErrorBody,
)
from cloudllm_serve.ingress.openai_api.serving import CompletionCall
from cloudllm_serve.ingress.seed_api.routes import Admitted, Context, Service
from cloudllm_serve.ingress.sse import SSE_HEADERS, SSE_MEDIA_TYPE

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
STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {"content": {SSE_MEDIA_TYPE: {}}, "description": "JSON, or SSE chunks when stream=true"}
}


def _model_card(service: Any) -> ModelCard:
    settings = service.settings
    return ModelCard(
        id=settings.model_name,
        created=int(service.started_at_unix),
        max_model_len=settings.VLLM_MAX_MODEL_LEN,
    )


@router.get("/models", response_model=ModelList)
async def list_models(service: Service, _: Admitted) -> ModelList:
    """The served model."""
    return ModelList(data=[_model_card(service)])


@router.get("/models/{model_id:path}", response_model=ModelCard, responses=OPENAI_ERRORS)
async def get_model(model_id: str, service: Service, _: Admitted) -> ModelCard:
    """One served model by id."""
    if model_id != service.settings.model_name:
        raise ModelNotFoundError(model_id)
    return _model_card(service)


async def _answer(call: CompletionCall) -> Any:
    if call.request.stream:
        events = await call.start_events()
        return StreamingResponse(
            events, media_type=SSE_MEDIA_TYPE, headers={**SSE_HEADERS, **call.headers}
        )
    return JSONResponse(await call.run(), headers=call.headers)


@router.post("/chat/completions", responses={**OPENAI_ERRORS, **STREAM_DOC})
async def chat_completions(body: ChatCompletionRequest, service: Service, context: Context) -> Any:
    """Chat completion; ``conversation_id`` continues a stored conversation, ``store`` starts one.

    The conversation id comes back in the ``X-Conversation-Id`` header (and in the
    body's ``conversation_id`` when not streaming).
    """
    return await _answer(await CompletionCall.for_chat(service, body, context))


@router.post("/completions", responses={**OPENAI_ERRORS, **STREAM_DOC})
async def completions(body: CompletionRequest, service: Service, context: Context) -> Any:
    """Text completion of a raw prompt (text or token ids), no chat template."""
    return await _answer(await CompletionCall.for_completion(service, body, context))
