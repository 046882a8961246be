"""What ``/v1`` documents of its own: our conversation fields and the error body.

The request and response bodies of chat and text completions are vLLM's (validated in
the engine replica by vLLM's own request models); nothing of them is copied here. The
OpenAPI page shows our extension fields and links vLLM's reference for the rest.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, Field

from cloudllm_serve.conversations.store import MAX_CONVERSATION_ID_CHARS
from cloudllm_serve.ingress.json_limits import INT64_MAX, INT64_MIN

VLLM_DOCS = "https://docs.vllm.ai/en/latest/serving/openai_compatible_server.html"


class ConversationFields(BaseModel):
    """Our fields in a chat completion body, beside everything vLLM's server accepts."""

    conversation_id: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_CONVERSATION_ID_CHARS,
        description="continue this stored conversation: send only the new message(s) (an id "
        "is letters, digits, _ and -: any other is unknown, 404)",
    )
    store: bool = Field(False, description="keep this exchange as a new server-side conversation")


#: vLLM's default ``VLLM_MAX_N_SEQUENCES``: the most choices (``n``) one request may ask for.
MAX_N = 16384
#: The 64-bit bound as the schema states it: FastAPI's OpenAPI model keeps bounds as floats,
#: and ``float(2**63 - 1)`` rounds up to ``2**63``; this is the largest float below it.
DOC_INT64_MAX = int(math.nextafter(float(INT64_MAX), 0.0))


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _integer(minimum: int, maximum: int = DOC_INT64_MAX) -> dict[str, Any]:
    return {"type": "integer", "minimum": minimum, "maximum": maximum}


def _number(minimum: float, maximum: float) -> dict[str, Any]:
    return {"type": "number", "minimum": minimum, "maximum": maximum}


#: Sampling fields of both bodies, with the bounds vLLM checks (``SamplingParams``): outside
#: them vLLM answers 400. Every integer is bounded: the ingress refuses any integer outside
#: 64 bits (:mod:`cloudllm_serve.ingress.json_limits`).
SAMPLING_FIELDS: dict[str, dict[str, Any]] = {
    "model": {
        "type": "string",
        "description": "the served model's name (GET /v1/models); another one is a 404",
    },
    "stream": _nullable({"type": "boolean"}),
    "stream_options": _nullable(
        {
            "type": "object",
            "properties": {
                "include_usage": {"type": "boolean"},
                "continuous_usage_stats": {"type": "boolean"},
            },
        }
    ),
    "max_tokens": _nullable(_integer(1)),
    "n": _nullable({**_integer(1, MAX_N), "description": "choices; 1 with temperature 0 (greedy)"}),
    "temperature": _nullable(_number(0.0, 2.0)),
    "top_p": _nullable({"type": "number", "exclusiveMinimum": 0.0, "maximum": 1.0}),
    "top_k": _nullable({**_integer(-1), "description": "0 or -1: off"}),
    "min_p": _nullable(_number(0.0, 1.0)),
    "presence_penalty": _nullable(_number(-2.0, 2.0)),
    "frequency_penalty": _nullable(_number(-2.0, 2.0)),
    "repetition_penalty": _nullable({"type": "number", "exclusiveMinimum": 0.0}),
    "min_tokens": _integer(0),
    "seed": _nullable(_integer(INT64_MIN)),
    "stop": _nullable(
        {
            "anyOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "items": {"type": "string", "minLength": 1}},
            ]
        }
    ),
    "user": _nullable({"type": "string"}),
}

_TEXT_PART = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
}
_IMAGE_PART = {
    "type": "object",
    "required": ["type", "image_url"],
    "properties": {
        "type": {"const": "image_url"},
        "image_url": {
            "type": "object",
            "required": ["url"],
            "properties": {
                "url": {
                    "type": "string",
                    "description": "a data: URL, or http(s) on a MEDIA_ALLOWED_DOMAINS host",
                },
                "detail": {"type": "string"},
            },
        },
    },
    "description": "an image: only on a vision-language model (501 otherwise)",
}
#: One chat message; vLLM takes further part kinds, which the ingress refuses (400) except
#: images in vLLM's other shapes (:mod:`cloudllm_serve.ingress.openai_api.media`).
CHAT_MESSAGE_DOC: dict[str, Any] = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {
            "type": "string",
            "minLength": 1,
            "description": "system, developer, user, assistant or tool",
        },
        "content": _nullable(
            {
                "anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"anyOf": [_TEXT_PART, _IMAGE_PART]}},
                ]
            }
        ),
        "name": {"type": "string"},
        "tool_call_id": {"type": "string", "description": "the call a tool message answers"},
        "tool_calls": {"type": "array", "items": {"type": "object"}},
    },
}


def _body_doc(description: str, required: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description,
        "required": required,
        "properties": {**SAMPLING_FIELDS, **extra},
        "additionalProperties": True,
    }


#: Chat completion body: vLLM's ChatCompletionRequest plus :class:`ConversationFields`.
CHAT_BODY_DOC = _body_doc(
    "vLLM's chat completion request (every field `vllm serve` accepts: tools, logprobs, "
    f"response_format, structured outputs, ...; see {VLLM_DOCS}) plus conversation_id "
    "and store.",
    ["messages"],
    {
        "messages": {"type": "array", "minItems": 1, "items": CHAT_MESSAGE_DOC},
        "max_completion_tokens": _nullable(_integer(1)),
        **ConversationFields.model_json_schema()["properties"],
    },
)
_TOKEN_IDS = {"type": "array", "minItems": 1, "items": _integer(0)}
#: Text completion body: vLLM's CompletionRequest.
COMPLETION_BODY_DOC = _body_doc(
    f"vLLM's text completion request (every field `vllm serve` accepts; see {VLLM_DOCS}).",
    ["prompt"],
    {
        "prompt": {
            "description": "text, token ids, or a batch of either",
            "anyOf": [
                {"type": "string"},
                {"type": "array", "minItems": 1, "items": {"type": "string"}},
                _TOKEN_IDS,
                {"type": "array", "minItems": 1, "items": _TOKEN_IDS},
            ],
        }
    },
)


def request_body_doc(schema: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` declaring a JSON request body of ``schema``."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema}},
        }
    }


class OpenAIErrorDetail(BaseModel):
    """The inside of OpenAI's error body."""

    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class OpenAIErrorBody(BaseModel):
    """Every error on ``/v1``: ``{"error": {"message", "type", "param", "code"}}``."""

    error: OpenAIErrorDetail
