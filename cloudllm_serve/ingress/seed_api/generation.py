"""``POST /generate`` (and ``/vision``, ``/multimodal``): one turn of a conversation.

Answered whole or as server-sent events; an image endpoint's checked images go with
the message and are kept with it in the conversation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from referencing import Registry
from referencing.exceptions import Unresolvable

from cloudllm_serve.conversations.store import StoredMessage
from cloudllm_serve.engine.protocol import GenerationChunk, GenerationRequest, SamplingOptions
from cloudllm_serve.errors import CloudLLMError
from cloudllm_serve.ingress.cache_salt import cache_salt
from cloudllm_serve.ingress.context import RequestContext
from cloudllm_serve.ingress.images import CheckedImage
from cloudllm_serve.ingress.response_json import extract_json
from cloudllm_serve.ingress.seed_api.image_input import RawImage, check_images
from cloudllm_serve.ingress.seed_api.schemas import (
    GenerateRequest,
    GenerationResponse,
    ModelInfo,
    Timings,
)
from cloudllm_serve.ingress.service import (
    CloudLLMService,
    Completion,
    CompletionBuilder,
    ConversationTurn,
    check_json_schema,
    json_schema_validator,
)
from cloudllm_serve.ingress.sse import sse_event


class GenerateCall:
    """One ``/generate`` request: validated, its conversation loaded, ready to run."""

    def __init__(
        self,
        service: CloudLLMService,
        body: GenerateRequest,
        turn: ConversationTurn,
        received_at: float,
        context: RequestContext,
        images: list[CheckedImage] | None = None,
    ) -> None:
        self.service = service
        self.body = body
        self.turn = turn
        self.context = context
        self.received_at = received_at
        self.started = time.perf_counter()
        digests = turn.add_images(images) if images else None
        self.user_message = StoredMessage("user", body.message, time.time(), images=digests)
        messages = turn.chat_messages([self.user_message])
        self.request = GenerationRequest(
            # Ours, never the client's X-Request-Id (which two requests may share).
            request_id=context.internal_id,
            messages=messages,
            affinity_key=turn.affinity_key(messages),
            preferred_replica=turn.engine_replica,
            sampling=SamplingOptions(
                max_tokens=service.clamp_max_tokens(body.max_tokens),
                temperature=float(body.temperature),
                json_schema=body.json_schema,
            ),
            stream=body.stream,
            cache_salt=cache_salt(context.tenant_id),
        )

    @classmethod
    async def prepare(
        cls,
        service: CloudLLMService,
        body: GenerateRequest,
        received_at: float,
        context: RequestContext,
        images: list[RawImage] | None = None,
    ) -> GenerateCall:
        """Charge the tenant, check the schema and images, load (or start) the conversation.

        ``images`` (each field name and bytes or reference, unchecked) are fetched and
        checked here, then shown with the message and kept with it.

        The tenant is charged first: one over its limits is refused (429) before any
        costly check runs (a schema compiled, an image fetched or decoded), and those
        checks run in worker threads, off the event loop. Everything that can fail before
        generating fails here, so a streamed answer still gets a proper HTTP status for a
        bad schema, a rate limit, an unknown id or Redis down.
        """
        await service.admit(
            context,
            prompt_chars=len(body.message),
            max_tokens=service.clamp_max_tokens(body.max_tokens),
            stateless=False,
        )
        if body.json_schema is not None:
            await asyncio.to_thread(
                check_json_schema,
                body.json_schema,
                "json_schema",
                max_bytes=service.settings.MAX_JSON_SCHEMA_BYTES,
            )
        checked = await check_images(images, service.settings) if images else None
        turn = await service.begin_turn(body.conversation_id, create=True, context=context)
        return cls(service, body, turn, received_at, context, checked)

    async def run(self) -> GenerationResponse:
        """Generate the whole answer, store the turn, build the response."""
        try:
            completion = await self.service.collect(
                self.request, prompt_param="message", context=self.context
            )
            await self.service.finish_turn(self.turn, [self.user_message], completion)
        except BaseException:
            await self.service.abandon_turn(self.turn)
            raise
        return self._response(completion, await self._parsed(completion.text))

    async def start_events(self) -> AsyncIterator[bytes]:
        """Start generating; return the server-sent events once the first token is here."""
        try:
            chunks = await self.service.open_stream(
                self.request, prompt_param="message", context=self.context
            )
        except BaseException:
            await self.service.abandon_turn(self.turn)
            raise
        return self._events(chunks)

    async def _events(self, batches: AsyncIterator[list[GenerationChunk]]) -> AsyncIterator[bytes]:
        """``delta`` per text delta, then ``final`` (or ``error`` if it fails midway).

        The deltas of one batch from the engine go out in one write.
        """
        builder = CompletionBuilder()
        try:
            async for batch in batches:
                events = []
                for chunk in batch:
                    builder.add(chunk)
                    events += [
                        sse_event({"type": "delta", "delta": choice.text})
                        for choice in chunk.choices
                        if choice.text
                    ]
                if events:
                    yield b"".join(events)
            completion = builder.build()
            await self.service.finish_turn(self.turn, [self.user_message], completion)
        except CloudLLMError as error:
            await self.service.abandon_turn(self.turn)
            yield sse_event({"type": "error", "status": error.status_code, "detail": error.message})
            return
        except BaseException:
            await self.service.abandon_turn(self.turn)
            raise
        response = self._response(completion, await self._parsed(completion.text))
        yield sse_event({"type": "final", "response": response.model_dump()})

    async def _parsed(self, text: str) -> tuple[Any, float]:
        """The JSON in the answer (``None``: none, or not following the schema), and ms taken.

        Checked against the schema in a worker thread (compiling it is CPU-bound).
        """
        started = time.perf_counter()
        parsed = extract_json(text)
        schema = self.body.json_schema
        if (
            parsed is not None
            and schema is not None
            and not await asyncio.to_thread(_valid, parsed, schema)
        ):
            parsed = None
        return parsed, (time.perf_counter() - started) * 1000

    def _response(
        self, completion: Completion, parsed_json: tuple[Any, float]
    ) -> GenerationResponse:
        finished = time.perf_counter()
        parsed, json_parse_ms = parsed_json

        final = completion.final
        metrics = final.metrics
        generation_ms = metrics.generation_ms if metrics else (finished - self.started) * 1000
        tokens = completion.completion_tokens
        timings = Timings(
            generation_ms=round(generation_ms, 3),
            total_ms=round((finished - self.started) * 1000, 3),
            tokens_generated=tokens,
            tokens_per_second=round(tokens / (generation_ms / 1000), 3)
            if generation_ms > 0
            else 0.0,
            endpoint_total_ms=round((time.perf_counter() - self.received_at) * 1000, 3),
            json_parse_ms=round(json_parse_ms, 3),
            ttft_ms=round(metrics.ttft_ms, 3) if metrics else None,
            queue_ms=round(metrics.queue_ms, 3) if metrics else None,
            prompt_tokens=final.prompt_tokens,
            store_ms=round(self.turn.store_ms, 3),
            engine_replica=(metrics.replica_id or None) if metrics else None,
            ingress_replica=self.service.replica_id or None,
        )
        assert self.turn.conversation_id is not None
        return GenerationResponse(
            response=completion.text,
            conversation_id=self.turn.conversation_id,
            generation_time=round(generation_ms / 1000, 6),
            model_info=ModelInfo(
                engine=self.service.settings.engine_type,
                model_name=self.service.settings.model_name,
                max_tokens=self.request.sampling.max_tokens,
                temperature=self.request.sampling.temperature,
                timings=timings,
            ),
            response_json=parsed,
            response_is_json=parsed is not None,
            finish_reason=completion.finish_reason,
            dropped_history_messages=final.dropped_messages,
        )


def _valid(value: Any, schema: dict[str, Any]) -> bool:
    """Whether ``value`` follows ``schema`` (checked already by ``check_json_schema``).

    ``$ref`` is resolved within the schema only: never fetched from the network (an
    unresolvable reference, local or remote, means the answer is not taken as valid).
    """
    validator = json_schema_validator(schema)(schema, registry=Registry())
    try:
        return bool(validator.is_valid(value))
    except (Unresolvable, RecursionError):
        return False
