"""vLLM's own OpenAI serving layer inside an engine replica.

``/v1/chat/completions`` and ``/v1/completions`` are answered by vLLM's
``OpenAIServingChat`` and ``OpenAIServingCompletion`` (built by vLLM's own
``init_app_state``, from the same arguments ``vllm serve`` parses), around this
replica's ``AsyncLLM``: whatever ``vllm serve`` accepts and answers, we accept and
answer. What this module adds is what a server-side conversation needs: the stored
history fitted into the context (oldest turns dropped first), and, after a stream,
one :class:`~cloudllm_serve.engine.protocol.OpenAIStreamEnd` with the usage and the
assistant's message, so the ingress never decodes a stateless stream; and for a
resumable call, its progress (:class:`~cloudllm_serve.engine.protocol.OpenAIProgress`),
recorded by :class:`ProgressingEngineClient`, the engine client the serving layer sees,
which also turns a resumed call into a continuation (:mod:`cloudllm_serve.engine.resume`).

Imports vLLM; only :mod:`cloudllm_serve.engine.vllm_engine` imports this module.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import logging
from collections.abc import AsyncIterator, Sequence
from http import HTTPStatus
from types import SimpleNamespace
from typing import Any

from cloudllm_serve.engine.prompt import (
    Encoded,
    PromptDoesNotFitError,
    count_images,
    fit_messages,
    kept_messages,
)
from cloudllm_serve.engine.protocol import (
    PROGRESS_INTERVAL_S,
    ChatMessage,
    OpenAIAnswer,
    OpenAICall,
    OpenAIReplicaItem,
    OpenAIStreamEnd,
)
from cloudllm_serve.engine.resume import (
    RESUMED_TOKENS_ARG,
    ContinuedStream,
    ProgressRecorder,
    continued_input,
    continued_usage,
)

logger = logging.getLogger(__name__)

#: What vLLM's usage-only last chunk of a stream holds (and no other chunk does).
_USAGE_CHUNK_MARK = '"choices":[],'


def parse_vllm_args(cli_args: Sequence[str]) -> argparse.Namespace:
    """``cli_args`` parsed by ``vllm serve``'s own parser (engine and front-end arguments)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())  # type: ignore[no-untyped-call]
    args: argparse.Namespace = parser.parse_args(list(cli_args))
    validate_parsed_serve_args(args)
    return args


class ProgressingEngineClient:
    """The engine client vLLM's chat and completion serving objects call: ``AsyncLLM``'s.

    A request with a :class:`ProgressRecorder` (registered under vLLM's request id) is
    recorded as the serving layer takes its outputs and, when it resumes, continued
    (:func:`continued_input`, ``max_tokens`` less the earlier tokens); a whole answer
    asks vLLM for ``CUMULATIVE`` outputs instead of ``FINAL_ONLY`` so that its progress
    is known, and hands the serving layer the last one only. Every other request and
    attribute is the engine's own.
    """

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.recorders: dict[str, ProgressRecorder] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(
        self, prompt: Any, sampling_params: Any, request_id: str, *args: Any, **kwargs: Any
    ) -> Any:
        """``AsyncLLM.generate``, recorded (and continued) for a registered request."""
        recorder = self.recorders.get(request_id)
        if recorder is None:
            return self._engine.generate(prompt, sampling_params, request_id, *args, **kwargs)
        return self._recorded(recorder, prompt, sampling_params, request_id, *args, **kwargs)

    async def _recorded(
        self,
        recorder: ProgressRecorder,
        prompt: Any,
        params: Any,
        request_id: str,
        *args: Any,
        **kwargs: Any,
    ) -> AsyncIterator[Any]:
        from vllm.sampling_params import RequestOutputKind

        resumed = recorder.resume_token_ids
        whole = params.output_kind == RequestOutputKind.FINAL_ONLY
        if resumed or whole:
            params = copy.copy(params)
        if resumed:
            if params.max_tokens is not None and params.max_tokens <= len(resumed):
                raise ValueError("a continuation with nothing left to generate")
            prompt = continued_input(prompt, resumed)
            if params.max_tokens is not None:
                params.max_tokens -= len(resumed)
            params.min_tokens = max(0, params.min_tokens - len(resumed))
            params.extra_args = {**(params.extra_args or {}), RESUMED_TOKENS_ARG: len(resumed)}
        if whole:
            params.output_kind = RequestOutputKind.CUMULATIVE
        async for output in self._engine.generate(prompt, params, request_id, *args, **kwargs):
            completion = output.outputs[0]
            if whole:
                recorder.add_cumulative(completion.token_ids, completion.text)
                if not output.finished:
                    continue
            else:
                recorder.add(completion.token_ids, completion.text)
            yield output


class OpenAIServer:
    """vLLM's chat and completion serving classes over one ``AsyncLLM``."""

    def __init__(
        self,
        engine: Any,
        args: argparse.Namespace,
        max_model_len: int,
        *,
        images_per_prompt: int | None = None,
    ) -> None:
        self._engine = engine
        self._client = ProgressingEngineClient(engine)
        self._args = args
        self._max_model_len = max_model_len
        self._images_per_prompt = images_per_prompt
        self._state: Any = None
        # vLLM's exception handlers read only ``request.app.state.args``.
        self._fake_request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(args=args)))

    async def start(self) -> None:
        """Build vLLM's serving objects (``init_app_state``, as ``vllm serve`` does)."""
        from starlette.datastructures import State
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state

        state = State()
        tasks = await self._engine.get_supported_tasks()
        await init_app_state(self._engine, state, self._args, supported_tasks=tasks)
        for name in (
            "openai_serving_chat",
            "openai_serving_completion",
            "openai_serving_responses",
        ):
            serving = getattr(state, name, None)
            if serving is not None:
                serving.engine_client = self._client
        self._state = state

    async def answer(self, call: OpenAICall) -> AsyncIterator[OpenAIReplicaItem]:
        """Run one call: an :class:`OpenAIAnswer`, or a stream's SSE strings then its end.

        A resumable call's progress comes with them (:class:`ProgressRecorder`).
        """
        if not call.resumable:
            async for item in self._answer(call, None):
                yield item
            return
        # vLLM's request id for this call (a single prompt: resumable calls have one).
        prefix = "chatcmpl-" if call.kind == "chat" else "cmpl-"
        suffix = "" if call.kind == "chat" else "-0"
        engine_request_id = f"{prefix}{call.request_id}{suffix}"
        recorder = ProgressRecorder(call.resume_token_ids)
        self._client.recorders[engine_request_id] = recorder
        try:
            async for item in self._answer(call, recorder):
                yield item
        finally:
            self._client.recorders.pop(engine_request_id, None)

    async def _answer(
        self, call: OpenAICall, recorder: ProgressRecorder | None
    ) -> AsyncIterator[OpenAIReplicaItem]:
        from pydantic import ValidationError

        if call.kind == "responses":
            async for item in self._answer_responses(call):
                yield item
            return
        request_cls, serving = self._serving(call.kind)
        body = call.body
        dropped = 0
        if serving is None:
            yield _error_answer(
                HTTPStatus.NOT_IMPLEMENTED, f"The model does not support the {call.kind} API"
            )
            return
        try:
            request = request_cls.model_validate(body)
        except ValidationError as error:
            yield await self._validation_error(error)
            return
        except Exception as error:  # a validator's VLLMValidationError (no ValueError)
            yield self._error(serving, error)
            return
        request.request_id = call.request_id
        if call.droppable_messages and call.kind == "chat":
            try:
                request, dropped = await self._fit_history(request, call.droppable_messages)
            except PromptDoesNotFitError as error:
                yield _error_answer(
                    HTTPStatus.BAD_REQUEST,
                    f"This model's maximum context length is {self._max_model_len} tokens; "
                    f"the newest message alone takes {error.tokens} prompt tokens and at most "
                    f"{error.budget} fit beside max_tokens",
                    param="messages",
                )
                return
        client_wants_usage = bool(
            request.stream and request.stream_options and request.stream_options.include_usage
        )
        if request.stream and not client_wants_usage:
            from vllm.entrypoints.generate.base.protocol import StreamOptions

            options = request.stream_options or StreamOptions()
            options.include_usage = True
            request.stream_options = options
        if call.kind == "chat":
            created = serving.create_chat_completion(request, raw_request=None)
        else:
            created = serving.create_completion(request, raw_request=None)
        try:
            if recorder is not None and not request.stream:
                # A whole answer: its progress while it is generated.
                task = asyncio.ensure_future(created)
                try:
                    while not (await asyncio.wait({task}, timeout=PROGRESS_INTERVAL_S))[0]:
                        progress = recorder.take()
                        if progress is not None:
                            yield progress
                finally:
                    if not task.done():
                        task.cancel()
                        with contextlib.suppress(BaseException):
                            await task
                result = task.result()
            else:
                result = await created
        except Exception as error:  # vLLM raises some client errors out of create_*
            yield self._error(serving, error)
            return
        if isinstance(result, AsyncIterator):
            async for item in self._stream(result, call, client_wants_usage, dropped, recorder):
                yield item
            return
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        if isinstance(result, ErrorResponse):
            yield OpenAIAnswer(int(result.error.code), result.model_dump())
            return
        body = result.model_dump()
        if call.resume_token_ids and isinstance(body.get("usage"), dict):
            body["usage"] = continued_usage(body["usage"], len(call.resume_token_ids))
        yield OpenAIAnswer(200, body, dropped_messages=dropped)

    async def _answer_responses(self, call: OpenAICall) -> AsyncIterator[OpenAIReplicaItem]:
        """``/v1/responses`` by vLLM's ``OpenAIServingResponses``, its own store off.

        The ingress keeps responses (and has put a previous response's items into
        ``input``); a stream's events are vLLM's SSE strings, then one
        :class:`OpenAIStreamEnd` with the final response as ``message`` and its usage.
        """
        from pydantic import ValidationError
        from vllm.entrypoints.openai.responses.protocol import ResponsesRequest, ResponsesResponse
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        serving = getattr(self._state, "openai_serving_responses", None)
        if serving is None:
            yield _error_answer(
                HTTPStatus.NOT_IMPLEMENTED, "The model does not support the Responses API"
            )
            return
        try:
            request = ResponsesRequest.model_validate(call.body)
        except ValidationError as error:
            yield await self._validation_error(error)
            return
        except Exception as error:  # a validator's VLLMValidationError (no ValueError)
            yield self._error(serving, error)
            return
        request.request_id = call.request_id  # the response id, made by the ingress
        # The ingress keeps responses and has put the previous ones' items into ``input``:
        # vLLM's own store is not asked; the response still names its predecessor.
        previous, request.previous_response_id = request.previous_response_id, None
        request.store = False
        try:
            result = await serving.create_responses(request, raw_request=None)
        except Exception as error:
            yield self._error(serving, error)
            return
        request.previous_response_id = previous  # read as a stream's events are made
        if isinstance(result, ResponsesResponse):
            result.previous_response_id = previous
        if isinstance(result, ErrorResponse):
            yield OpenAIAnswer(int(result.error.code), result.model_dump())
            return
        if isinstance(result, ResponsesResponse):
            yield OpenAIAnswer(200, result.model_dump(mode="json", by_alias=True))
            return
        final: dict[str, Any] | None = None
        async for event in result:
            event_type = getattr(event, "type", "unknown")
            data = event.model_dump_json(indent=None, by_alias=True)
            if event_type in ("response.completed", "response.incomplete", "response.failed"):
                final = json.loads(data)["response"]
            yield f"event: {event_type}\ndata: {data}\n\n"
        yield OpenAIStreamEnd(usage=_responses_usage(final), message=final)

    async def encode_chat(
        self, messages: Sequence[ChatMessage], tools: list[dict[str, Any]] | None = None
    ) -> Encoded:
        """``messages`` as the engine will see them: the one chat encoding of this replica.

        Text-only messages go through the tokenizer's chat template, rendered then
        tokenized as vLLM's renderer does. With images, vLLM's chat renderer decodes them
        and widens their placeholders to the image's token count (vLLM's own count); the
        result's ``engine_input`` can then be handed to the engine.
        """
        if not count_images(messages):
            tokenizer = self._engine.renderer.tokenizer
            text = tokenizer.apply_chat_template(
                list(messages), tools=tools, add_generation_prompt=True, tokenize=False
            )
            return Encoded(list(tokenizer.encode(text, add_special_tokens=False)))
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.exceptions import VLLMValidationError

        request = ChatCompletionRequest.model_validate(
            {"messages": list(messages), "tools": tools, "max_tokens": 1}
        )
        # Past vLLM's multimodal sender cache: it would mark these images as held by the
        # engine core, which never sees the renderings that fitting tries and discards.
        renderer = self._state.openai_serving_chat.online_renderer
        try:
            result = await renderer.render_chat(request, skip_mm_cache=True)
        except VLLMValidationError as error:
            if error.parameter == "input_tokens" and isinstance(error.value, int):
                return Encoded([], too_long=error.value)  # longer than the whole context
            raise
        if isinstance(result, ErrorResponse):
            raise ValueError(result.error.message)
        _, engine_inputs = result
        engine_input = engine_inputs[0]
        return Encoded(list(engine_input["prompt_token_ids"]), engine_input)

    async def models(self) -> dict[str, Any]:
        """``GET /v1/models`` as vLLM answers it."""
        listed = await self._state.openai_serving_models.show_available_models()
        return dict(listed.model_dump())

    # Helpers ----------------------------------------------------------------------

    def _serving(self, kind: str) -> tuple[Any, Any]:
        if kind == "chat":
            from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

            return ChatCompletionRequest, getattr(self._state, "openai_serving_chat", None)
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        return CompletionRequest, getattr(self._state, "openai_serving_completion", None)

    async def _stream(
        self,
        chunks: AsyncIterator[str],
        call: OpenAICall,
        client_wants_usage: bool,
        dropped: int,
        recorder: ProgressRecorder | None = None,
    ) -> AsyncIterator[OpenAIReplicaItem]:
        """The SSE strings as vLLM makes them; the usage chunk only if the client asked.

        With a ``recorder``, each string comes after the progress it holds (a chat's
        opening role chunk holds none); a continuation's strings are rewritten to follow
        on from the first stream's (:class:`ContinuedStream`).
        """
        usage: dict[str, Any] | None = None
        message = _MessageGatherer() if call.collect else None
        continued = (
            ContinuedStream(
                chat=call.kind == "chat",
                resumed=len(call.resume_token_ids),
                created=call.resume_created,
            )
            if call.resume_token_ids or call.resume_created is not None
            else None
        )
        opening = call.kind == "chat"
        async for chunk in chunks:
            if _USAGE_CHUNK_MARK in chunk and chunk.startswith("data: {"):
                decoded = json.loads(chunk[6:])
                if decoded.get("choices") == [] and "usage" in decoded:
                    if continued is not None:
                        chunk = continued.usage_chunk(decoded)
                    usage = decoded["usage"]
                    if client_wants_usage:
                        yield chunk
                    continue
            if continued is not None:
                rewritten = continued.rewrite(chunk)
                if rewritten is None:
                    opening = False
                    continue
                chunk = rewritten
            if recorder is not None and not opening:
                progress = recorder.take()
                if progress is not None:
                    yield progress
            opening = False
            if message is not None:
                message.add(chunk)
            yield chunk
        yield OpenAIStreamEnd(
            usage=usage,
            message=message.message() if message is not None else None,
            dropped_messages=dropped,
        )

    async def _fit_history(self, request: Any, droppable: int) -> tuple[Any, int]:
        """Drop the oldest stored turns until the prompt (images too) and ``max_tokens`` fit."""
        messages: list[ChatMessage] = [dict(m) for m in request.messages]
        tools = [tool.model_dump() for tool in request.tools] if request.tools else None
        max_tokens = request.max_completion_tokens or request.max_tokens or 0
        with_images = count_images(messages) > 0

        async def encode(selected: Sequence[ChatMessage]) -> Encoded:
            return await self.encode_chat(selected, tools)

        try:
            fitted = await fit_messages(
                messages,
                encode,
                self._max_model_len - max_tokens,
                max_images=self._images_per_prompt if with_images else None,
            )
        except PromptDoesNotFitError:
            raise
        except Exception:  # a template that cannot render this: leave it to vLLM
            logger.debug("could not fit history of %s", request.request_id, exc_info=True)
            return request, 0
        if fitted.dropped_messages == 0:
            return request, 0
        kept = kept_messages(messages, fitted.dropped_messages)
        return request.model_copy(update={"messages": kept}), fitted.dropped_messages

    async def _validation_error(self, error: Any) -> OpenAIAnswer:
        """A body vLLM's request model refuses: the 400 ``vllm serve`` gives (FastAPI's path)."""
        from fastapi.exceptions import RequestValidationError
        from vllm.entrypoints.serve.exception_handling.handlers.validation import (
            validation_exception_handler,
        )

        errors = [{**e, "loc": ("body", *e.get("loc", ()))} for e in error.errors()]
        response = await validation_exception_handler(
            self._fake_request,  # type: ignore[arg-type]
            RequestValidationError(errors),
        )
        return OpenAIAnswer(int(response.status_code), json.loads(bytes(response.body)))

    @staticmethod
    def _error(serving: Any, error: Exception) -> OpenAIAnswer:
        """An exception out of vLLM's serving layer, mapped as vLLM's server maps it."""
        response = serving.create_error_response(error)
        if response.error.code >= 500:
            logger.exception("vLLM's serving layer failed", exc_info=error)
        return OpenAIAnswer(int(response.error.code), response.model_dump())


def _responses_usage(response: dict[str, Any] | None) -> dict[str, Any] | None:
    """A response's usage in chat's names (what the ingress meters)."""
    usage = response.get("usage") if response else None
    if not isinstance(usage, dict):
        return None
    return {
        "prompt_tokens": usage.get("input_tokens", 0),
        "completion_tokens": usage.get("output_tokens", 0),
        "total_tokens": usage.get("total_tokens", 0),
    }


def _error_answer(status: HTTPStatus, message: str, param: str | None = None) -> OpenAIAnswer:
    """An error in vLLM's body (type: the HTTP phrase, as vLLM's handlers set it)."""
    return OpenAIAnswer(
        status.value,
        {
            "error": {
                "message": message,
                "type": status.phrase,
                "param": param,
                "code": status.value,
            }
        },
    )


class _MessageGatherer:
    """The first choice's assistant message, gathered from a chat stream's chunks."""

    def __init__(self) -> None:
        self._content: list[str] = []
        self._tool_calls: dict[int, dict[str, Any]] = {}
        self._text: list[str] = []

    def add(self, chunk: str) -> None:
        """Take in one SSE string."""
        if not chunk.startswith("data: {"):
            return
        choices = json.loads(chunk[6:]).get("choices") or []
        for choice in choices:
            if choice.get("index", 0) != 0:
                continue
            if "text" in choice:  # a text completion
                self._text.append(choice.get("text") or "")
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self._content.append(delta["content"])
            for call in delta.get("tool_calls") or []:
                slot = self._tool_calls.setdefault(
                    int(call.get("index", 0)),
                    {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
                )
                if call.get("id"):
                    slot["id"] = call["id"]
                function = call.get("function") or {}
                if function.get("name"):
                    slot["function"]["name"] += function["name"]
                if function.get("arguments"):
                    slot["function"]["arguments"] += function["arguments"]

    def message(self) -> dict[str, Any]:
        """The gathered assistant message (``content`` and, if any, ``tool_calls``)."""
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self._content)}
        if self._tool_calls:
            message["tool_calls"] = [self._tool_calls[i] for i in sorted(self._tool_calls)]
        return message
