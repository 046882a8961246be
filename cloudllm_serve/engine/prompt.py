"""Fitting a conversation into the model's context.

The stored history is never changed; only the prompt sent to the engine drops its
oldest turns when the whole conversation no longer fits.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cloudllm_serve.engine.protocol import ChatMessage

#: Content-part types that carry an image (OpenAI's and vLLM's names).
IMAGE_PART_TYPES = frozenset({"image_url", "image", "image_pil", "input_image", "image_embeds"})


@dataclass(frozen=True)
class Encoded:
    """A rendered prompt: its token ids and, if vLLM rendered it (images), vLLM's input."""

    token_ids: list[int]
    engine_input: Any = None
    #: The length when the token ids are not known: a prompt longer than the whole
    #: context, which vLLM's renderer refuses to render (a lower bound).
    too_long: int | None = None

    @property
    def length(self) -> int:
        """How many tokens the prompt takes."""
        return self.too_long if self.too_long is not None else len(self.token_ids)


Encoder = Callable[[Sequence[ChatMessage]], Awaitable[Encoded]]


class PromptDoesNotFitError(ValueError):
    """Even the newest message alone is longer than the budget."""

    def __init__(self, tokens: int, budget: int) -> None:
        super().__init__(f"{tokens} prompt tokens, at most {budget} fit")
        self.tokens = tokens
        self.budget = budget


@dataclass(frozen=True)
class FittedPrompt:
    """The prompt to send and how many of the oldest history messages were left out."""

    token_ids: list[int]
    dropped_messages: int
    #: vLLM's rendered input (prompt with image placeholders widened, image data).
    engine_input: Any = None


def count_images(messages: Sequence[ChatMessage]) -> int:
    """How many image parts ``messages`` hold."""
    count = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            count += sum(
                1
                for part in content
                if isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES
            )
    return count


def leading_system_count(messages: Sequence[ChatMessage]) -> int:
    """How many system messages lead ``messages`` (the last message never counts)."""
    count = 0
    while count < len(messages) - 1 and messages[count].get("role") == "system":
        count += 1
    return count


def kept_messages(messages: Sequence[ChatMessage], dropped: int) -> list[ChatMessage]:
    """``messages`` less the ``dropped`` oldest history ones (as :func:`fit_messages` counts)."""
    head = leading_system_count(messages)
    return [*messages[:head], *messages[head + dropped :]]


async def fit_messages(
    messages: Sequence[ChatMessage],
    encode: Encoder,
    budget: int,
    *,
    max_images: int | None = None,
) -> FittedPrompt:
    """Encode ``messages`` into at most ``budget`` tokens by dropping the oldest turns.

    Leading system messages and the last message (the new one) are always kept. Turns
    are dropped oldest first, a user message together with the answer that follows it,
    so the prompt keeps the user/assistant alternation chat templates expect. With
    ``max_images``, turns are also dropped until the prompt holds at most that many
    images. The number of turns to drop is found by binary search: one encode when the
    whole conversation fits, a few when it does not.

    Raises :class:`PromptDoesNotFitError` when nothing but the kept messages is left
    and they still do not fit.
    """
    if not messages:
        raise ValueError("messages must not be empty")
    system_count = leading_system_count(messages)
    head = list(messages[:system_count])
    history = list(messages[system_count:-1])
    newest = messages[-1]
    turn_starts = [i for i, m in enumerate(history) if m.get("role") == "user"] or [0]
    if turn_starts[0] != 0:
        turn_starts.insert(0, 0)
    cut_points = [*turn_starts, len(history)]

    def selected(cut: int) -> list[ChatMessage]:
        return [*head, *history[cut:], newest]

    def too_many_images(cut: int) -> bool:
        return max_images is not None and count_images(selected(cut)) > max_images

    async def fitting(cut: int) -> Encoded | None:
        if too_many_images(cut):
            return None
        encoded = await encode(selected(cut))
        return encoded if encoded.length <= budget else None

    whole = await fitting(0)
    if whole is not None:
        return FittedPrompt(whole.token_ids, 0, whole.engine_input)
    shortest = await encode(selected(len(history)))
    if shortest.length > budget:
        raise PromptDoesNotFitError(shortest.length, budget)
    # cut_points[lo] does not fit, cut_points[hi] does.
    lo, hi = 0, len(cut_points) - 1
    best = shortest
    while hi - lo > 1:
        mid = (lo + hi) // 2
        encoded = await fitting(cut_points[mid])
        if encoded is not None:
            hi, best = mid, encoded
        else:
            lo = mid
    return FittedPrompt(best.token_ids, cut_points[hi], best.engine_input)
