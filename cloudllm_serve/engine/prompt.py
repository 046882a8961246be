"""Fitting a conversation into the model's context.

The stored history is never changed; only the prompt sent to the engine drops its
oldest turns when the whole conversation no longer fits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cloudllm_serve.engine.protocol import ChatMessage

Encoder = Callable[[Sequence[ChatMessage]], list[int]]


class PromptDoesNotFitError(ValueError):
    """Even the newest message alone is longer than the budget."""

    def __init__(self, tokens: int, budget: int) -> None:
        super().__init__(f"{tokens} prompt tokens, at most {budget} fit")
        self.tokens = tokens
        self.budget = budget


@dataclass(frozen=True)
class FittedPrompt:
    """The token ids to send and how many of the oldest history messages were left out."""

    token_ids: list[int]
    dropped_messages: int


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


def fit_messages(messages: Sequence[ChatMessage], encode: Encoder, budget: int) -> FittedPrompt:
    """Encode ``messages`` into at most ``budget`` tokens by dropping the oldest turns.

    Leading system messages and the last message (the new one) are always kept. Turns
    are dropped oldest first, a user message together with the answer that follows it,
    so the prompt keeps the user/assistant alternation chat templates expect. The
    number of turns to drop is found by binary search: one encode when the whole
    conversation fits, a few when it does not.

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

    def encode_from(cut: int) -> list[int]:
        return encode([*head, *history[cut:], newest])

    whole = encode_from(0)
    if len(whole) <= budget:
        return FittedPrompt(whole, 0)
    shortest = encode_from(len(history))
    if len(shortest) > budget:
        raise PromptDoesNotFitError(len(shortest), budget)
    # cut_points[lo] does not fit, cut_points[hi] does.
    lo, hi = 0, len(cut_points) - 1
    best = shortest
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ids = encode_from(cut_points[mid])
        if len(ids) <= budget:
            hi, best = mid, ids
        else:
            lo = mid
    return FittedPrompt(best, cut_points[hi])
