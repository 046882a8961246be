"""What ``/v1`` documents of its own: our conversation fields and the error body.

The request and response bodies of chat and text completions are vLLM's (validated in
the engine replica by vLLM's own request models); nothing of them is copied here. The
OpenAPI page shows our extension fields and links vLLM's reference for the rest.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

VLLM_DOCS = "https://docs.vllm.ai/en/latest/serving/openai_compatible_server.html"


class ConversationFields(BaseModel):
    """Our fields in a chat completion body, beside everything vLLM's server accepts."""

    conversation_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="continue this stored conversation: send only the new message(s)",
    )
    store: bool = Field(False, description="keep this exchange as a new server-side conversation")


def _body_doc(description: str, required: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description,
        "required": required,
        "properties": {"model": {"type": "string"}, "stream": {"type": "boolean"}, **extra},
        "additionalProperties": True,
    }


#: Chat completion body: vLLM's ChatCompletionRequest plus :class:`ConversationFields`.
CHAT_BODY_DOC = _body_doc(
    "vLLM's chat completion request (every field `vllm serve` accepts: tools, logprobs, "
    f"response_format, structured outputs, ...; see {VLLM_DOCS}) plus conversation_id "
    "and store.",
    ["messages"],
    {
        "messages": {"type": "array", "minItems": 1, "items": {"type": "object"}},
        **ConversationFields.model_json_schema()["properties"],
    },
)
#: Text completion body: vLLM's CompletionRequest.
COMPLETION_BODY_DOC = _body_doc(
    f"vLLM's text completion request (every field `vllm serve` accepts; see {VLLM_DOCS}).",
    ["prompt"],
    {"prompt": {"description": "text, token ids, or a batch of either"}},
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
