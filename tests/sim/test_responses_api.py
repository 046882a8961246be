"""``/v1/responses`` on the stack (simulated engine) through the official OpenAI SDK.

vLLM's ``OpenAIServingResponses`` answers in the engine replica; responses are kept in
Redis by the ingress, and ``previous_response_id`` chains are expanded there.
"""

from __future__ import annotations

import time

import openai
import pytest
import requests
from openai import OpenAI
from openai.types.responses import (
    ResponseCompletedEvent,
    ResponseCreatedEvent,
    ResponseIncompleteEvent,
    ResponseTextDeltaEvent,
)

from tests.conftest import Stack
from tests.support import wait_for


def _client(stack: Stack) -> OpenAI:
    return OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0)


def test_a_chain_of_three_responses_is_kept_read_listed_and_deleted(sim_stack: Stack) -> None:
    client = _client(sim_stack)
    first = client.responses.create(
        model="sim",
        input="Hello there",
        instructions="Answer briefly.",
        max_output_tokens=6,
        temperature=0,
        store=True,
    )
    # "incomplete": the answer reached max_output_tokens (OpenAI's status for it).
    assert first.status == "incomplete" and first.output_text
    second = client.responses.create(
        model="sim", input="Tell me more", previous_response_id=first.id, max_output_tokens=6
    )
    third = client.responses.create(
        model="sim",
        input=[{"role": "user", "content": "And the end?"}],
        previous_response_id=second.id,
        max_output_tokens=6,
    )
    assert third.previous_response_id == second.id
    assert first.usage is not None and second.usage is not None and third.usage is not None
    # The history reached the model: each turn's prompt holds the ones before it.
    assert first.usage.input_tokens < second.usage.input_tokens < third.usage.input_tokens
    assert third.usage.output_tokens == 6

    got = client.responses.retrieve(second.id)
    assert got.id == second.id and got.output_text == second.output_text
    items = client.responses.input_items.list(third.id)
    assert [item.type for item in items.data] == ["message"]
    assert items.data[0].content[0].text == "And the end?"  # type: ignore[index,union-attr]

    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)


def test_a_streamed_response_parses_with_the_sdk_types_and_is_kept(sim_stack: Stack) -> None:
    client = _client(sim_stack)
    events = list(
        client.responses.create(model="sim", input="Stream it", max_output_tokens=5, stream=True)
    )
    assert isinstance(events[0], ResponseCreatedEvent)
    deltas = [e.delta for e in events if isinstance(e, ResponseTextDeltaEvent)]
    assert deltas
    completed = events[-1]  # max_output_tokens reached: response.incomplete
    assert isinstance(completed, (ResponseCompletedEvent, ResponseIncompleteEvent))
    assert completed.response.output_text == "".join(deltas)
    kept = client.responses.retrieve(completed.response.id)
    assert kept.output_text == completed.response.output_text
    chained = client.responses.create(
        model="sim", input="Again", previous_response_id=kept.id, max_output_tokens=3
    )
    assert chained.usage is not None and completed.response.usage is not None
    assert chained.usage.input_tokens > completed.response.usage.input_tokens


def _running_requests(stack: Stack) -> int:
    status = requests.get(f"{stack.base_url}/status/detailed", timeout=10).json()
    return int(status["engine"]["summary"]["running_requests"] or 0)


def test_background_responses_are_polled_to_the_end_or_cancelled(sim_stack: Stack) -> None:
    """The SDK's background flow: created queued, polled to its end; a long one cancelled,
    after which the engine runs nothing (its request was aborted)."""
    client = _client(sim_stack)
    late = client.responses.create(
        model="sim", input="Later, please", max_output_tokens=8, background=True
    )
    assert late.status == "queued" and late.background is True
    deadline = time.monotonic() + 30
    while late.status in ("queued", "in_progress") and time.monotonic() < deadline:
        time.sleep(0.1)
        late = client.responses.retrieve(late.id)
    assert late.status in ("completed", "incomplete") and late.output_text
    assert late.usage is not None and late.usage.output_tokens == 8
    chained = client.responses.create(
        model="sim", input="And then?", previous_response_id=late.id, max_output_tokens=3
    )
    assert chained.usage is not None and chained.usage.input_tokens > late.usage.input_tokens

    # ~16 s of decoding (400 steps of SIM_STEP_MS), within REQUEST_TIMEOUT_S.
    long = client.responses.create(
        model="sim", input="A long one", max_output_tokens=400, background=True
    )
    wait_for(lambda: _running_requests(sim_stack) >= 1, timeout_s=10, interval_s=0.1)
    cancelled = client.responses.cancel(long.id)
    assert cancelled.status == "cancelled"
    wait_for(lambda: _running_requests(sim_stack) == 0, timeout_s=10, interval_s=0.2)
    assert client.responses.retrieve(long.id).status == "cancelled"


def test_a_conversation_through_the_sdk_holds_responses_and_generate_turns(
    sim_stack: Stack,
) -> None:
    """client.conversations with items and metadata; a response in it sees its items and
    is added to it; /generate continues the same conversation; then it is deleted."""
    client = _client(sim_stack)
    conversation = client.conversations.create(
        items=[{"type": "message", "role": "user", "content": "My name is Ada."}],
        metadata={"topic": "names"},
    )
    assert conversation.metadata == {"topic": "names"}
    plain = client.responses.create(model="sim", input="What is my name?", max_output_tokens=4)
    inside = client.responses.create(
        model="sim", input="What is my name?", conversation=conversation.id, max_output_tokens=4
    )
    assert plain.usage is not None and inside.usage is not None
    assert inside.usage.input_tokens > plain.usage.input_tokens  # the item reached the model
    items = client.conversations.items.list(conversation.id, order="asc")
    assert [item.role for item in items.data] == ["user", "user", "assistant"]  # type: ignore[union-attr]
    added = client.conversations.items.create(
        conversation.id, items=[{"type": "message", "role": "user", "content": "Thanks."}]
    )
    item = client.conversations.items.retrieve(added.data[0].id, conversation_id=conversation.id)
    assert item.content[0].text == "Thanks."  # type: ignore[union-attr,index]
    turn = requests.post(
        f"{sim_stack.base_url}/generate",
        json={"message": "Bye.", "conversation_id": conversation.id, "max_tokens": 3},
        timeout=60,
    )
    assert turn.status_code == 200, turn.text
    assert len(client.conversations.items.list(conversation.id).data) == 6
    updated = client.conversations.update(conversation.id, metadata={"topic": "done"})
    assert updated.metadata == {"topic": "done"}
    assert client.conversations.delete(conversation.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conversation.id)
