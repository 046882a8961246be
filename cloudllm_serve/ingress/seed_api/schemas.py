"""Request and response schemas of the seed's API (docs/api.md).

Beyond the seed's fields: ``stream`` and ``json_schema``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, field_validator

from cloudllm_serve.conversations.store import MAX_CONVERSATION_ID_CHARS
from cloudllm_serve.ingress.json_limits import JSONLimitError, check_json_limits, is_valid_unicode

#: What generates: vLLM (the seed fixes it), or the simulated engine (``LLM_MODEL=sim``).
EngineType = Literal["vLLM", "simulated"]
ENGINE_NAME: EngineType = "vLLM"
#: Largest ``max_tokens`` taken (32 bits); any value over ``MAX_TOKENS_CAP`` is clamped to it.
MAX_TOKENS_LIMIT = 2**31 - 1
_JSON_TYPES = ["object", "array", "string", "number", "integer", "boolean", "null"]
#: A few keywords of ``json_schema`` and what they take (JSON Schema's meta-schema checks the
#: rest; a ``$ref`` is resolved within the schema only, never fetched).
JSON_SCHEMA_KEYWORDS: dict[str, Any] = {
    "$schema": {"type": "string", "description": "the dialect's URI (default: 2020-12)"},
    "$ref": {"type": "string"},
    "type": {
        "anyOf": [
            {"enum": _JSON_TYPES},
            {"type": "array", "items": {"enum": _JSON_TYPES}, "uniqueItems": True},
        ]
    },
    "properties": {"type": "object", "additionalProperties": {"type": ["object", "boolean"]}},
    "required": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
}
#: What ``message`` must hold: a character that is not white space (documented in the schema,
#: checked by the validator so the error keeps its wording).
NOT_BLANK: dict[str, Any] = {"minLength": 1, "pattern": r"\S"}


def _integral(value: Any) -> Any:
    """An integral float as an ``int`` (JSON Schema counts 3.0 as an integer); else ``value``."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class GenerateRequest(BaseModel):
    """Body of ``POST /generate``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "message": "vLLM으로 빠른 응답 부탁해",
                    "conversation_id": None,
                    "max_tokens": 512,
                    "temperature": 0.7,
                }
            ]
        },
    )

    message: str = Field(
        description="the new user message (not empty)", json_schema_extra=NOT_BLANK
    )
    conversation_id: (
        Annotated[str, Field(min_length=1, max_length=MAX_CONVERSATION_ID_CHARS)] | None
    ) = Field(
        None,
        description="continue this conversation; null starts a new one (an id is letters, "
        "digits, _ and -: any other is unknown, 404)",
    )
    # An integer as JSON Schema has it: 3 or 3.0; never "3", 3.5 or true.
    max_tokens: Annotated[
        StrictInt, Field(ge=1, le=MAX_TOKENS_LIMIT), BeforeValidator(_integral)
    ] = Field(512, description="tokens to generate at most; clamped to MAX_TOKENS_CAP")
    temperature: Annotated[float, Field(strict=True, ge=0.0, le=2.0, allow_inf_nan=False)] = Field(
        0.7, description="sampling temperature, 0 (greedy) to 2"
    )
    stream: Annotated[bool, Field(strict=True)] = Field(
        False, description="answer with server-sent events: one per text delta, then the result"
    )
    json_schema: dict[str, Any] | None = Field(
        None,
        description="a JSON Schema the answer must follow (structured output)",
        json_schema_extra={"properties": JSON_SCHEMA_KEYWORDS},
    )

    @field_validator("message")
    @classmethod
    def _message_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("message must not be empty")
        return _unicode(value, "message")

    @field_validator("conversation_id")
    @classmethod
    def _conversation_id_unicode(cls, value: str | None) -> str | None:
        return value if value is None else _unicode(value, "conversation_id")

    @field_validator("json_schema")
    @classmethod
    def _json_schema_within_limits(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            try:
                check_json_limits(value)
            except JSONLimitError as error:
                where = f" (at {'.'.join(map(str, error.path))})" if error.path else ""
                raise ValueError(f"{error.problem}{where}") from None
        return value


def _unicode(value: str, name: str) -> str:
    """``value``, if it is valid Unicode (JSON can carry lone surrogates, which are not)."""
    if not is_valid_unicode(value):
        raise ValueError(f"{name} is not valid Unicode (a lone surrogate)")
    return value


class Timings(BaseModel):
    """vLLM-specific timings of one generation (milliseconds unless named otherwise)."""

    generation_ms: float = Field(description="engine time from submitting to the last token")
    total_ms: float = Field(description="history load + generation + store write")
    tokens_generated: int
    tokens_per_second: float = Field(description="tokens_generated / generation time")
    endpoint_total_ms: float = Field(description="whole endpoint, from request arrival")
    json_parse_ms: float = Field(description="time spent looking for JSON in the answer")
    ttft_ms: float | None = Field(None, description="engine time to the first token")
    queue_ms: float | None = Field(None, description="time waiting in vLLM's scheduler queue")
    prompt_tokens: int | None = Field(None, description="tokens of the rendered prompt")
    store_ms: float | None = Field(
        None, description="time spent on Redis: loading the history and storing the turn"
    )
    engine_replica: str | None = Field(None, description="Serve id of the engine replica")
    ingress_replica: str | None = Field(None, description="Serve id of the ingress replica")


class ModelInfo(BaseModel):
    """Which model answered and with what settings."""

    engine: EngineType = Field(
        ENGINE_NAME,
        description="'vLLM', or 'simulated' when LLM_MODEL=sim (no model: timings only)",
    )
    model_name: str
    max_tokens: int = Field(description="max_tokens used, after clamping to MAX_TOKENS_CAP")
    temperature: float
    timings: Timings


class GenerationResponse(BaseModel):
    """The seed's common response."""

    response: str
    conversation_id: str
    generation_time: float = Field(description="engine generation time in seconds")
    model_info: ModelInfo
    response_json: dict[str, Any] | list[Any] | None = None
    response_is_json: bool = False
    finish_reason: str | None = Field(None, description="stop (natural end) or length")
    dropped_history_messages: int = Field(
        0, description="oldest stored messages left out of the prompt to fit the context"
    )


class VllmStats(BaseModel):
    """Engine state summed over the engine replicas."""

    engine_status: str
    pending_requests: int
    running_requests: int
    kv_cache_usage: float | None = None
    replicas: int = 0


class HealthResponse(BaseModel):
    """Body of ``GET /health`` (200 when healthy, 503 otherwise)."""

    status: str = Field(description="'healthy', or 'unhealthy: ...' naming what is wrong")
    model_loaded: bool
    model_name: str
    engine_type: EngineType = Field(
        ENGINE_NAME,
        description="'vLLM', or 'simulated' when LLM_MODEL=sim (no model: timings only)",
    )
    gpu_memory_used: float | None = Field(None, description="GiB, null without a GPU")
    gpu_memory_total: float | None = Field(None, description="GiB, null without a GPU")
    vllm_stats: VllmStats
    active_conversations: int | None
    uptime: float = Field(description="seconds since this ingress replica started")
    redis_ok: bool
    problems: list[str] = Field(default_factory=list)
    lost_nodes: list[str] = Field(
        default_factory=list,
        description="Ray nodes lost (not stopped on purpose) that have not come back, by name "
        "(or 'node <id prefix>' where the name is an address)",
    )


class MessageOut(BaseModel):
    """One stored message; tool and image fields only on messages that have them."""

    role: str
    content: str
    timestamp: float
    tool_calls: list[dict[str, Any]] | None = Field(
        None, description="an assistant's tool calls, in OpenAI's shape"
    )
    tool_call_id: str | None = Field(None, description="the call a tool message answers")
    name: str | None = None
    images: list[str] | None = Field(
        None, description="SHA-256 digests of the images the message showed, in order"
    )


class ConversationSummary(BaseModel):
    """A conversation without its messages."""

    conversation_id: str
    created_at: float
    updated_at: float
    message_count: int


class ConversationDetail(ConversationSummary):
    """A conversation with every message in order."""

    messages: list[MessageOut]


class ConversationList(BaseModel):
    """A page of conversations, most recently updated first."""

    total: int
    offset: int
    limit: int
    conversations: list[ConversationSummary]


class ConversationDeleted(BaseModel):
    """Answer to ``DELETE /conversations/{id}``."""

    conversation_id: str
    deleted: bool = True


class ErrorBody(BaseModel):
    """Every error response: ``detail`` is a sentence naming the problem."""

    detail: str
    error_type: str
    param: str | None = None
