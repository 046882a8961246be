"""Streams that survive an engine crash: what a request's client got, and its continuation.

A request is *resumable* when another replica can generate exactly what this one would
have generated next from the prompt plus the tokens already sent
(:func:`openai_blocker`, :func:`generation_blocker` say why not). For such a request the
engine reports the token ids it generated, out of band
(:mod:`cloudllm_serve.engine.protocol`), and :class:`Continuation` keeps those the client
got. When the replica dies midway,
:class:`~cloudllm_serve.ingress.engine_client.ServeEngineClient` sends the request to
another one as a continuation (:meth:`Continuation.resumed`): the engine there appends the
ids to the prompt and generates the rest (:mod:`cloudllm_serve.engine.resume`), and its
stream follows on from the first: no token repeated or lost, the same chunk ids, ``usage``
counting each token once. A whole answer's text is joined here (:meth:`Continuation.whole`).

Not resumable, as the next token would depend on more than the prompt and the tokens
before it, or the text could not be cut between two tokens: structured output,
presence/frequency/repetition penalties, ``n`` > 1 (``best_of``, beam search, several
prompts), log probabilities, stop strings (one could span the cut), tools, ``echo``,
per-chunk usage, token ids in the answer, prompt embeddings, and a ``seed`` with sampling
(temperature not 0): a continuation's random draws would differ from the first try's, so
the answer would not be the one the seed promises. A seed with greedy decoding is fine.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any, Literal

from cloudllm_serve.engine.protocol import (
    GenerationChunk,
    GenerationRequest,
    OpenAIAnswer,
    OpenAICall,
    OpenAIItem,
    OpenAIProgress,
    OpenAIReplicaItem,
    OpenAIStreamEnd,
)

#: Keys of a ``/v1`` body that ask for structured output.
_STRUCTURED_KEYS = (
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
)
#: Keys of a ``/v1`` body whose answer would show the prompt or the cut.
_SHOWING_KEYS = (
    "echo",
    "logprobs",
    "top_logprobs",
    "prompt_logprobs",
    "return_token_ids",
    "return_tokens_as_token_ids",
    "prompt_embeds",
    "kv_transfer_params",
)


def openai_blocker(
    kind: Literal["chat", "completion", "responses"], body: dict[str, Any]
) -> str | None:
    """Why a ``/v1`` call cannot continue on another replica (``None``: it can).

    Reads a few keys of the body (as vLLM will validate it; an invalid value is refused
    there anyway).
    """
    if kind == "responses":
        return "a response (its events are not rewritten for a continuation)"
    get = body.get
    if _number(get("n"), 1) > 1 or _number(get("best_of"), 1) > 1 or get("use_beam_search"):
        return "n > 1"
    prompt = get("prompt")
    several = isinstance(prompt, list) and not all(isinstance(t, int) for t in prompt)
    if kind == "completion" and several:
        return "several prompts"
    response_format = get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") not in (None, "text"):
        return "structured output"
    if any(get(key) is not None for key in _STRUCTURED_KEYS):
        return "structured output"
    if _number(get("presence_penalty"), 0) or _number(get("frequency_penalty"), 0):
        return "presence/frequency penalties"
    if _number(get("repetition_penalty"), 1) != 1:
        return "a repetition penalty"
    if any(get(key) not in (None, False) for key in _SHOWING_KEYS):
        return "echo, log probabilities or token ids in the answer"
    if get("stop") not in (None, "", []):
        return "a stop string"
    if get("tools") and get("tool_choice") != "none":
        return "tools"
    if get("seed") is not None and _number(get("temperature"), 1) != 0:
        return "a seed with sampling (temperature not 0)"
    options = get("stream_options")
    if isinstance(options, dict) and options.get("continuous_usage_stats"):
        return "usage in every chunk"
    return None


def generation_blocker(request: GenerationRequest) -> str | None:
    """Why a ``/generate`` request cannot continue on another replica (``None``: it can)."""
    if request.sampling.json_schema is not None:
        return "structured output"
    return None


def _number(value: Any, default: float) -> float:
    """``value`` as a number (``default`` when unset or not one: vLLM refuses those)."""
    if isinstance(value, bool) or value is None:
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


class Continuation:
    """What one resumable request's client got, and how to continue it elsewhere.

    Every batch the request's stream relays passes through :meth:`generation_batch` or
    :meth:`openai_batch`. A ``/v1`` stream's progress counts once the string after it
    went out (it may come in the batch before that string's).
    """

    def __init__(self, *, streamed: bool) -> None:
        self.streamed = streamed
        #: The tokens the client got (or, not streamed, the engine reported).
        self.token_ids: list[int] = []
        #: Their text, for a ``/v1`` call (a whole answer or a stored conversation's).
        self._texts: list[str] = []
        self._pending: list[OpenAIProgress] = []
        #: A ``/v1`` stream's first SSE string (its ``created`` is kept on resuming).
        self.first_event: str | None = None
        #: How many times the request moved to another replica.
        self.moves = 0
        #: The text before the latest continuation (joined to its whole answer).
        self._before = ""

    @property
    def started(self) -> bool:
        """Whether anything was generated that a plain retry would repeat."""
        return bool(self.token_ids) or self.first_event is not None

    def generation_batch(self, batch: list[GenerationChunk]) -> None:
        """Take in a ``/generate`` batch (relayed as it is)."""
        for chunk in batch:
            for choice in chunk.choices:
                self.token_ids.extend(choice.token_ids)

    def openai_batch(self, batch: list[OpenAIReplicaItem]) -> list[OpenAIItem]:
        """A ``/v1`` batch without its progress items, which are taken in."""
        kept: list[OpenAIItem] = []
        for item in batch:
            if isinstance(item, OpenAIProgress):
                if self.streamed:
                    self._pending.append(item)
                else:
                    self._count(item)
                continue
            if isinstance(item, str):
                if self._pending:
                    for progress in self._pending:
                        self._count(progress)
                    self._pending.clear()
                if self.first_event is None:
                    self.first_event = item
            elif self.moves:
                item = self._whole(item)
            kept.append(item)
        return kept

    def _count(self, progress: OpenAIProgress) -> None:
        self.token_ids.extend(progress.token_ids)
        self._texts.append(progress.text)

    def resumed(self, call: GenerationRequest | OpenAICall) -> Any:
        """``call`` as a continuation from what the client got (the next try)."""
        self.moves += 1
        self._pending.clear()
        self._before = "".join(self._texts)
        resume = tuple(self.token_ids)
        if isinstance(call, GenerationRequest):
            return dataclasses.replace(call, resume_token_ids=resume)
        created = _created(self.first_event) if self.first_event is not None else None
        return dataclasses.replace(call, resume_token_ids=resume, resume_created=created)

    def _whole(self, item: OpenAIItem) -> OpenAIItem:
        """A continuation's answer or stream end, with the text from before it joined on."""
        if not self._before:
            return item
        if isinstance(item, OpenAIStreamEnd) and item.message is not None:
            content = self._before + (item.message.get("content") or "")
            return dataclasses.replace(item, message={**item.message, "content": content})
        if isinstance(item, OpenAIAnswer) and item.status == 200:
            return dataclasses.replace(item, body=joined_answer(item.body, self._before))
        return item


def joined_answer(body: dict[str, Any], before: str) -> dict[str, Any]:
    """A whole ``/v1`` answer of a continuation with the ``before`` text in front."""
    choices: Sequence[Any] = body.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return body
    choice = dict(choices[0])
    if isinstance(choice.get("message"), dict):  # a chat completion
        message = dict(choice["message"])
        message["content"] = before + (message.get("content") or "")
        choice["message"] = message
    else:  # a text completion
        choice["text"] = before + (choice.get("text") or "")
    return {**body, "choices": [choice, *choices[1:]]}


def _created(event: str) -> int | None:
    """A ``/v1`` SSE string's ``created`` (``None`` if it has none)."""
    try:
        created = json.loads(event.removeprefix("data: "))["created"]
    except (ValueError, KeyError, TypeError):
        return None
    return created if isinstance(created, int) else None
