"""``/v1/responses`` on the real stack (vLLM on SmolLM2) through the official OpenAI SDK.

The simulated engine's tests (``tests/sim/test_responses_api.py``) cover the chain, the
stream, background responses and conversations; these need a model: a function call the
model makes and, in the next turn, the answer to it.
"""

from __future__ import annotations

import json

from openai import OpenAI

from tests.conftest import Stack

MODEL = "SmolLM2-135M-Instruct"
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


def test_a_function_call_is_answered_in_the_next_turn(stack: Stack) -> None:
    """``tool_choice`` required and ``strict`` arguments (the small model needs both)."""
    client = OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0)
    asked = client.responses.create(
        model=MODEL,
        input="What is the weather in Paris?",
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice="required",
        temperature=0,
        max_output_tokens=100,
    )
    calls = [item for item in asked.output if item.type == "function_call"]
    assert len(calls) >= 1, asked.output
    call = calls[0]
    assert call.name == "get_weather"
    assert isinstance(json.loads(call.arguments)["city"], str)  # strict: the schema's shape

    answered = client.responses.create(
        model=MODEL,
        previous_response_id=asked.id,
        input=[
            {
                "type": "function_call_output",
                "call_id": call.call_id,
                "output": json.dumps({"city": "Paris", "temperature_c": 21}),
            }
        ],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        temperature=0,
        max_output_tokens=24,
    )
    print(f"\n[function call] {call.arguments} -> {answered.output_text!r}")
    assert answered.status in ("completed", "incomplete") and answered.output_text
    assert answered.usage is not None and asked.usage is not None
    # The call and its output reached the model: the prompt holds the first turn and more.
    assert answered.usage.input_tokens > asked.usage.input_tokens
    items = client.responses.input_items.list(answered.id)
    assert [item.type for item in items.data] == ["function_call_output"]
