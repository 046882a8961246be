"""Chat and text completions in OpenAI's wire format over :class:`CloudLLMService`.

Responses are built as plain dicts (no model validation on the way out): the shape is
fixed here and covered by the tests, and the hot path stays cheap.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from cloudllm_serve.conversations.store import StoredMessage
from cloudllm_serve.engine.protocol import GenerationChunk, GenerationRequest, SamplingOptions
from cloudllm_serve.errors import CloudLLMError, InvalidRequestError, ModelNotFoundError
from cloudllm_serve.ingress.context import RequestContext
from cloudllm_serve.ingress.errors import openai_error
from cloudllm_serve.ingress.openai_api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
)
from cloudllm_serve.ingress.service import (
    CloudLLMService,
    CompletionBuilder,
    ConversationTurn,
    check_json_schema,
)
from cloudllm_serve.ingress.sse import DONE, sse_event

CONVERSATION_HEADER = "X-Conversation-Id"


class CompletionCall:
    """One chat or text completion: validated, conversation loaded, ready to run."""

    def __init__(
        self,
        service: CloudLLMService,
        body: SamplingFields,
        request: GenerationRequest,
        *,
        chat: bool,
        turn: ConversationTurn,
        new_messages: list[StoredMessage],
        context: RequestContext,
    ) -> None:
        self.context = context
        self.service = service
        self.body = body
        self.request = request
        self.chat = chat
        self.turn = turn
        self.new_messages = new_messages
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = service.settings.model_name
        self.prompt_param = "messages" if chat else "prompt"

    @property
    def headers(self) -> dict[str, str]:
        """Response headers: the conversation id when there is one."""
        cid = self.turn.conversation_id
        return {CONVERSATION_HEADER: cid} if cid else {}

    # Building the call -----------------------------------------------------------

    @staticmethod
    def _sampling(
        service: CloudLLMService, body: SamplingFields, max_tokens: int | None
    ) -> SamplingOptions:
        if body.model is not None and body.model != service.settings.model_name:
            raise ModelNotFoundError(body.model)
        json_schema = None
        json_object = False
        if body.response_format is not None and body.response_format.type == "json_schema":
            assert body.response_format.json_schema is not None
            json_schema = body.response_format.json_schema.schema_
            check_json_schema(json_schema, "response_format.json_schema.schema")
        elif body.response_format is not None and body.response_format.type == "json_object":
            json_object = True
        return SamplingOptions(
            max_tokens=service.clamp_max_tokens(max_tokens),
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stop_sequences,
            seed=body.seed,
            n=body.n,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            ignore_eos=body.ignore_eos,
            json_schema=json_schema,
            json_object=json_object,
        )

    @classmethod
    async def for_chat(
        cls, service: CloudLLMService, body: ChatCompletionRequest, context: RequestContext
    ) -> CompletionCall:
        """Validate a chat request, charge the tenant, load (or start) its conversation."""
        sampling = cls._sampling(service, body, body.max_completion_tokens or body.max_tokens)
        now = time.time()
        try:
            new = [
                StoredMessage("system" if m.role == "developer" else m.role, m.text(), now)
                for m in body.messages
            ]
        except ValueError as error:
            raise InvalidRequestError(str(error), param="messages") from None
        if body.conversation_id is not None and body.n != 1:
            raise InvalidRequestError("n must be 1 when continuing a conversation", param="n")
        if body.conversation_id is not None and body.store:
            raise InvalidRequestError(
                "store starts a new conversation; do not combine it with conversation_id",
                param="store",
            )
        stateless = body.conversation_id is None and not body.store
        await service.admit(
            context,
            prompt_chars=sum(len(m.content) for m in new),
            max_tokens=sampling.max_tokens * sampling.n,
            stateless=stateless,
        )
        turn = await service.begin_turn(body.conversation_id, create=body.store, context=context)
        messages = turn.chat_messages(new)
        request = GenerationRequest(
            request_id=f"chatcmpl-{uuid.uuid4().hex}",
            sampling=sampling,
            messages=messages,
            stream=body.stream,
            affinity_key=turn.affinity_key(messages),
            preferred_replica=turn.engine_replica,
        )
        return cls(service, body, request, chat=True, turn=turn, new_messages=new, context=context)

    @classmethod
    async def for_completion(
        cls, service: CloudLLMService, body: CompletionRequest, context: RequestContext
    ) -> CompletionCall:
        """Validate a text completion request and charge the tenant."""
        sampling = cls._sampling(service, body, body.max_tokens)
        prompt = body.single_prompt
        await service.admit(
            context,
            # A token-id prompt: about CHARS_PER_TOKEN characters per id.
            prompt_chars=len(prompt) if isinstance(prompt, str) else 4 * len(prompt),
            max_tokens=sampling.max_tokens * sampling.n,
            stateless=True,
        )
        request = GenerationRequest(
            request_id=f"cmpl-{uuid.uuid4().hex}",
            sampling=sampling,
            prompt=prompt,
            stream=body.stream,
        )
        turn = ConversationTurn(None, False, [])
        return cls(service, body, request, chat=False, turn=turn, new_messages=[], context=context)

    # Running it ------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        """The whole answer as one response body."""
        try:
            completion = await self.service.collect(self.request, prompt_param=self.prompt_param)
            self.context.record_usage(
                completion.final.prompt_tokens, sum(completion.completion_tokens)
            )
            if self.turn.conversation_id is not None:
                await self.service.finish_turn(self.turn, self.new_messages, completion)
        except BaseException:
            await self.service.abandon_turn(self.turn)
            raise
        choices = []
        for index, text in enumerate(completion.texts):
            choice: dict[str, Any] = {
                "index": index,
                "logprobs": None,
                "finish_reason": completion.finish_reasons[index],
            }
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choices.append(choice)
        body = self._envelope("chat.completion" if self.chat else "text_completion")
        body["choices"] = choices
        body["usage"] = _usage(completion.final, sum(completion.completion_tokens))
        if self.turn.conversation_id is not None:
            body["conversation_id"] = self.turn.conversation_id
        return body

    async def start_events(self) -> AsyncIterator[bytes]:
        """Start generating; return the server-sent chunks once the first token is here."""
        try:
            chunks = await self.service.open_stream(self.request, prompt_param=self.prompt_param)
        except BaseException:
            await self.service.abandon_turn(self.turn)
            raise
        return self._events(chunks)

    async def _events(self, chunks: AsyncIterator[GenerationChunk]) -> AsyncIterator[bytes]:
        """Chunks as OpenAI streams them, then ``data: [DONE]`` (an error event midway)."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        started_choices: set[int] = set()
        builder = CompletionBuilder(self.request.sampling.n)
        try:
            async for chunk in chunks:
                builder.add(chunk)
                deltas = []
                for choice in chunk.choices:
                    if not choice.text and choice.finish_reason is None:
                        continue
                    deltas.append(
                        self._delta(
                            choice.index, choice.text, choice.finish_reason, started_choices
                        )
                    )
                if deltas:
                    event = self._envelope(kind)
                    event["choices"] = deltas
                    yield sse_event(event)
            completion = builder.build()
            self.context.record_usage(
                completion.final.prompt_tokens, sum(completion.completion_tokens)
            )
            if self.turn.conversation_id is not None:
                await self.service.finish_turn(self.turn, self.new_messages, completion)
        except CloudLLMError as error:
            await self.service.abandon_turn(self.turn)
            yield sse_event(openai_error(error))
            yield DONE
            return
        except BaseException:
            await self.service.abandon_turn(self.turn)
            raise
        if self.body.include_usage:
            event = self._envelope(kind)
            event["choices"] = []
            event["usage"] = _usage(completion.final, sum(completion.completion_tokens))
            yield sse_event(event)
        yield DONE

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _delta(
        self, index: int, text: str, finish_reason: str | None, started: set[int]
    ) -> dict[str, Any]:
        if not self.chat:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
        delta: dict[str, Any] = {"content": text} if text else {}
        if index not in started:  # the role goes with the first token, as vLLM sends it
            started.add(index)
            delta["role"] = "assistant"
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def _usage(final: GenerationChunk, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": final.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": final.prompt_tokens + completion_tokens,
    }
