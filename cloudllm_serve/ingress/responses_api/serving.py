"""``POST /v1/responses``: vLLM's ``OpenAIServingResponses``, with responses kept by us.

The body goes to an engine replica and vLLM's Responses serving class validates and
answers it there (:mod:`cloudllm_serve.engine.openai_serving`), its in-process store off.
What the ingress adds: ``store`` (OpenAI's default, true) keeps the response and its
input items in Redis under the tenant (:mod:`cloudllm_serve.conversations.responses`);
``previous_response_id`` loads the chain from Redis and puts each earlier response's
input and output items in front of ``input`` (oldest first), so a chain goes on from any
ingress and engine replica, after a restart too, and routing prefers the replica that
answered the previous response. ``cache_salt`` becomes the tenant's. A stream's events
are relayed as vLLM makes them; its final response comes apart from them (never decoded
here).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse

from cloudllm_serve.conversations.responses import ResponseStore, StoredResponse, is_response_id
from cloudllm_serve.engine.protocol import OpenAIAnswer, OpenAICall, OpenAIItem, OpenAIStreamEnd
from cloudllm_serve.errors import (
    CloudLLMError,
    EngineUnavailableError,
    FeatureNotImplementedError,
    InvalidRequestError,
)
from cloudllm_serve.ingress.cache_salt import cache_salt, client_cache_salt
from cloudllm_serve.ingress.context import RequestContext
from cloudllm_serve.ingress.errors import openai_error
from cloudllm_serve.ingress.openai_api.serving import lax_int
from cloudllm_serve.ingress.service import CHARS_PER_TOKEN, CloudLLMService, close_stream
from cloudllm_serve.ingress.sse import SSE_HEADERS, SSE_MEDIA_TYPE

#: Fields of OpenAI's Responses API not served yet (501 naming them).
_NOT_YET = ("background", "conversation")


class ResponseNotFoundError(CloudLLMError):
    """No response of this tenant has the id (404; another tenant's looks the same)."""

    status_code = 404

    def __init__(self, response_id: str, *, param: str | None = None) -> None:
        super().__init__(f"Response with id '{response_id}' not found.", param=param)


def response_store(service: CloudLLMService, context: RequestContext) -> ResponseStore:
    """The caller's tenant's stored responses."""
    return ResponseStore(service.conversations(context))


def input_items(value: Any) -> list[dict[str, Any]]:
    """A request's ``input`` as a list of items, each with an id (400 if neither form)."""
    if isinstance(value, str):
        value = [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise InvalidRequestError(
            "input must be a string or a non-empty list of items", param="input"
        )
    items = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise InvalidRequestError("each input item must be an object", param=f"input.{index}")
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
    ) -> None:
        self.service = service
        self.context = context
        self.call = call
        self.store = store
        self.new_items = new_items
        self.previous_response_id = previous_response_id

    @classmethod
    async def prepare(
        cls, service: CloudLLMService, body: dict[str, Any], context: RequestContext
    ) -> ResponseCall:
        """Check our fields, charge the tenant, load the chain, build the engine call."""
        for name in _NOT_YET:
            if body.get(name) not in (None, False):
                raise FeatureNotImplementedError(
                    f"'{name}' is not supported on /v1/responses yet", param=name
                )
        store = body.get("store", True)
        if not isinstance(store, bool):
            raise InvalidRequestError("store must be true or false", param="store")
        previous = body.get("previous_response_id")
        if previous is not None and not isinstance(previous, str):
            raise InvalidRequestError(
                "previous_response_id must be a string", param="previous_response_id"
            )
        new_items = input_items(body.get("input"))
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
            stateless=not store and previous is None,
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
        return cls(service, context, call, responses if store else None, new_items, previous)

    async def respond(self) -> Response:
        """Run the call: a JSON response, or the event stream once its first event is here."""
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
        if self.store is None:
            return
        await self.store.put(
            StoredResponse(response, self.new_items, self.previous_response_id, replica_id)
        )
