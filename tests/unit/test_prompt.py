"""Fitting a conversation into the context: oldest turns go first, never the new message."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from cloudllm_serve.engine.prompt import PromptDoesNotFitError, fit_messages
from cloudllm_serve.engine.protocol import ChatMessage


def word_encoder(messages: Sequence[ChatMessage]) -> list[int]:
    """One token per word plus two per message (a stand-in chat template)."""
    tokens: list[int] = []
    for index, message in enumerate(messages):
        tokens += [index, index] + [index] * len(message["content"].split())
    return tokens


def conversation(turns: int, words: int = 10) -> list[ChatMessage]:
    messages: list[ChatMessage] = []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"question{turn} " + "w " * (words - 1)})
        messages.append({"role": "assistant", "content": f"answer{turn} " + "w " * (words - 1)})
    return messages


def test_everything_fits() -> None:
    messages = [*conversation(3), {"role": "user", "content": "new"}]
    fitted = fit_messages(messages, word_encoder, budget=1000)
    assert fitted.dropped_messages == 0
    assert fitted.token_ids == word_encoder(messages)


def test_oldest_turns_dropped_in_pairs() -> None:
    messages = [*conversation(5), {"role": "user", "content": "new"}]
    # each message costs 12 tokens, the new one 3: 3 turns + new = 75
    fitted = fit_messages(messages, word_encoder, budget=75)
    assert fitted.dropped_messages == 4
    assert fitted.token_ids == word_encoder(messages[4:])
    assert len(fitted.token_ids) <= 75


def test_minimum_dropped_not_more() -> None:
    messages = [*conversation(6), {"role": "user", "content": "new"}]
    for budget in range(3, 160):
        try:
            fitted = fit_messages(messages, word_encoder, budget)
        except PromptDoesNotFitError:
            assert budget < 3
            continue
        assert len(fitted.token_ids) <= budget
        if fitted.dropped_messages:
            # keeping one more turn would not have fitted
            kept_more = word_encoder(messages[fitted.dropped_messages - 2 :])
            assert len(kept_more) > budget


def test_system_messages_are_kept() -> None:
    system: ChatMessage = {"role": "system", "content": "be brief"}
    messages = [system, *conversation(4), {"role": "user", "content": "new"}]
    fitted = fit_messages(messages, word_encoder, budget=40)
    kept = [system, *messages[1 + fitted.dropped_messages :]]
    assert fitted.token_ids == word_encoder(kept)


def test_new_message_too_long() -> None:
    messages = [*conversation(2), {"role": "user", "content": "x " * 500}]
    with pytest.raises(PromptDoesNotFitError) as caught:
        fit_messages(messages, word_encoder, budget=100)
    assert caught.value.tokens == 502
    assert caught.value.budget == 100
