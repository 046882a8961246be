"""Logic shared by both APIs, independent of HTTP and of Ray.

:class:`CloudLLMService` holds the conversation store and an engine client (both
injected), loads and stores conversation turns, and runs generations, turning engine
errors into the project's errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import jsonschema

from cloudllm_serve.conversations.store import ConversationStore, StorageQuota, StoredMessage
from cloudllm_serve.engine.protocol import (
    ChatMessage,
    EngineClient,
    GenerationChunk,
    GenerationRequest,
    OpenAIAnswer,
    OpenAICall,
    OpenAIItem,
)
from cloudllm_serve.errors import (
    CloudLLMError,
    EngineOverloadedError,
    EngineUnavailableError,
    FeatureNotImplementedError,
    InvalidRequestError,
    PromptTooLongError,
    RequestTimeoutError,
)
from cloudllm_serve.ingress.admission import AdmissionTicket, DeadlineAdmission
from cloudllm_serve.ingress.context import RequestContext
from cloudllm_serve.ingress.images import CheckedImage
from cloudllm_serve.ingress.rate_limits import RateLimited, RateLimiter
from cloudllm_serve.keys import KeyRegistry
from cloudllm_serve.metrics import IngressMetrics
from cloudllm_serve.settings import Settings

_Item = TypeVar("_Item")

#: Characters per token assumed when estimating a prompt before it is tokenized.
CHARS_PER_TOKEN = 4
#: How often a request admitted to wait for a batch slot is checked while it waits.
LATE_CHECK_S = 0.5


@dataclass(frozen=True)
class Completion:
    """A whole generation, gathered from the engine's chunks."""

    text: str
    finish_reason: str | None
    completion_tokens: int
    final: GenerationChunk


class CompletionBuilder:
    """Gathers a generation's chunks into a :class:`Completion`."""

    def __init__(self) -> None:
        self._text: list[str] = []
        self._reason: str | None = None
        self._tokens = 0
        self._final: GenerationChunk | None = None

    def add(self, chunk: GenerationChunk) -> None:
        """Take in one chunk."""
        for choice in chunk.choices:
            self._text.append(choice.text)
            self._tokens += choice.token_count
            self._reason = choice.finish_reason or self._reason
        if chunk.finished:
            self._final = chunk

    def build(self) -> Completion:
        """The whole generation; only once the final chunk was added."""
        if self._final is None:
            raise EngineUnavailableError("engine stream ended without a final chunk")
        return Completion("".join(self._text), self._reason, self._tokens, self._final)


@dataclass
class ConversationTurn:
    """The conversation a request continues (or none), loaded before generating.

    ``store`` is the caller's tenant's view of the store; ``store_ms`` adds up the time
    this request spent waiting on Redis.
    """

    conversation_id: str | None
    created: bool
    history: list[StoredMessage]
    store: ConversationStore | None = None
    store_ms: float = 0.0
    #: The engine replica that answered the previous turn (its prefix cache has it).
    engine_replica: str | None = None
    #: The conversation's images (digest → data URL), with this request's new ones.
    images: dict[str, str] = field(default_factory=dict)

    def chat_messages(self, new: list[StoredMessage]) -> list[ChatMessage]:
        """History plus the new messages, as the engine takes them (images included)."""
        return [m.chat_message(self.images) for m in (*self.history, *new)]

    def add_images(self, images: list[CheckedImage]) -> list[str]:
        """Take in this request's images; return their digests (what a message stores)."""
        digests = []
        for image in images:
            digest = image.digest
            self.images.setdefault(digest, image.data_url())
            digests.append(digest)
        return digests

    def affinity_key(self, messages: list[ChatMessage]) -> str:
        """Routing key of this conversation (see :func:`affinity_key`)."""
        return affinity_key(self.conversation_id, messages)


def affinity_key(conversation_id: str | None, messages: list[ChatMessage]) -> str:
    """The engine-routing key of a chat: the stored conversation's id, else its opening.

    A stateless client resends the whole history each turn; its opening (messages up to
    the first user message) stays the same, so hashing it keeps the turns together.
    """
    if conversation_id is not None:
        return f"conv:{conversation_id}"
    opening: list[ChatMessage] = []
    for message in messages:
        opening.append(message)
        if message.get("role") == "user":
            break
    digest = hashlib.blake2b(_stable_bytes(opening), digest_size=12).hexdigest()
    return f"chat:{digest}"


def _stable_bytes(messages: list[ChatMessage]) -> bytes:
    """A stable byte form of messages for hashing."""
    return json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()


_ERROR_KINDS: dict[str, type[CloudLLMError]] = {
    "prompt_too_long": PromptTooLongError,
    "invalid_request": InvalidRequestError,
    "engine_failure": EngineUnavailableError,
}


def json_schema_validator(schema: dict[str, Any]) -> type[jsonschema.protocols.Validator]:
    """The validator class of ``schema``'s ``$schema`` dialect (an unknown one: 2020-12)."""
    validator: type[jsonschema.protocols.Validator] = jsonschema.validators.validator_for(
        schema, default=jsonschema.Draft202012Validator
    )
    return validator


def check_json_schema(schema: dict[str, Any], param: str, *, max_bytes: int) -> None:
    """Raise a 400 naming ``param`` when ``schema`` is not a valid JSON Schema.

    Or when it is longer than ``max_bytes`` as compact JSON (``MAX_JSON_SCHEMA_BYTES``):
    checking costs milliseconds per KiB. CPU-bound: call it in a worker thread.
    """
    size = len(json.dumps(schema, separators=(",", ":"), ensure_ascii=False).encode())
    if size > max_bytes:
        raise InvalidRequestError(
            f"{param} is {size} bytes as compact JSON, more than MAX_JSON_SCHEMA_BYTES "
            f"({max_bytes})",
            param=param,
        )
    dialect = schema.get("$schema")
    if dialect is not None and not isinstance(dialect, str):
        raise InvalidRequestError(
            f"{param} is not a valid JSON Schema: $schema must be a string (a dialect's URI)",
            param=param,
        )
    try:
        json_schema_validator(schema).check_schema(schema)
    except jsonschema.SchemaError as error:
        raise InvalidRequestError(
            f"{param} is not a valid JSON Schema: {error.message}", param=param
        ) from None
    except RecursionError:
        raise InvalidRequestError(
            f"{param} is nested too deeply to be checked as a JSON Schema", param=param
        ) from None


class CloudLLMService:
    """Shared logic of both APIs over a :class:`ConversationStore` and an ``EngineClient``."""

    def __init__(
        self,
        settings: Settings,
        store: ConversationStore,
        engine: EngineClient,
        *,
        registry: KeyRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.engine = engine
        self.registry = registry or KeyRegistry(settings)
        self.limiter = RateLimiter(
            store.client,
            key_prefix=store.key_prefix,
            # A slot lapses by itself a while after the longest a request may take.
            lease_s=settings.REQUEST_TIMEOUT_S + 60,
            ingress_replicas=settings.INGRESS_REPLICAS,
        )
        #: Generations running on the engines for this replica, and the engines' time
        #: spent on those that finished (``/status/detailed``; the rest is in ``metrics``).
        self.in_flight = 0
        self.generation_ms_total = 0.0
        self.metrics = IngressMetrics(
            export=settings.METRICS_ENABLED, tenant_labels=settings.METRICS_TENANT_LABELS
        )
        store.observer = self._observe_store
        #: Refuses at once what the engines cannot finish within REQUEST_TIMEOUT_S.
        self.admission = DeadlineAdmission(settings)
        #: Serve's id of the ingress replica running this service ("" outside Serve).
        #: Work that outlives its HTTP request (background responses), kept referenced.
        self.background_tasks: set[asyncio.Task[None]] = set()
        self.replica_id = ""
        self._started_at = time.monotonic()
        self.started_at_unix = time.time()

    def _observe_store(self, operation: str, seconds: float, failed: bool) -> None:
        self.metrics.store_duration.add(seconds, operation=operation)
        if failed:
            self.metrics.store_errors.add(operation=operation)

    @property
    def uptime_s(self) -> float:
        """Seconds since this service started."""
        return time.monotonic() - self._started_at

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``work`` apart from the request that started it (cancelled at shutdown)."""
        task = asyncio.ensure_future(work)
        self.background_tasks.add(task)
        task.add_done_callback(self.background_tasks.discard)
        return task

    async def settle(self, context: RequestContext) -> None:
        """Release a request's engine ticket and settle its rate-limit charge."""
        if context.ticket is not None:
            context.ticket.release()
        if context.admission is not None:
            used = context.settled_tokens(context.admission.charged_tokens)
            await self.limiter.settle(context.admission, used)

    def clamp_max_tokens(self, requested: int | None) -> int:
        """``requested`` (default: the cap) bounded by ``MAX_TOKENS_CAP``."""
        cap = self.settings.MAX_TOKENS_CAP
        return cap if requested is None else min(requested, cap)

    # Tenants and limits -----------------------------------------------------------

    def conversations(self, context: RequestContext) -> ConversationStore:
        """The store as the caller's tenant sees it: its own conversations, its quotas."""
        return self.store.for_tenant(context.tenant_id, self.storage_quota(context))

    def storage_quota(self, context: RequestContext) -> StorageQuota:
        """The caller's tenant's storage quotas: its key file's, else the environment's."""
        settings = self.settings
        tenant = context.principal.tenant if context.principal is not None else None
        own = (
            (tenant.max_conversations, tenant.max_messages_per_conversation, tenant.max_image_bytes)
            if tenant is not None
            else (None, None, None)
        )
        defaults = (
            settings.MAX_CONVERSATIONS,
            settings.MAX_MESSAGES_PER_CONVERSATION,
            settings.MAX_IMAGE_BYTES,
        )
        conversations, messages, image_bytes = (
            default if value is None else value
            for value, default in zip(own, defaults, strict=True)
        )
        return StorageQuota(conversations, messages, image_bytes)

    async def admit(
        self,
        context: RequestContext,
        *,
        prompt_chars: int,
        max_tokens: int,
        stateless: bool,
        generation: bool = True,
    ) -> None:
        """Admit a generation (or refuse it: 503/429), then charge it to the tenant (429).

        First, for a ``generation``, the deadline admission (:mod:`.admission`): one the
        engines would not finish within ``REQUEST_TIMEOUT_S``, or one over its tenant's
        share of a full fleet, is refused before anything else runs; its ticket is
        released when the answer is done (:mod:`.access`). Then, with keys, the charge:
        an estimate (``prompt_chars`` / 4 plus ``max_tokens``, the most the request may
        generate), settled when the answer is done (:meth:`RequestContext.settled_tokens`).
        """
        if generation:
            self.admission.start(self.engine.fleet)
            try:
                context.ticket = self.admission.admit(context.tenant_id, max_tokens)
            except EngineOverloadedError as refusal:
                context.decision = f"overloaded:{refusal.reason}"
                raise
        if context.principal is None:
            return
        context.prompt_estimate = -(-prompt_chars // CHARS_PER_TOKEN)
        context.completion_estimate = max_tokens
        tokens = context.prompt_estimate + max_tokens
        try:
            context.admission = await self.limiter.admit(
                context.principal,
                tokens=tokens,
                request_id=context.internal_id,
                stateless=stateless,
            )
        except RateLimited as refusal:
            context.decision = f"rate_limited:{refusal.reason}"
            raise

    async def require_images(self, what: str) -> None:
        """Refuse image input (501) when the served model takes none; ``what`` names it."""
        info = await self.engine.model_info()
        if not info.supports_images:
            raise FeatureNotImplementedError(
                f"{what} needs a vision-language model; the served model "
                f"{info.model_name!r} takes text only (set LLM_MODEL to one that takes "
                "images, e.g. Qwen/Qwen2.5-VL-7B-Instruct, or test-vlm on CPU)"
            )

    # Conversations --------------------------------------------------------------

    async def begin_turn(
        self, conversation_id: str | None, *, create: bool, context: RequestContext
    ) -> ConversationTurn:
        """Load the conversation to continue (404 if unknown), or start one when ``create``.

        Only the caller's tenant's conversations are visible: another tenant's id is as
        unknown as an id never made. A conversation with no room for a turn (a message
        and its answer) under the tenant's quota is refused here, before generating (409;
        the store's append checks it again, atomically).
        """
        started = time.perf_counter()
        store = self.conversations(context)
        if conversation_id is not None:
            stored = await store.get(conversation_id, with_images=True)
            limit = store.quota.messages_per_conversation
            if limit and stored.message_count + 2 > limit:
                raise store.messages_quota_error(conversation_id, stored.message_count, 2)
            turn = ConversationTurn(
                conversation_id,
                False,
                stored.messages or [],
                store,
                engine_replica=stored.engine_replica,
                images=stored.images or {},
            )
        elif create:
            turn = ConversationTurn(await store.create(), True, [], store)
        else:
            return ConversationTurn(None, False, [])
        context.conversation_id = turn.conversation_id
        turn.store_ms += (time.perf_counter() - started) * 1000
        return turn

    async def finish_turn(
        self, turn: ConversationTurn, new: list[StoredMessage], completion: Completion
    ) -> None:
        """Store the new messages and the answer (atomically, as one append).

        The engine replica that answered is recorded, so the next turn goes there.
        """
        metrics = completion.final.metrics
        await self.store_turn(
            turn,
            [*new, StoredMessage("assistant", completion.text, time.time())],
            engine_replica=metrics.replica_id if metrics else None,
            dropped_messages=completion.final.dropped_messages,
        )

    async def store_turn(
        self,
        turn: ConversationTurn,
        messages: list[StoredMessage],
        *,
        engine_replica: str | None,
        dropped_messages: int = 0,
        api: str = "seed",
    ) -> None:
        """Append a turn's ``messages`` (the new ones and the answer) in one write.

        The images the new messages show are stored with them (each once). Counted:
        whether the previous turn's engine replica answered (affinity), and the history
        messages the prompt left out.
        """
        if turn.engine_replica and engine_replica:
            outcome = "hit" if engine_replica == turn.engine_replica else "miss"
            self.metrics.affinity.add(outcome=outcome)
        if dropped_messages:
            self.metrics.dropped_history.add(dropped_messages, api=api)
        if turn.conversation_id is not None and turn.store is not None:
            started = time.perf_counter()
            shown = {d for m in messages for d in m.images or ()}
            await turn.store.append(
                turn.conversation_id,
                messages,
                engine_replica=engine_replica or None,
                images={d: url for d, url in turn.images.items() if d in shown},
            )
            turn.store_ms += (time.perf_counter() - started) * 1000

    async def abandon_turn(self, turn: ConversationTurn) -> None:
        """Remove a conversation this request created and could not complete."""
        if turn.created and turn.conversation_id is not None and turn.store is not None:
            # Redis is down or the conversation is gone already: nothing more to do.
            with contextlib.suppress(CloudLLMError):
                await asyncio.shield(turn.store.delete(turn.conversation_id))

    # Generation ----------------------------------------------------------------

    async def stream(
        self,
        request: GenerationRequest,
        *,
        prompt_param: str = "messages",
        context: RequestContext | None = None,
    ) -> AsyncIterator[list[GenerationChunk]]:
        """The engine's chunks, in the batches they came in (each one HTTP write).

        An engine error becomes the matching project error, raised after the chunks
        before it; ``prompt_param`` is the request field a too-long prompt is blamed on.
        The tokens are counted into ``context`` as they pass, whatever becomes of them.
        """
        tokens = 0
        meter = context or RequestContext(request_id="")
        meter.start_generation(stream=request.stream)
        batches = self._within_deadline(self.engine.generate(request), context)
        try:
            async for batch in batches:
                for index, chunk in enumerate(batch):
                    if chunk.error is not None:
                        if index:
                            yield batch[:index]
                        if chunk.error.kind != "engine_failure" and not tokens:
                            meter.record_usage(0, 0)  # refused: nothing was generated
                        error_class = _ERROR_KINDS.get(chunk.error.kind, EngineUnavailableError)
                        param = prompt_param if chunk.error.kind == "prompt_too_long" else None
                        raise error_class(chunk.error.message, param=param)
                    new = sum(choice.token_count for choice in chunk.choices)
                    tokens += new
                    meter.count_tokens(new, chunk.prompt_tokens)
                    if chunk.finished:
                        meter.record_usage(chunk.prompt_tokens, tokens)
                        if chunk.metrics is not None:
                            self.generation_ms_total += chunk.metrics.generation_ms
                        yield batch[: index + 1]
                        return
                yield batch
        finally:
            await close_stream(batches)
        raise EngineUnavailableError("engine stream ended without a final chunk")

    async def openai(
        self,
        call: OpenAICall,
        *,
        context: RequestContext | None = None,
        tokens_per_event: int = 1,
    ) -> AsyncIterator[list[OpenAIItem]]:
        """A ``/v1`` call's items from the engine in batches, within ``REQUEST_TIMEOUT_S``.

        The tokens are counted into ``context`` as they pass, whatever becomes of them:
        the answer's usage, or before it, ``tokens_per_event`` per SSE event with
        choices (vLLM sends one per choice and engine step, ``stream_interval`` tokens).
        """
        meter = context or RequestContext(request_id="")
        meter.start_generation(stream=call.body.get("stream") is True)
        batches = self._within_deadline(self.engine.openai(call), context)
        try:
            async for batch in batches:
                events = 0
                for item in batch:
                    if isinstance(item, str):
                        events += item.startswith("data: {") and '"choices"' in item
                        continue
                    if isinstance(item, OpenAIAnswer):
                        # An error answer: vLLM refused the request, nothing was generated.
                        usage = item.body.get("usage") if item.status == 200 else {}
                    else:
                        usage = item.usage
                    if isinstance(usage, dict):
                        completion = _usage_count(usage, "completion_tokens")
                        meter.record_usage(_usage_count(usage, "prompt_tokens"), completion)
                if events:
                    meter.count_tokens(events * tokens_per_event)
                yield batch
        finally:
            await close_stream(batches)

    async def _within_deadline(
        self, items: AsyncIterator[_Item], context: RequestContext | None = None
    ) -> AsyncIterator[_Item]:
        """``items`` until ``REQUEST_TIMEOUT_S`` from now (then 504); counted in flight.

        A request admitted to wait for a batch slot that could no longer finish in time
        while it waits is refused then (:meth:`.DeadlineAdmission.too_late_to_start`).
        """
        self.in_flight += 1
        timeout_s = self.settings.REQUEST_TIMEOUT_S
        deadline = asyncio.get_running_loop().time() + timeout_s
        items = aiter(items)
        ticket = context.ticket if context is not None else None
        try:
            if ticket is not None and ticket.queued:
                first = await self._first_in_time(items, ticket, deadline, context)
                if first is None:
                    return
                yield first
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        item = await anext(items)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise self._timed_out() from None
                yield item
        finally:
            self.in_flight -= 1
            await close_stream(items)

    def _timed_out(self) -> RequestTimeoutError:
        """The 504 of a generation past ``REQUEST_TIMEOUT_S`` (counted as a refusal)."""
        self.metrics.refusals.add(reason="timeout")
        return RequestTimeoutError(
            f"the generation did not finish within {self.settings.REQUEST_TIMEOUT_S:g} s "
            "(REQUEST_TIMEOUT_S) and was stopped"
        )

    async def _first_in_time(
        self,
        items: AsyncIterator[_Item],
        ticket: AdmissionTicket,
        deadline: float,
        context: RequestContext | None,
    ) -> _Item | None:
        """The first item (``None``: the stream ended), waited for in turns.

        Every :data:`LATE_CHECK_S` while it waits: too late to start is refused (503).
        """
        loop = asyncio.get_running_loop()
        waiting = asyncio.ensure_future(anext(items))
        try:
            while True:
                left = deadline - loop.time()
                done, _ = await asyncio.wait({waiting}, timeout=min(LATE_CHECK_S, max(left, 0)))
                if done:
                    try:
                        return waiting.result()
                    except StopAsyncIteration:
                        return None
                left = deadline - loop.time()
                if left <= 0:
                    raise self._timed_out()
                refusal = self.admission.too_late_to_start(ticket, left)
                if refusal is not None:
                    if context is not None:
                        context.decision = f"overloaded:{refusal.reason}"
                    raise refusal
        finally:
            if not waiting.done():
                waiting.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await waiting

    async def open_stream(
        self,
        request: GenerationRequest,
        *,
        prompt_param: str = "messages",
        context: RequestContext | None = None,
    ) -> AsyncIterator[list[GenerationChunk]]:
        """:meth:`stream`, started: returns once the engine's first chunk is here.

        Whatever fails before the first token (no engine, a prompt too long, a
        parameter vLLM refuses) raises here, so a streamed answer still gets its HTTP
        status; the first chunk goes out with the response headers, costing nothing.
        """
        chunks = self.stream(request, prompt_param=prompt_param, context=context)
        first = await anext(chunks)

        async def started() -> AsyncIterator[list[GenerationChunk]]:
            yield first
            async for batch in chunks:
                yield batch

        return started()

    async def collect(
        self,
        request: GenerationRequest,
        *,
        prompt_param: str = "messages",
        context: RequestContext | None = None,
    ) -> Completion:
        """Run a generation to its end and gather it (counted into ``context``)."""
        builder = CompletionBuilder()
        async for batch in self.stream(request, prompt_param=prompt_param, context=context):
            for chunk in batch:
                builder.add(chunk)
        return builder.build()


def _usage_count(usage: dict[str, Any], name: str) -> int:
    """A count of vLLM's ``usage`` (0 when missing)."""
    value = usage.get(name)
    return value if isinstance(value, int) else 0


async def close_stream(chunks: AsyncIterator[Any]) -> None:
    """Close an engine stream early (cancels the engine request) or after its end.

    A stream that failed was handled where it raised; closing it raises nothing.
    """
    close = getattr(chunks, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()
