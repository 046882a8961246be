"""Continuations in an engine replica: a request picked up where a dead replica left it.

The ingress resends a resumable request whose engine died with ``resume_token_ids``, the
tokens its client already got (:mod:`cloudllm_serve.ingress.stream_resume`). The engine
renders the prompt exactly as before (same history fitting, the original ``max_tokens``),
appends those ids (:func:`continued_input`) and asks for ``max_tokens`` minus their
number, with ``SamplingParams.extra_args[RESUMED_TOKENS_ARG]`` saying how many came
before (the simulated engine continues its answer text from there). vLLM's detokenizer
sees the earlier tokens as the prompt's end, so the next text joins on as it would have.

On ``/v1`` the continuation must read as the rest of the first stream
(:class:`ContinuedStream`): its opening role chunk is dropped, its ``created`` is the
first stream's (the ``id`` is the same already: vLLM makes it from our request id), and
its usage counts the earlier tokens as completion tokens, not prompt tokens.

:class:`ProgressRecorder` gathers what a ``/v1`` call generated, as vLLM's serving layer
takes it from the engine, for :class:`~cloudllm_serve.engine.protocol.OpenAIProgress`.

No vLLM import here: these are plain functions over dicts and strings.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from cloudllm_serve.engine.protocol import OpenAIProgress

#: The ``SamplingParams.extra_args`` key of a continuation: tokens generated before it.
RESUMED_TOKENS_ARG = "cloudllm_resumed_tokens"
#: A chunk's ``created`` field as vLLM's serving layer writes it (compact JSON).
_CREATED = re.compile(r'"created":(\d+)')


def continued_input(engine_input: Mapping[str, Any], resumed: Sequence[int]) -> dict[str, Any]:
    """A rendered prompt (vLLM's engine input) with the ``resumed`` token ids appended.

    The prompt's text and offsets go (they no longer match the ids); images keep their
    placeholders, which all come before. Raises ``ValueError`` for prompt embeddings.
    """
    if "prompt_token_ids" not in engine_input or engine_input.get("type") == "embeds":
        raise ValueError("a prompt of embeddings cannot be continued")
    continued = {
        key: value
        for key, value in engine_input.items()
        if key not in ("prompt", "prompt_token_offsets")
    }
    continued["prompt_token_ids"] = [*engine_input["prompt_token_ids"], *resumed]
    return continued


def continued_usage(usage: dict[str, Any], resumed: int) -> dict[str, Any]:
    """``usage`` of a continuation as the whole answer's: ``resumed`` prompt ids moved back.

    vLLM counted the earlier tokens as prompt tokens; they were generated, so they are
    completion tokens again (the total stays the same).
    """
    fixed = dict(usage)
    prompt = int(fixed.get("prompt_tokens") or 0) - resumed
    fixed["prompt_tokens"] = prompt
    fixed["completion_tokens"] = int(fixed.get("completion_tokens") or 0) + resumed
    details = fixed.get("prompt_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
        fixed["prompt_tokens_details"] = {
            **details,
            "cached_tokens": min(details["cached_tokens"], prompt),
        }
    return fixed


class ContinuedStream:
    """Rewrites a continuation's SSE strings so that they read as the first stream's rest."""

    def __init__(self, *, chat: bool, resumed: int, created: int | None) -> None:
        self._skip_role = chat
        self._resumed = resumed
        self._created = created
        #: ``(this stream's "created":N, the first stream's)``, once known.
        self._swap: tuple[str, str] | None = None

    def rewrite(self, chunk: str) -> str | None:
        """``chunk`` as the client gets it (``None``: left out)."""
        if self._skip_role:
            self._skip_role = False
            if '"role":' in chunk and chunk.startswith("data: {"):
                return None  # the client got the first stream's
        if self._created is not None and self._swap is None:
            found = _CREATED.search(chunk)
            if found is not None:
                self._swap = (found.group(0), f'"created":{self._created}')
        if self._swap is not None and self._swap[0] != self._swap[1]:
            chunk = chunk.replace(self._swap[0], self._swap[1], 1)
        return chunk

    def usage_chunk(self, decoded: dict[str, Any]) -> str:
        """The usage-only chunk (already decoded), its usage the whole answer's."""
        decoded["usage"] = continued_usage(decoded["usage"], self._resumed)
        data = json.dumps(decoded, separators=(",", ":"), ensure_ascii=False)
        rewritten = self.rewrite(f"data: {data}\n\n")
        return rewritten if rewritten is not None else f"data: {data}\n\n"


class ProgressRecorder:
    """What one ``/v1`` call's engine request generated, as vLLM's serving layer took it.

    A stream (vLLM's ``DELTA`` outputs): each output's ids and text are added as the
    serving layer takes it; :meth:`take` hands over what was added since the last take.
    The serving layer asks for an output only once it has written every string of the one
    before, so what :meth:`take` returns just before a string is what that string (and
    any before it) holds. A whole answer (``CUMULATIVE`` outputs in place of vLLM's
    ``FINAL_ONLY``): the latest output's length and text are kept, and :meth:`take`
    hands over the part not yet handed over.
    """

    def __init__(self, resume_token_ids: Sequence[int] = ()) -> None:
        self.resume_token_ids = tuple(resume_token_ids)
        self._ids: list[int] = []
        self._texts: list[str] = []
        self._cumulative_ids: Sequence[int] = ()
        self._cumulative_count = 0
        self._cumulative_text = ""
        self._taken_count = 0
        self._taken_chars = 0

    def add(self, token_ids: Sequence[int], text: str) -> None:
        """A streamed output's new tokens."""
        self._ids.extend(token_ids)
        self._texts.append(text)

    def add_cumulative(self, token_ids: Sequence[int], text: str) -> None:
        """A whole answer's output so far (vLLM may extend ``token_ids`` later: counted now)."""
        self._cumulative_ids = token_ids
        self._cumulative_count = len(token_ids)
        self._cumulative_text = text

    def take(self) -> OpenAIProgress | None:
        """The progress since the last take, if any."""
        if self._ids:
            progress = OpenAIProgress(self._ids, "".join(self._texts))
            self._ids, self._texts = [], []
            return progress
        if self._cumulative_count > self._taken_count:
            start, end = self._taken_count, self._cumulative_count
            text = self._cumulative_text[self._taken_chars :]
            self._taken_count, self._taken_chars = end, len(self._cumulative_text)
            return OpenAIProgress(list(self._cumulative_ids[start:end]), text)
        return None
