"""Fitting a conversation into the context: oldest turns go first, never the new message."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from cloudllm_serve.engine.prompt import (
    Encoded,
    FittedPrompt,
    PromptDoesNotFitError,
    count_images,
    fit_messages,
)
from cloudllm_serve.engine.protocol import ChatMessage


def word_encoder(messages: Sequence[ChatMessage]) -> list[int]:
    """One token per word plus two per message, 10 per image (a stand-in chat template)."""
    tokens: list[int] = []
    for index, message in enumerate(messages):
        content = message["content"]
        text = (
            content
            if isinstance(content, str)
            else " ".join(part.get("text", "") for part in content)
        )
        tokens += [index, index] + [index] * (len(text.split()) + 10 * count_images([message]))
    return tokens


async def _encode(messages: Sequence[ChatMessage]) -> Encoded:
    return Encoded(word_encoder(messages))


def fit(messages: list[ChatMessage], budget: int, **options: Any) -> FittedPrompt:
    return asyncio.run(fit_messages(messages, _encode, budget, **options))


def conversation(turns: int, words: int = 10) -> list[ChatMessage]:
    messages: list[ChatMessage] = []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"question{turn} " + "w " * (words - 1)})
        messages.append({"role": "assistant", "content": f"answer{turn} " + "w " * (words - 1)})
    return messages


def test_everything_fits() -> None:
    messages = [*conversation(3), {"role": "user", "content": "new"}]
    fitted = fit(messages, 1000)
    assert fitted.dropped_messages == 0
    assert fitted.token_ids == word_encoder(messages)


def test_oldest_turns_dropped_in_pairs() -> None:
    messages = [*conversation(5), {"role": "user", "content": "new"}]
    # each message costs 12 tokens, the new one 3: 3 turns + new = 75
    fitted = fit(messages, 75)
    assert fitted.dropped_messages == 4
    assert fitted.token_ids == word_encoder(messages[4:])
    assert len(fitted.token_ids) <= 75


def test_minimum_dropped_not_more() -> None:
    messages = [*conversation(6), {"role": "user", "content": "new"}]
    for budget in range(3, 160):
        try:
            fitted = fit(messages, budget)
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
    fitted = fit(messages, 40)
    kept = [system, *messages[1 + fitted.dropped_messages :]]
    assert fitted.token_ids == word_encoder(kept)


def test_new_message_too_long() -> None:
    messages = [*conversation(2), {"role": "user", "content": "x " * 500}]
    with pytest.raises(PromptDoesNotFitError) as caught:
        fit(messages, 100)
    assert caught.value.tokens == 502
    assert caught.value.budget == 100


def image_turn(turn: int) -> list[ChatMessage]:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
    return [
        {"role": "user", "content": [image, {"type": "text", "text": f"question{turn}"}]},
        {"role": "assistant", "content": f"answer{turn}"},
    ]


def test_images_count_toward_the_budget() -> None:
    messages = [*image_turn(0), *image_turn(1), {"role": "user", "content": "new"}]
    assert count_images(messages) == 2
    whole = len(word_encoder(messages))
    assert fit(messages, whole).dropped_messages == 0
    # one token short: the oldest turn, with its image, goes
    fitted = fit(messages, whole - 1)
    assert fitted.dropped_messages == 2
    assert fitted.token_ids == word_encoder(messages[2:])


def test_turns_dropped_until_the_image_limit_holds() -> None:
    messages = [*image_turn(0), *image_turn(1), *image_turn(2), {"role": "user", "content": "n"}]
    assert fit(messages, 10_000, max_images=3).dropped_messages == 0
    assert fit(messages, 10_000, max_images=2).dropped_messages == 2
    assert fit(messages, 10_000, max_images=0).dropped_messages == 6
