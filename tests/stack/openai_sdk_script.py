"""Drive a running CloudLLM Serve with the official OpenAI SDK, sync and async.

    python tests/stack/openai_sdk_script.py --base-url http://127.0.0.1:8001

Prints one line per check (``ok <name>: <what it saw>``) and exits 1 at the first
failure. ``tests/stack/test_openai_sdk.py`` runs it against the real stack.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import jsonschema
import openai
from openai import AsyncOpenAI, OpenAI

PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def report(name: str, seen: object) -> None:
    print(f"ok {name}: {seen}", flush=True)


def run_sync(client: OpenAI) -> str:
    models = [m.id for m in client.models.list()]
    assert len(models) == 1, models
    model = models[0]
    report("models.list", models)

    chat = client.chat.completions.create(
        model=model,
        # The wording the model answers right on every CPU (tests/stack/test_seed_api.py).
        messages=[{"role": "user", "content": "Name the capital of France."}],
        max_tokens=20,
        temperature=0,
    )
    answer = chat.choices[0].message.content or ""
    assert "Paris" in answer, answer
    assert chat.usage is not None and chat.usage.completion_tokens > 0
    report("chat", f"{answer!r} usage={chat.usage.completion_tokens}")

    pieces, usage, started = [], None, time.perf_counter()
    first_at = None
    for chunk in client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Tell me a short story."}],
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            first_at = first_at or time.perf_counter() - started
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert usage is not None and usage.completion_tokens == 40, usage
    assert len(pieces) > 10, pieces
    report(
        "chat stream",
        f"{len(pieces)} deltas, first after {first_at:.3f} s, usage={usage.completion_tokens}",
    )

    completion = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert "Paris" in completion.choices[0].text, completion.choices[0].text
    report("completions", repr(completion.choices[0].text))

    streamed = "".join(
        chunk.choices[0].text
        for chunk in client.completions.create(
            model=model, prompt="Once upon a time", max_tokens=16, stream=True
        )
        if chunk.choices
    )
    assert streamed, "empty completion stream"
    report("completions stream", repr(streamed))

    structured = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Describe a person as JSON with name and age."}],
        max_tokens=60,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON_SCHEMA},
        },
    )
    import json

    person = json.loads(structured.choices[0].message.content or "")
    jsonschema.validate(person, PERSON_SCHEMA)
    report("json_schema", person)

    stopped = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Count from 1 to 10, one number per line."}],
        max_tokens=60,
        temperature=0,
        stop=["5"],
    )
    text = stopped.choices[0].message.content or ""
    assert "5" not in text and "4" in text, text
    assert stopped.choices[0].finish_reason == "stop"
    report("stop sequence", repr(text))

    try:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError as error:
        report("unknown model", f"NotFoundError {error.status_code}")

    try:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], temperature=-3
        )
        raise AssertionError("temperature=-3 accepted")
    except openai.BadRequestError as error:
        report("temperature=-3", f"BadRequestError {error.status_code}")

    run_tools(client, model)
    return model


WEATHER_PARAMS: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}


def run_tools(client: OpenAI, model: str) -> None:
    """A named tool call in a stored conversation, then the conversation goes on."""
    import json

    tools: Any = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The current weather in a city",
                "parameters": WEATHER_PARAMS,
                "strict": True,
            },
        }
    ]
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=120,
        temperature=0,
        extra_body={"store": True},
    )
    conversation_id = raw.headers["x-conversation-id"]
    message = raw.parse().choices[0].message
    assert message.tool_calls, message
    call = message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather", call
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER_PARAMS)
    report("named tool_choice", f"{call.function.name}({arguments})")

    after = client.chat.completions.create(
        model=model,
        messages=[{"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"}],
        tools=tools,
        max_tokens=30,
        temperature=0,
        extra_body={"conversation_id": conversation_id},
    )
    assert after.choices[0].message.content, after
    # vLLM's usage counts the whole prompt: the stored question and tool call came along.
    assert after.usage is not None and after.usage.prompt_tokens > 40, after.usage
    report("tool message in a stored conversation", repr(after.choices[0].message.content))


async def run_async(base_url: str, model: str, streams: int) -> None:
    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)

    async def one(index: int) -> int:
        count = 0
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"Tell me fact number {index} about space."}],
            max_tokens=24,
            stream=True,
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                count += 1
        return count

    started = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(streams)))
    assert all(count > 0 for count in counts), counts
    report(
        f"{streams} concurrent async streams",
        f"deltas={counts} in {time.perf_counter() - started:.2f} s",
    )
    await client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--base-url", default="http://127.0.0.1:8001")
    parser.add_argument("--streams", type=int, default=8)
    args = parser.parse_args()
    base = args.base_url.rstrip("/") + "/v1"
    try:
        model = run_sync(OpenAI(base_url=base, api_key="unused", max_retries=0))
        asyncio.run(run_async(base, model, args.streams))
    except AssertionError as error:
        print(f"FAILED: {error}", flush=True)
        return 1
    print("all checks passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
