"""The simulated engine behind the real stack, and stream coalescing (``LLM_MODEL=sim``).

The official OpenAI SDK parses what vLLM's serving layer builds on the simulated
engine; ``/generate`` and stored conversations run their real code on it; a coalesced
stream keeps every SSE event, in order, and its first token is not held back.
"""

from __future__ import annotations

import json
import time
from typing import Any

import requests
from openai import OpenAI

from tests.conftest import Stack
from tests.sim.conftest import SIM_STEP_MS, SIM_TTFT_MS, STREAM_BATCH_INTERVAL_MS


def sse_reads(response: requests.Response, started: float) -> list[tuple[float, list[str]]]:
    """Each network read of an SSE response: (seconds since ``started``, events in it).

    Events split across reads are counted in the read that completes them.
    """
    reads: list[tuple[float, list[str]]] = []
    tail = ""
    for data in response.iter_content(chunk_size=None):
        tail += data.decode()
        *events, tail = tail.split("\n\n")
        reads.append((time.perf_counter() - started, [e.removeprefix("data: ") for e in events]))
    assert tail == "", f"a stream ended inside an event: {tail!r}"
    return reads


def test_health_and_status_say_the_engine_is_simulated(sim_stack: Stack) -> None:
    health = requests.get(f"{sim_stack.base_url}/health", timeout=30).json()
    assert health["engine_type"] == "simulated" and health["model_name"] == "sim"
    status = requests.get(f"{sim_stack.base_url}/status/detailed", timeout=30).json()
    assert status["engine_type"] == "simulated"
    assert status["simulation"]["ttft_ms"] == SIM_TTFT_MS
    assert status["config"]["stream_batch_interval_ms"] == STREAM_BATCH_INTERVAL_MS


def test_the_openai_sdk_parses_every_answer(sim_stack: Stack) -> None:
    client = OpenAI(base_url=f"{sim_stack.base_url}/v1", api_key="unused", max_retries=0)
    assert [model.id for model in client.models.list()] == ["sim"]

    chat = client.chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "hello"}], max_tokens=6, n=2
    )
    assert len(chat.choices) == 2 and all(c.message.content for c in chat.choices)
    assert chat.usage is not None and chat.usage.completion_tokens == 12

    texts: dict[int, str] = {0: "", 1: ""}
    usage = None
    for chunk in client.chat.completions.create(
        model="sim",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=6,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    ):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
        usage = chunk.usage or usage
    assert all(texts.values()) and usage is not None and usage.completion_tokens == 12

    completion = client.completions.create(model="sim", prompt=["one", "two"], max_tokens=5)
    assert len(completion.choices) == 2 and all(c.text for c in completion.choices)
    assert completion.usage is not None and completion.usage.completion_tokens == 10

    streamed = ""
    for part in client.completions.create(model="sim", prompt="one", max_tokens=5, stream=True):
        streamed += "".join(choice.text for choice in part.choices)
    assert streamed


def test_generate_and_a_stored_conversation(sim_stack: Stack) -> None:
    base = sim_stack.base_url
    first = requests.post(f"{base}/generate", json={"message": "hi", "max_tokens": 5}, timeout=60)
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["model_info"]["engine"] == "simulated"
    assert body["model_info"]["timings"]["tokens_generated"] == 5 and body["response"]
    conversation = body["conversation_id"]
    second = requests.post(
        f"{base}/generate",
        json={"message": "again", "conversation_id": conversation, "max_tokens": 5},
        timeout=60,
    )
    assert second.status_code == 200, second.text
    stored = requests.get(f"{base}/conversations/{conversation}", timeout=30).json()
    contents = [message["content"] for message in stored["messages"]]
    assert contents == ["hi", body["response"], "again", second.json()["response"]]


def chat_body(**extra: Any) -> dict[str, Any]:
    return {
        "model": "sim",
        "messages": [{"role": "user", "content": "tell me"}],
        "max_tokens": 16,
        "seed": 7,
        **extra,
    }


def test_a_coalesced_stream_keeps_every_event_in_order(sim_stack: Stack) -> None:
    base = sim_stack.base_url
    whole = requests.post(f"{base}/v1/chat/completions", json=chat_body(), timeout=60)
    assert whole.status_code == 200, whole.text
    answer = whole.json()["choices"][0]["message"]["content"]

    with requests.post(
        f"{base}/v1/chat/completions", json=chat_body(stream=True), stream=True, timeout=60
    ) as response:
        assert response.status_code == 200, response.text
        reads = sse_reads(response, time.perf_counter())
    events = [event for _, batch in reads for event in batch]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"]["content"] for c in chunks[1:]]
    # One event per token, as vLLM sends them, in order: together the whole answer.
    assert len(deltas) == 16 and "".join(deltas) == answer
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # 16 tokens 40 ms apart, gathered for up to 1 s: they came in a few writes, not 17.
    assert len(reads) <= 4, [len(batch) for _, batch in reads]


def test_the_first_token_is_not_held_for_the_batch(sim_stack: Stack) -> None:
    """With a 1 s interval the first token still goes out as soon as the engine makes it."""
    tokens = 12
    started = time.perf_counter()
    with requests.post(
        f"{sim_stack.base_url}/generate",
        json={"message": "hello", "max_tokens": tokens, "stream": True},
        stream=True,
        timeout=60,
    ) as response:
        assert response.status_code == 200, response.text
        reads = sse_reads(response, started)
    first_at, first_events = reads[0]
    assert json.loads(first_events[0])["type"] == "delta"
    final = json.loads(reads[-1][1][-1])
    assert final["type"] == "final"
    engine_ttft_ms = final["response"]["model_info"]["timings"]["ttft_ms"]
    assert engine_ttft_ms >= SIM_TTFT_MS * 0.9
    # The client saw the first token within 100 ms of the engine producing it.
    assert first_at * 1000 - engine_ttft_ms < 100, (first_at, engine_ttft_ms)
    # ...and the rest, made 40 ms apart, was gathered (not sent token by token).
    later = sum(1 for _, events in reads[1:] for e in events if '"delta"' in e)
    assert later == tokens - 1
    assert len(reads) <= 3, [len(events) for _, events in reads]
    assert reads[-1][0] - first_at >= (tokens - 2) * SIM_STEP_MS / 1000 * 0.9


def engine_tokens(stack: Stack) -> int:
    """Tokens the engine replicas report having generated, all together."""
    status = requests.get(f"{stack.base_url}/status/detailed", timeout=30).json()
    return sum(
        (replica.get("stats") or {}).get("tokens_generated", 0)
        for replica in status["engine"]["replicas"]
    )


def test_the_engines_count_the_tokens_of_v1_calls_too(sim_stack: Stack) -> None:
    """The deadline admission measures the engines from these counts: a ``/v1``-only load
    must move them as ``/generate`` does (they once counted ``/generate`` only)."""
    before = engine_tokens(sim_stack)
    model = requests.get(f"{sim_stack.base_url}/v1/models", timeout=30).json()["data"][0]["id"]
    body = {"model": model, "prompt": "Count these.", "max_tokens": 12, "ignore_eos": True}
    response = requests.post(f"{sim_stack.base_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    deadline = time.monotonic() + 15
    while engine_tokens(sim_stack) - before < 12:  # /status/detailed may be 1 s old
        assert time.monotonic() < deadline, (before, engine_tokens(sim_stack))
        time.sleep(0.5)
