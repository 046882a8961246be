"""``POST /v1/responses``: vLLM's ``OpenAIServingResponses``, with responses kept by us.

The body goes to an engine replica and vLLM's Responses serving class validates and
answers it there (:mod:`cloudllm_serve.engine.openai_serving`), its in-process store off
(which is why vLLM refuses ``background``: that is ours too).
What the ingress adds: ``store`` (OpenAI's default, true) keeps the response and its
input items in Redis under the tenant (:mod:`cloudllm_serve.conversations.responses`);
``previous_response_id`` loads the chain from Redis and puts each earlier response's
input and output items in front of ``input`` (oldest first), so a chain goes on from any
ingress and engine replica, after a restart too, and routing prefers the replica that
answered the previous response. ``cache_salt`` becomes the tenant's. A stream's events
are relayed as vLLM makes them; its final response comes apart from them (never decoded
here).

``background: true`` (with ``store``) answers at once with the response ``queued``; the
generation runs on this ingress replica, apart from the client, and its end is written to
Redis, where any replica reads it. ``POST /v1/responses/{id}/cancel`` (on any replica)
marks it cancelled in Redis; the replica running it sees that within
:data:`~cloudllm_serve.conversations.responses.RUN_POLL_S` and stops it in the engine. The
rate-limit charge and the engine admission are held until the generation ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse

from cloudllm_serve.conversations.responses import (
    RUN_POLL_S,
    RUNNING_STATUSES,
    ResponseStore,
    StoredResponse,
    is_response_id,
)
from cloudllm_serve.conversations.store import (
    ConversationStore,
    StoredMessage,
)
from cloudllm_serve.engine.protocol import OpenAIAnswer, OpenAICall, OpenAIItem, OpenAIStreamEnd
from cloudllm_serve.errors import (
    CloudLLMError,
    ConversationNotFoundError,
    EngineUnavailableError,
    FeatureNotImplementedError,
    FieldTypeError,
    InvalidRequestError,
)
from cloudllm_serve.ingress.cache_salt import cache_salt, client_cache_salt
from cloudllm_serve.ingress.context import RequestContext, current_request
from cloudllm_serve.ingress.conversations_api.items import to_item, to_message
from cloudllm_serve.ingress.errors import openai_error
from cloudllm_serve.ingress.openai_api.serving import lax_int
from cloudllm_serve.ingress.service import CHARS_PER_TOKEN, CloudLLMService, close_stream
from cloudllm_serve.ingress.sse import SSE_HEADERS, SSE_MEDIA_TYPE

#: Fields of the request a background response's first answer repeats (OpenAI's shape).
_ECHOED = (
    "instructions",
    "max_output_tokens",
    "model",
    "parallel_tool_calls",
    "temperature",
    "text",
    "tool_choice",
    "tools",
    "top_p",
    "truncation",
)
#: What a response that ran on a replica that stopped reads as.
ORPHANED_ERROR = {
    "code": "server_error",
    "message": "the ingress replica running this background response stopped before it "
    "finished; create it again",
}

logger = logging.getLogger(__name__)


class ResponseNotFoundError(CloudLLMError):
    """No response of this tenant has the id (404; another tenant's looks the same)."""

    status_code = 404
    openai_type = "invalid_request_error"  # OpenAI's and vLLM's type for it

    def __init__(self, response_id: str, *, param: str | None = None) -> None:
        super().__init__(f"Response with id '{response_id}' not found.", param=param)


class ConversationUnknownError(CloudLLMError):
    """``conversation`` names no conversation of this tenant (404, like any unknown id)."""

    status_code = 404

    def __init__(self, conversation_id: str) -> None:
        super().__init__(
            f"Conversation with id '{conversation_id}' not found.", param="conversation"
        )


@dataclass(frozen=True)
class ConversationTarget:
    """The conversation a response belongs to, and the request's input as its messages."""

    conversation_id: str
    new_messages: list[StoredMessage]

    async def add(
        self, store: ConversationStore, response: dict[str, Any], replica_id: str
    ) -> None:
        """Append the input, then the response's message and function-call outputs."""
        outputs = [
            to_message(item, "output")
            for item in response.get("output") or []
            if isinstance(item, dict) and item.get("type") in ("message", "function_call")
        ]
        await store.append(
            self.conversation_id,
            [*self.new_messages, *outputs],
            engine_replica=replica_id or None,
        )


def _conversation_id(value: Any) -> str | None:
    """``conversation``: an id, or ``{"id": ...}`` (400 otherwise)."""
    if isinstance(value, dict):
        value = value.get("id")
        if value is None:
            raise InvalidRequestError("conversation must name an id", param="conversation")
    if value is None or isinstance(value, str):
        return value
    raise InvalidRequestError(
        'conversation must be a conversation id or {"id": ...}', param="conversation"
    )


def response_store(service: CloudLLMService, context: RequestContext) -> ResponseStore:
    """The caller's tenant's stored responses."""
    return ResponseStore(service.conversations(context))


def input_items(value: Any) -> list[dict[str, Any]]:
    """A request's ``input`` as a list of items, each with an id (400 if neither form)."""
    if isinstance(value, str):
        value = [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise FieldTypeError("input must be a string or a non-empty list of items", param="input")
    items = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise FieldTypeError("each input item must be an object", param=f"input.{index}")
        if "id" not in item:
            item = {"id": f"msg_{uuid.uuid4().hex}", **item}
        items.append(item)
    return items


class ResponseCall:
    """One ``POST /v1/responses``: our fields read, the chain put in, the engine call built."""

    def __init__(
        self,
        service: CloudLLMService,
        context: RequestContext,
        call: OpenAICall,
        store: ResponseStore | None,
        new_items: list[dict[str, Any]],
        previous_response_id: str | None,
        background: bool = False,
    ) -> None:
        self.service = service
        self.context = context
        self.call = call
        self.store = store
        self.new_items = new_items
        self.previous_response_id = previous_response_id
        self.background = background
        #: With ``conversation``: where the new input and output items go once answered.
        self.conversation: ConversationTarget | None = None

    @classmethod
    async def prepare(
        cls, service: CloudLLMService, body: dict[str, Any], context: RequestContext
    ) -> ResponseCall:
        """Check our fields, charge the tenant, load the chain, build the engine call."""
        store = body.get("store", True)
        if not isinstance(store, bool):
            raise FieldTypeError("store must be true or false", param="store")
        background = body.get("background", False)
        if not isinstance(background, bool):
            raise FieldTypeError("background must be true or false", param="background")
        if background and not store:
            raise InvalidRequestError(
                "background responses must be stored: drop store: false", param="background"
            )
        if background and body.get("stream") is True:
            raise FeatureNotImplementedError(
                "streaming a background response is not supported yet: create it without "
                "stream and poll GET /v1/responses/{id}",
                param="stream",
            )
        body.pop("background", None)  # ours: vLLM refuses it with its store off
        previous = body.get("previous_response_id")
        if previous is not None and not isinstance(previous, str):
            raise FieldTypeError(
                "previous_response_id must be a string", param="previous_response_id"
            )
        conversation_id = _conversation_id(body.pop("conversation", None))
        if conversation_id is not None and previous is not None:
            raise InvalidRequestError(
                "give previous_response_id or conversation, not both", param="conversation"
            )
        new_items = input_items(body.get("input"))
        new_messages = (
            [to_message(item, f"input.{i}") for i, item in enumerate(new_items)]
            if conversation_id is not None
            else []
        )
        body["cache_salt"] = cache_salt(
            context.tenant_id, client_cache_salt(body.get("cache_salt"))
        )
        prompt_chars = len(json.dumps(body["input"], ensure_ascii=False, default=str))
        prompt_chars += len(str(body.get("instructions") or ""))
        settings = service.settings
        max_output = lax_int(body.get("max_output_tokens"))
        if max_output is None:
            max_output = settings.VLLM_MAX_MODEL_LEN - -(-prompt_chars // CHARS_PER_TOKEN)
        await service.admit(
            context,
            prompt_chars=prompt_chars,
            max_tokens=min(max(max_output, 0), settings.VLLM_MAX_MODEL_LEN),
            stateless=not store and previous is None and conversation_id is None,
        )
        responses = response_store(service, context)
        history: list[dict[str, Any]] = []
        root_id: str | None = None
        preferred: str | None = None
        if previous is not None:
            chain = await responses.chain(previous) if is_response_id(previous) else None
            if chain is None:
                raise ResponseNotFoundError(previous, param="previous_response_id")
            for earlier in chain:
                history.extend(earlier.input)
                history.extend(earlier.response.get("output") or [])
            root_id = chain[0].response.get("id")
            preferred = chain[-1].engine_replica or None
        conversation = None
        if conversation_id is not None:
            try:
                conversation = await service.conversations(context).get(conversation_id)
            except ConversationNotFoundError:
                raise ConversationUnknownError(conversation_id) from None
            history = [to_item(message) for message in conversation.messages or []]
            root_id = f"conv:{conversation_id}"
            preferred = conversation.engine_replica
            context.conversation_id = conversation_id
        body["input"] = [*history, *new_items]
        response_id = f"resp_{uuid.uuid4().hex}"
        call = OpenAICall(
            kind="responses",
            body=body,
            request_id=response_id,
            collect=store,
            affinity_key=f"resp:{root_id or response_id}",
            preferred_replica=preferred,
        )
        made = cls(
            service, context, call, responses if store else None, new_items, previous, background
        )
        if conversation is not None:
            made.conversation = ConversationTarget(conversation_id or "", new_messages)
        return made

    async def respond(self) -> Response:
        """Run the call: a JSON response, or the event stream once its first event is here."""
        if self.background:
            return await self._start_background()
        batches = aiter(self.service.openai(self.call, context=self.context))
        try:
            first = await anext(batches)
        except StopAsyncIteration:
            raise EngineUnavailableError("the engine ended the call without an answer") from None
        if first and isinstance(first[0], OpenAIAnswer):
            await close_stream(batches)
            return await self._whole(first[0])
        if not first or not isinstance(first[0], str):
            raise EngineUnavailableError("the engine sent a stream end before any event")
        return StreamingResponse(
            self._events(first, batches), media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS
        )

    async def _whole(self, answer: OpenAIAnswer) -> JSONResponse:
        if answer.status != 200:
            return JSONResponse(answer.body, status_code=answer.status)
        self._meter(answer.body)
        await self._keep(answer.body, answer.replica_id)
        return JSONResponse(answer.body)

    async def _events(
        self, first: list[OpenAIItem], batches: AsyncIterator[list[OpenAIItem]]
    ) -> AsyncIterator[bytes]:
        """The SSE events as vLLM makes them, a batch per write; the end keeps the response."""
        try:
            batch: list[OpenAIItem] | None = first
            while batch is not None:
                events = "".join(item for item in batch if isinstance(item, str))
                if events:
                    yield events.encode()
                for item in batch:
                    if isinstance(item, OpenAIStreamEnd) and item.message is not None:
                        self._meter(item.message)
                        await self._keep(item.message, item.replica_id)
                batch = await anext(batches, None)
        except CloudLLMError as error:
            # OpenAI's error event: the error's fields beside ``type``.
            event = {"type": "error", **openai_error(error)["error"]}
            yield f"event: error\ndata: {json.dumps(event)}\n\n".encode()
        finally:
            await close_stream(batches)

    def _meter(self, response: dict[str, Any]) -> None:
        usage = response.get("usage")
        if isinstance(usage, dict):
            self.context.record_usage(
                int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)
            )

    async def _keep(self, response: dict[str, Any], replica_id: str) -> None:
        """Keep an answered response (with ``store``) and add it to its conversation."""
        if self.conversation is not None:
            response["conversation"] = {"id": self.conversation.conversation_id}
            await self.conversation.add(
                self.service.conversations(self.context), response, replica_id
            )
        if self.store is None:
            return
        await self.store.put(
            StoredResponse(response, self.new_items, self.previous_response_id, replica_id)
        )

    # Background ---------------------------------------------------------------------

    async def _start_background(self) -> JSONResponse:
        """Keep the response as queued, start its generation here, answer at once."""
        assert self.store is not None
        body = self.call.body
        first: dict[str, Any] = {
            "id": self.call.request_id,
            "object": "response",
            "created_at": int(time.time()),
            "status": "queued",
            "background": True,
            "error": None,
            "incomplete_details": None,
            "metadata": body.get("metadata") or {},
            "output": [],
            "previous_response_id": self.previous_response_id,
            "store": True,
            "usage": None,
            **{name: body[name] for name in _ECHOED if name in body},
        }
        if "model" not in first:
            first["model"] = (await self.service.engine.model_info()).model_name
        running = {**first, "status": "in_progress"}
        await self.store.start_background(self._stored(running))
        owned = self.context.detach()
        self.service.spawn(self._run_background(owned, running))
        return JSONResponse(first)

    def _stored(self, response: dict[str, Any], replica_id: str = "") -> StoredResponse:
        return StoredResponse(response, self.new_items, self.previous_response_id, replica_id)

    async def _run_background(self, owned: RequestContext, running: dict[str, Any]) -> None:
        """Generate apart from the client; write the end unless cancelled; settle."""
        assert self.store is not None
        current_request.set(owned)
        generation = asyncio.ensure_future(self._whole_answer(owned))
        final: StoredResponse | None = None
        try:
            while not generation.done():
                await asyncio.wait({generation}, timeout=RUN_POLL_S)
                if generation.done():
                    break
                try:
                    state = await self.store.heartbeat(self.call.request_id)
                except CloudLLMError:  # Redis away for a moment: keep generating
                    continue
                if state != "in_progress":  # cancelled, or deleted
                    generation.cancel()
                    await asyncio.wait({generation})
                    break
            if not generation.cancelled():
                final = self._ended(running, generation)
        except asyncio.CancelledError:  # this replica is stopping
            generation.cancel()
            final = self._stored({**running, "status": "failed", "error": ORPHANED_ERROR})
            raise
        finally:
            if final is not None:
                try:
                    if await self.store.finish_background(final):
                        await self._add_to_conversation(owned, final)
                except CloudLLMError as error:
                    logger.warning("background response %s: %s", self.call.request_id, error)
            await self.service.settle(owned)
            self._count_tokens(owned)

    def _ended(
        self, running: dict[str, Any], generation: asyncio.Future[OpenAIAnswer]
    ) -> StoredResponse:
        """The record of a background generation that ended (answered or failed)."""
        error = generation.exception()
        if error is not None:
            failure = openai_error(error)["error"] if isinstance(error, CloudLLMError) else None
            message = failure["message"] if failure else "the generation failed"
            return self._stored(
                {
                    **running,
                    "status": "failed",
                    "error": {"code": "server_error", "message": message},
                }
            )
        answer = generation.result()
        if answer.status != 200:
            detail = answer.body.get("error") if isinstance(answer.body, dict) else None
            message = detail.get("message") if isinstance(detail, dict) else str(answer.body)
            return self._stored(
                {
                    **running,
                    "status": "failed",
                    "error": {"code": "invalid_request", "message": message},
                }
            )
        return self._stored({**answer.body, "background": True}, answer.replica_id)

    async def _add_to_conversation(self, owned: RequestContext, final: StoredResponse) -> None:
        """A background response that completed, added to its conversation (if any)."""
        if self.conversation is None or final.response.get("status") == "failed":
            return
        final.response["conversation"] = {"id": self.conversation.conversation_id}
        await self.conversation.add(
            self.service.conversations(owned), final.response, final.engine_replica
        )

    async def _whole_answer(self, owned: RequestContext) -> OpenAIAnswer:
        """The engine's whole answer to the call (the engine request ends when cancelled)."""
        batches = aiter(self.service.openai(self.call, context=owned))
        try:
            async for batch in batches:
                for item in batch:
                    if isinstance(item, OpenAIAnswer):
                        if item.status == 200:
                            self._meter_into(owned, item.body)
                        return item
        finally:
            await close_stream(batches)
        raise EngineUnavailableError("the engine ended the call without an answer")

    @staticmethod
    def _meter_into(context: RequestContext, response: dict[str, Any]) -> None:
        usage = response.get("usage")
        if isinstance(usage, dict):
            context.record_usage(
                int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)
            )

    def _count_tokens(self, owned: RequestContext) -> None:
        """Count the background generation's tokens into the token metrics.

        The request that started it was measured before they existed.
        """
        tenant = owned.tenant_id or ""
        metrics = self.service.metrics
        if owned.prompt_tokens:
            metrics.tokens.add(owned.prompt_tokens, kind="prompt", tenant=tenant)
        if owned.completion_tokens:
            metrics.tokens.add(owned.completion_tokens, kind="completion", tenant=tenant)


async def cancel_response(store: ResponseStore, response_id: str) -> dict[str, Any]:
    """``POST /v1/responses/{id}/cancel``: the response, cancelled if it was running."""
    stored, state = await store.get_running(response_id)
    if stored is None:
        raise ResponseNotFoundError(response_id)
    response = stored.response
    if not response.get("background"):
        raise InvalidRequestError("only a background response can be cancelled")
    status = response.get("status")
    if status in RUNNING_STATUSES and state is not None:
        cancelled = StoredResponse(
            {**response, "status": "cancelled"},
            stored.input,
            stored.previous_response_id,
            stored.engine_replica,
        )
        if await store.cancel(cancelled):
            return cancelled.response
        stored, state = await store.get_running(response_id)  # it ended meanwhile
        if stored is None:
            raise ResponseNotFoundError(response_id)
    current = as_read(stored, state)
    if current.get("status") not in ("cancelled",):
        raise InvalidRequestError(
            f"response {response_id} is {current.get('status')}: only a queued or "
            "in-progress response can be cancelled"
        )
    return current


def as_read(stored: StoredResponse, state: str | None) -> dict[str, Any]:
    """A kept response as a client reads it.

    One left running by a replica that stopped (no run key any more) reads as failed.
    """
    response = stored.response
    if response.get("background") and response.get("status") in RUNNING_STATUSES and not state:
        return {**response, "status": "failed", "error": ORPHANED_ERROR}
    return response
