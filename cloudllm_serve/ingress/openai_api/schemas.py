"""Request and response schemas of the OpenAI-compatible API (the subset we serve).

Unknown request fields are ignored, as vLLM's own server does, so clients that send
extras (``user``, ``metadata``, ``repetition_penalty``...) keep working; fields whose
meaning we cannot honour (``logprobs``, ``tools``, ``echo``...) are refused with a 400.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

StrictFloat = Annotated[float, Field(strict=True)]
StrictInt = Annotated[int, Field(strict=True)]
MAX_STOP_SEQUENCES = 16
MAX_CHOICES = 8


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with token counts."""

    model_config = ConfigDict(extra="ignore")

    include_usage: Annotated[bool, Field(strict=True)] = False


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = "response"
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """``response_format``: plain text, any JSON object, or JSON following a schema."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format.json_schema is required when type is json_schema")
        return self


class SamplingFields(BaseModel):
    """Parameters shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[StrictFloat, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[StrictFloat, Field(gt=0.0, le=1.0)] = 1.0
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)] = 1
    presence_penalty: Annotated[StrictFloat, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[StrictFloat, Field(ge=-2.0, le=2.0)] = 0.0
    ignore_eos: Annotated[bool, Field(strict=True)] = False
    response_format: ResponseFormat | None = None
    stream: Annotated[bool, Field(strict=True)] = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, value: str | list[str] | None) -> str | list[str] | None:
        sequences = [value] if isinstance(value, str) else value or []
        if len(sequences) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s for s in sequences):
            raise ValueError("stop sequences must not be empty")
        return value

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        """``stop`` as a tuple."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage


class ContentPart(BaseModel):
    """A part of a message's content; only ``text`` parts are served here."""

    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class ChatMessageIn(BaseModel):
    """One message of ``messages``."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        """The content as plain text; non-text parts are refused."""
        if isinstance(self.content, str):
            return self.content
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(
                    f"content part of type '{part.type}' is not supported: "
                    "this model takes text only"
                )
        return "".join(part.text or "" for part in self.content)


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``; ``conversation_id``/``store`` are our extension."""

    messages: Annotated[list[ChatMessageIn], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    conversation_id: Annotated[str, Field(min_length=1, max_length=128)] | None = Field(
        None, description="continue this stored conversation: send only the new message(s)"
    )
    store: Annotated[bool, Field(strict=True)] = Field(
        False, description="keep this exchange as a new server-side conversation"
    )
    logprobs: bool | None = None
    tools: list[Any] | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("logprobs are not supported")
        return value

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError("tools are not supported")
        return value


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: a raw prompt (text or token ids), no chat template."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: StrictInt | None = None
    echo: Annotated[bool, Field(strict=True)] = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(
        cls, value: str | list[int] | list[str] | list[list[int]]
    ) -> str | list[int] | list[str] | list[list[int]]:
        batch = isinstance(value, list) and value and isinstance(value[0], (str, list))
        if batch and len(value) != 1:
            raise ValueError("only one prompt per request is supported")
        if not value:
            raise ValueError("prompt must not be empty")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError("logprobs are not supported")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix is not supported")
        return value

    @property
    def single_prompt(self) -> str | list[int]:
        """The one prompt, unwrapped from a one-element batch."""
        value = self.prompt
        if isinstance(value, list) and value and isinstance(value[0], (str, list)):
            return value[0]
        return value  # type: ignore[return-value]


class ModelCard(BaseModel):
    """One entry of ``/v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "cloudllm-serve"
    max_model_len: int


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(BaseModel):
    """The inside of OpenAI's error body."""

    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class OpenAIErrorBody(BaseModel):
    """Every error on ``/v1``: ``{"error": {"message", "type", "param", "code"}}``."""

    error: OpenAIErrorDetail
