"""``/v1/chat/completions`` and ``/v1/completions``: vLLM's serving layer, plus conversations.

The body goes to an engine replica as the client sent it, and vLLM's own OpenAI
serving classes validate and answer it there (:mod:`cloudllm_serve.engine.openai_serving`),
so ``/v1`` accepts and answers what ``vllm serve`` does. The ingress reads only what it
needs besides: our own fields (``conversation_id``, ``store``), rough sizes for the
tenant's rate limits, and the answer's usage. A stored conversation's history is put in
front of ``messages``; the answer's message (tool calls included) is stored after it.
``cache_salt`` becomes the tenant's, the client's own (if any) mixed in
(:mod:`cloudllm_serve.ingress.cache_salt`).

Media parts, found as vLLM's renderer finds them (:mod:`.media`), are checked here before
any engine sees them: an image's data URL is decoded and checked, an ``http(s)`` URL
fetched by us from an allowlisted host, and either way the part is given to vLLM as a
plain ``image_url`` part with a data URL of our own re-encoding; any other media part is
refused. A stored conversation keeps each image once.

A stateless stream is relayed string by string: nothing is decoded per token here.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import TypeAdapter, ValidationError

from cloudllm_serve.conversations.store import MAX_CONVERSATION_ID_CHARS, StoredMessage
from cloudllm_serve.engine.protocol import OpenAIAnswer, OpenAICall, OpenAIItem, OpenAIStreamEnd
from cloudllm_serve.errors import CloudLLMError, EngineUnavailableError, InvalidRequestError
from cloudllm_serve.ingress.cache_salt import cache_salt, client_cache_salt
from cloudllm_serve.ingress.context import RequestContext
from cloudllm_serve.ingress.errors import openai_error, openai_http_error
from cloudllm_serve.ingress.json_limits import JSONLimitError, loads_checked
from cloudllm_serve.ingress.openai_api.media import ChatMedia, CheckedParts
from cloudllm_serve.ingress.service import (
    CHARS_PER_TOKEN,
    CloudLLMService,
    ConversationTurn,
    affinity_key,
    close_stream,
)
from cloudllm_serve.ingress.sse import DONE, SSE_HEADERS, SSE_MEDIA_TYPE, sse_event

CONVERSATION_HEADER = "X-Conversation-Id"
#: vLLM's default ``max_tokens`` of a text completion.
VLLM_COMPLETION_MAX_TOKENS = 16


class BadBody(Exception):
    """A body vLLM's server would refuse before validating it (400 ``Bad Request``)."""


async def read_json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object, or :class:`BadBody` as ``vllm serve`` words it.

    A body outside :mod:`~cloudllm_serve.ingress.json_limits` (too deeply nested, a
    huge integer, a lone surrogate) is a 400 naming where.
    """
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise BadBody("Unsupported Media Type: Only 'application/json' is allowed")
    raw = await request.body()
    try:
        body = loads_checked(raw)
    except JSONLimitError as error:
        raise error.request_error() from None
    except (ValueError, UnicodeDecodeError) as error:
        raise BadBody(f"JSON decode error: {error}") from None
    if not isinstance(body, dict):
        raise BadBody("the request body must be a JSON object")
    return body


def bad_body_response(error: BadBody) -> JSONResponse:
    """The 400 for a :class:`BadBody`."""
    return JSONResponse(openai_http_error(400, str(error)), status_code=400)


class CompletionCall:
    """One ``/v1`` chat or text completion: our fields taken out, history put in."""

    def __init__(
        self,
        service: CloudLLMService,
        context: RequestContext,
        call: OpenAICall,
        turn: ConversationTurn,
        new_messages: list[StoredMessage],
        tokens_per_event: int = 1,
    ) -> None:
        self.service = service
        self.context = context
        self.call = call
        self.turn = turn
        self.new_messages = new_messages
        self.tokens_per_event = tokens_per_event

    @classmethod
    async def prepare(
        cls,
        service: CloudLLMService,
        kind: Literal["chat", "completion"],
        body: dict[str, Any],
        context: RequestContext,
    ) -> CompletionCall:
        """Charge the tenant, load (or start) the conversation, build the engine call."""
        conversation_id = _conversation_id(body.pop("conversation_id", None))
        store = body.pop("store", False)
        if not isinstance(store, bool):
            raise InvalidRequestError("store must be true or false", param="store")
        body["cache_salt"] = cache_salt(
            context.tenant_id, client_cache_salt(body.get("cache_salt"))
        )
        n = lax_int(body.get("n"))
        if kind == "completion" and (conversation_id is not None or store):
            raise InvalidRequestError(
                "conversations are kept for chat completions only",
                param="conversation_id" if conversation_id else "store",
            )
        if conversation_id is not None and store:
            raise InvalidRequestError(
                "store starts a new conversation; do not combine it with conversation_id",
                param="store",
            )
        stateful = conversation_id is not None or store
        media = ChatMedia.find(body.get("messages")) if kind == "chat" else ChatMedia()
        if media.parts:
            await service.require_images(media.parts[0].description)
        if kind == "chat":
            media.refuse_unchecked(body, service.settings.MAX_IMAGES_PER_REQUEST)
        prompt_chars = max(0, _prompt_chars(body) - media.image_chars)
        await service.admit(
            context,
            prompt_chars=prompt_chars,
            max_tokens=_most_generated(kind, body, service, prompt_chars, stateful=stateful),
            stateless=not stateful,
        )
        checked = await media.check(service.settings)
        new_messages: list[StoredMessage] = []
        if stateful:
            if n not in (None, 1):
                raise InvalidRequestError("n must be 1 in a stored conversation", param="n")
            new_messages = _storable(body.get("messages"), checked)
        turn = await service.begin_turn(conversation_id, create=store, context=context)
        for message in new_messages:
            if message.images:
                turn.add_images([checked.images[digest] for digest in message.images])
        droppable = 0
        if stateful:
            history = [m.chat_message(turn.images) for m in turn.history]
            body["messages"] = [*history, *body["messages"]]
            droppable = len(history)
            if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
                # The fitting budget; vLLM's own default would take the rest of the context.
                body["max_tokens"] = service.settings.MAX_TOKENS_CAP
        messages = body.get("messages") if kind == "chat" else None
        call = OpenAICall(
            kind=kind,
            body=body,
            request_id=context.internal_id,  # ours, never the client's X-Request-Id
            droppable_messages=droppable,
            collect=turn.conversation_id is not None,
            affinity_key=_affinity_key(turn.conversation_id, messages),
            preferred_replica=turn.engine_replica,
        )
        return cls(service, context, call, turn, new_messages, _tokens_per_event(body, service))

    @property
    def headers(self) -> dict[str, str]:
        """Response headers: the conversation id when there is one."""
        cid = self.turn.conversation_id
        return {CONVERSATION_HEADER: cid} if cid else {}

    async def respond(self) -> Response:
        """Run the call: a JSON answer, or the stream once its first string is here."""
        batches = aiter(
            self.service.openai(
                self.call, context=self.context, tokens_per_event=self.tokens_per_event
            )
        )
        try:
            first = await anext(batches)
        except StopAsyncIteration:
            await self.service.abandon_turn(self.turn)
            raise EngineUnavailableError("the engine ended the call without an answer") from None
        except BaseException:
            await self.service.abandon_turn(self.turn)
            raise
        if first and isinstance(first[0], OpenAIAnswer):
            await close_stream(batches)
            return await self._whole(first[0])
        if not first or not isinstance(first[0], str):
            await self.service.abandon_turn(self.turn)
            raise EngineUnavailableError("the engine sent a stream end before any event")
        return StreamingResponse(
            self._events(first, batches),
            media_type=SSE_MEDIA_TYPE,
            headers={**SSE_HEADERS, **self.headers},
        )

    async def _whole(self, answer: OpenAIAnswer) -> JSONResponse:
        body = answer.body
        if answer.status != 200:
            await self.service.abandon_turn(self.turn)
            return JSONResponse(body, status_code=answer.status)
        if self.turn.conversation_id is not None:
            try:
                message = body["choices"][0]["message"]
                await self._store(message, answer.replica_id, answer.dropped_messages)
            except BaseException:
                await self.service.abandon_turn(self.turn)
                raise
            body["conversation_id"] = self.turn.conversation_id
        return JSONResponse(body, headers=self.headers or None)

    async def _events(
        self, first: list[OpenAIItem], batches: AsyncIterator[list[OpenAIItem]]
    ) -> AsyncIterator[bytes]:
        """The engine's SSE strings as they come, a batch per write.

        The stream's end stores the turn; errors become events.
        """
        try:
            batch: list[OpenAIItem] | None = first
            while batch is not None:
                events = "".join(item for item in batch if isinstance(item, str))
                if events:
                    yield events.encode()
                for item in batch:
                    if isinstance(item, OpenAIStreamEnd):
                        await self._finish_stream(item)
                batch = await anext(batches, None)
        except CloudLLMError as error:
            await self.service.abandon_turn(self.turn)
            yield sse_event(openai_error(error))
            yield DONE
        except BaseException:
            await self.service.abandon_turn(self.turn)
            raise
        finally:
            await close_stream(batches)

    async def _finish_stream(self, end: OpenAIStreamEnd) -> None:
        if self.turn.conversation_id is None:
            return
        if end.message is None:  # the stream ended with an error event: nothing to keep
            await self.service.abandon_turn(self.turn)
            return
        await self._store(end.message, end.replica_id, end.dropped_messages)

    async def _store(self, message: dict[str, Any], replica_id: str, dropped: int) -> None:
        answer = StoredMessage(
            "assistant",
            message.get("content") or "",
            time.time(),
            tool_calls=_tool_calls(message.get("tool_calls")),
        )
        await self.service.store_turn(
            self.turn,
            [*self.new_messages, answer],
            engine_replica=replica_id,
            dropped_messages=dropped,
            api="openai",
        )


def _conversation_id(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_CONVERSATION_ID_CHARS:
        raise InvalidRequestError(
            f"conversation_id must be a string of 1 to {MAX_CONVERSATION_ID_CHARS} characters",
            param="conversation_id",
        )
    return value


def _storable(messages: Any, images: CheckedParts) -> list[StoredMessage]:
    """The new messages of a stored conversation, as they will be kept (400 if not storable)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list", param="messages")
    now = time.time()
    stored = []
    for index, message in enumerate(messages):
        param = f"messages.{index}"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequestError("each message must be an object with a role", param=param)
        role = "system" if message["role"] == "developer" else message["role"]
        text, digests = _text_and_images(message.get("content"), param, images)
        stored.append(
            StoredMessage(
                role,
                text,
                now,
                images=digests or None,
                tool_calls=_tool_calls(message.get("tool_calls")),
                tool_call_id=_optional_str(message.get("tool_call_id"), f"{param}.tool_call_id"),
                name=_optional_str(message.get("name"), f"{param}.name"),
            )
        )
    return stored


def _text_and_images(content: Any, param: str, images: CheckedParts) -> tuple[str, list[str]]:
    """A message's text (a string, or text parts joined) and its checked images' digests."""
    if content is None or isinstance(content, str):
        return content or "", []
    if isinstance(content, list):
        parts, digests = [], []
        for part in content:
            digest = images.digest(part)
            if digest is not None:
                digests.append(digest)
                continue
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise InvalidRequestError(
                    f"a stored conversation keeps text and images only; content part "
                    f"'{kind}' is not supported there (send it without conversation_id/store)",
                    param=f"{param}.content",
                )
            parts.append(str(part.get("text") or ""))
        return "".join(parts), digests
    raise InvalidRequestError(
        "content must be a string or a list of parts", param=f"{param}.content"
    )


def _tool_calls(value: Any) -> list[dict[str, Any]] | None:
    if not value:
        return None
    if not isinstance(value, list) or not all(isinstance(call, dict) for call in value):
        raise InvalidRequestError("tool_calls must be a list of objects", param="tool_calls")
    return [dict(call) for call in value]


def _optional_str(value: Any, param: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise InvalidRequestError(f"{param} must be a string", param=param)


def _prompt_chars(body: dict[str, Any]) -> int:
    """A rough size of the prompt(s) for the rate limiter's estimate (characters)."""
    prompt = body.get("messages", body.get("prompt"))
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        return CHARS_PER_TOKEN * len(prompt)  # token ids
    if isinstance(prompt, list) and prompt and all(_token_ids(p) for p in prompt):
        return CHARS_PER_TOKEN * sum(len(p) for p in prompt)  # a batch of token-id prompts
    return len(json.dumps(prompt, ensure_ascii=False, default=str)) if prompt else 0


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(i, int) for i in value)


def lax_int(value: Any) -> int | None:
    """``value`` as vLLM's request models read an integer, or ``None`` (unset or invalid).

    Pydantic's lax mode, as vLLM validates: ``2.0`` and ``"3"`` are integers. An invalid
    value gets vLLM's 400, so how it is estimated does not matter.
    """
    if value is None:
        return None
    try:
        return _INTEGER.validate_python(value)
    except ValidationError:
        return None


_INTEGER: TypeAdapter[int] = TypeAdapter(int)


def _most_generated(
    kind: Literal["chat", "completion"],
    body: dict[str, Any],
    service: CloudLLMService,
    prompt_chars: int,
    *,
    stateful: bool,
) -> int:
    """The most tokens vLLM may generate for ``body``, for the rate limiter's estimate.

    ``max_tokens`` (chat: ``max_completion_tokens`` first) x ``n`` x the number of
    prompts (a batched ``/v1/completions``), each read as vLLM reads it. Unset, vLLM
    generates up to 16 tokens for a completion and up to the rest of the context for a
    chat (a stored conversation's turn: ``MAX_TOKENS_CAP``, set below).
    """
    settings = service.settings
    keys = ("max_completion_tokens", "max_tokens") if kind == "chat" else ("max_tokens",)
    max_tokens = next((v for v in map(lax_int, map(body.get, keys)) if v is not None), None)
    if max_tokens is None:
        if kind == "completion":
            max_tokens = VLLM_COMPLETION_MAX_TOKENS
        elif stateful:
            max_tokens = settings.MAX_TOKENS_CAP
        else:
            max_tokens = settings.VLLM_MAX_MODEL_LEN - -(-prompt_chars // CHARS_PER_TOKEN)
    max_tokens = min(max(max_tokens, 0), settings.VLLM_MAX_MODEL_LEN)
    n = lax_int(body.get("n"))
    return max_tokens * (n if n is not None and n > 0 else 1) * _prompt_count(kind, body)


def _prompt_count(kind: Literal["chat", "completion"], body: dict[str, Any]) -> int:
    """The prompts of a request as vLLM counts them (each one answered ``n`` times).

    A list of strings or of token-id lists is a batch; one string or id list is one.
    """
    prompt = body.get("prompt")
    if kind == "chat" or not isinstance(prompt, list) or not prompt:
        return 1
    return 1 if all(isinstance(p, int) for p in prompt) else len(prompt)


def _tokens_per_event(body: dict[str, Any], service: CloudLLMService) -> int:
    """Tokens a streamed event holds at most: vLLM's ``stream_interval``.

    The request's or the server's, the larger; so counting a stream's events (one per
    choice and engine step) bounds its tokens.
    """
    requested = lax_int(body.get("stream_interval")) or 1
    server = lax_int(service.settings.VLLM_ENGINE_KWARGS.get("stream_interval")) or 1
    return max(1, requested, server)


def _affinity_key(conversation_id: str | None, messages: Any) -> str | None:
    if conversation_id is None and not isinstance(messages, list):
        return None
    opening = [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []
    return affinity_key(conversation_id, opening)
