"""``/v1`` against raw vLLM: the same requests, the same answers.

The test runs vLLM's own OpenAI server (``vllm serve``'s module; started beside the
session's stack, see ``conftest.py``) with the arguments our engine replicas run with
(:func:`~cloudllm_serve.engine.vllm_engine.vllm_cli_args`), sends every request of
:data:`CASES` to it and to the stack (one at a time on each), and compares at
temperature 0 (or a fixed seed): texts, token counts, finish reasons, tool calls and
logprob tokens, the set of JSON keys (ids and timestamps aside), statuses and error
types.
"""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from tests.conftest import Stack

MODEL = "SmolLM2-135M-Instruct"
HI = [{"role": "user", "content": "Say hello to Bob."}]
WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": WEATHER_PARAMS,
            "strict": True,
        },
    }
]
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


@dataclass(frozen=True)
class Case:
    """One request: ``body`` is JSON (or raw bytes with ``content_type``)."""

    name: str
    path: str
    body: dict[str, Any] | bytes | None
    method: str = "POST"
    content_type: str = "application/json"


def chat(name: str, **body: Any) -> Case:
    return Case(name, "/v1/chat/completions", {"model": MODEL, "messages": HI, **body})


def completion(name: str, **body: Any) -> Case:
    return Case(name, "/v1/completions", {"model": MODEL, "prompt": "Once upon a time", **body})


G = {"temperature": 0, "max_tokens": 12}
CASES = [
    chat("chat", **G),
    chat("chat-stream", stream=True, **G),
    chat("chat-stream-usage", stream=True, stream_options={"include_usage": True}, **G),
    chat(
        "chat-stream-continuous-usage",
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        **G,
    ),
    chat("chat-n2", n=2, **G),
    chat("chat-logprobs", logprobs=True, top_logprobs=3, **G),
    chat("chat-stream-logprobs", logprobs=True, top_logprobs=2, stream=True, **G),
    chat("chat-stop", stop=["!", "."], **G),
    chat("chat-stop-token-ids", stop_token_ids=[28, 30], **G),
    chat("chat-min-tokens", min_tokens=10, temperature=0, max_tokens=14),
    chat("chat-repetition-penalty", repetition_penalty=1.4, **G),
    chat("chat-penalties", presence_penalty=1.0, frequency_penalty=0.5, **G),
    chat("chat-seeded", temperature=0.9, seed=42, max_tokens=12),
    chat("chat-top-k-p", top_k=5, top_p=0.5, seed=3, temperature=0.7, max_tokens=12),
    chat("chat-ignore-eos", ignore_eos=True, **G),
    chat("chat-max-completion-tokens", temperature=0, max_completion_tokens=6),
    chat("chat-json-object", response_format={"type": "json_object"}, temperature=0, max_tokens=30),
    chat(
        "chat-json-schema",
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}},
        temperature=0,
        max_tokens=40,
    ),
    chat("chat-structured-choice", structured_outputs={"choice": ["yes", "no"]}, **G),
    chat("chat-structured-regex", structured_outputs={"regex": "[0-9]{3}"}, **G),
    chat("chat-template-kwargs", chat_template_kwargs={"add_generation_prompt": True}, **G),
    chat("chat-echo", echo=True, **G),
    chat(
        "chat-system-and-turns",
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
        ],
        **G,
    ),
    chat("tools-none", messages=WEATHER, tools=TOOLS, tool_choice="none", **G),
    chat(
        "tools-auto",
        messages=WEATHER,
        tools=TOOLS,
        tool_choice="auto",
        temperature=0,
        max_tokens=40,
    ),
    chat(
        "tools-required",
        messages=WEATHER,
        tools=TOOLS,
        tool_choice="required",
        temperature=0,
        max_tokens=60,
    ),
    chat(
        "tools-named",
        messages=WEATHER,
        tools=TOOLS,
        tool_choice=NAMED,
        temperature=0,
        max_tokens=60,
    ),
    chat(
        "tools-named-stream",
        messages=WEATHER,
        tools=TOOLS,
        tool_choice=NAMED,
        temperature=0,
        max_tokens=60,
        stream=True,
    ),
    completion("completion", **G),
    completion("completion-stream", stream=True, **G),
    completion("completion-stream-usage", stream=True, stream_options={"include_usage": True}, **G),
    completion("completion-logprobs", logprobs=2, **G),
    completion("completion-echo", echo=True, temperature=0, max_tokens=4),
    completion("completion-token-ids", prompt=[9690, 2399, 253, 655], **G),
    completion("completion-batch", prompt=["One", "Two"], **G),
    completion("completion-n2-stream", n=2, stream=True, **G),
    completion("completion-stop", stop=[","], **G),
    completion("completion-suffix", suffix="The end.", **G),
    Case("models", "/v1/models", None, method="GET"),
    # Bad requests.
    chat("bad-temperature", temperature="hot"),
    chat("bad-no-messages", messages=None),
    chat("chat-custom-role", messages=[{"role": "robot", "content": "Hi"}], **G),
    chat("bad-messages-not-a-list", messages="hello"),
    chat("bad-message-without-role", messages=[{"content": "x"}]),
    chat("bad-model", model="nope", **G),
    chat("bad-named-tool-without-tools", tool_choice=NAMED, **G),
    chat("bad-tool-choice-without-tools", tool_choice="auto", **G),
    chat(
        "bad-schema-feature",
        response_format={
            "type": "json_schema",
            "json_schema": {
                "name": "n",
                "schema": {
                    "type": "object",
                    "properties": {"x": {"type": "number", "multipleOf": 3}},
                },
            },
        },
        **G,
    ),
    chat("bad-max-tokens-over-context", temperature=0, max_tokens=100_000),
    chat("bad-max-tokens-over-context-stream", temperature=0, max_tokens=100_000, stream=True),
    chat("bad-prompt-over-context", messages=[{"role": "user", "content": "hello " * 2100}]),
    chat("bad-n-zero", n=0, **G),
    chat("bad-top-logprobs", logprobs=True, top_logprobs=50, **G),
    completion("bad-oov-token", prompt=[[27381192073]], max_tokens=3),
    # vLLM reports these two in the stream (status 200, an error event): so do we.
    completion("bad-oov-token-stream", prompt=[[27381192073]], max_tokens=3, stream=True),
    chat(
        "bad-schema-feature-stream",
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "n", "schema": {"type": "number", "multipleOf": 3}},
        },
        stream=True,
        **G,
    ),
    completion("bad-negative-max-tokens", max_tokens=-1),
    Case("bad-no-prompt", "/v1/completions", {"model": MODEL, "max_tokens": 3}),
    Case("bad-json", "/v1/chat/completions", b'{"messages": ['),
    Case("bad-content-type", "/v1/chat/completions", b"{}", content_type="text/plain"),
    Case("bad-method", "/v1/chat/completions", None, method="GET"),
    Case("bad-route", "/v1/nope", {}),
]

#: Where vllm serve answers FastAPI's ``{"detail": ...}`` body, we answer OpenAI's error
#: body (every ``/v1`` error in OpenAI's shape); only the status must match there.
OPENAI_BODY_WHERE_VLLM_HAS_NONE = {"bad-method", "bad-route"}

#: Keys whose values differ between any two servers (ids, clocks, paths).
VOLATILE = {"id", "created", "root", "system_fingerprint"}


ERROR_KEYS = {".error", ".error.message", ".error.type", ".error.param", ".error.code"}


@dataclass
class Answer:
    """What a server answered, reduced to what must match."""

    status: int
    error_type: str | None
    keys: set[str]
    outcome: dict[str, Any]


#: Where each case gets a fresh ``cache_salt`` (see :func:`send`).
SALTED_PATHS = ("/v1/chat/completions", "/v1/completions")


def send(base_url: str, case: Case) -> Answer:
    kwargs: dict[str, Any] = {"timeout": 300}
    if isinstance(case.body, bytes):
        kwargs["data"] = case.body
        kwargs["headers"] = {"Content-Type": case.content_type}
    elif case.body is not None:
        kwargs["json"] = {k: v for k, v in case.body.items() if v is not None}
        if case.path in SALTED_PATHS and not case.name.startswith("bad-"):
            # A prefix neither engine has cached: on CPUs with AMX, vLLM's bf16 answer from a
            # cached prefix and from one computed afresh can differ after a few tokens.
            kwargs["json"].setdefault("cache_salt", uuid.uuid4().hex)
    response = requests.request(case.method, base_url + case.path, **kwargs)
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        chunks = [
            json.loads(block[6:])
            for block in response.text.split("\n\n")
            if block.startswith("data: {")
        ]
        errors = [chunk["error"].get("type") for chunk in chunks if "error" in chunk]
        return Answer(
            response.status_code,
            errors[0] if errors else None,
            key_paths(chunks),
            stream_outcome(chunks),
        )
    body = response.json()
    error = body.get("error") if isinstance(body, dict) else None
    if error is not None:
        kind = error.get("type") if isinstance(error, dict) else str(error)
        return Answer(response.status_code, kind, key_paths(body), {})
    return Answer(response.status_code, None, key_paths(body), whole_outcome(body))


def key_paths(value: Any, prefix: str = "") -> set[str]:
    """Every JSON key path in ``value`` (list positions collapsed to ``[]``)."""
    paths: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{prefix}.{key}"
            paths.add(path)
            if key not in ("top_logprobs", "logprobs") or not isinstance(item, dict):
                paths |= key_paths(item, path)
    elif isinstance(value, list):
        for item in value:
            paths |= key_paths(item, prefix + "[]")
    return paths


def whole_outcome(body: dict[str, Any]) -> dict[str, Any]:
    """Texts, finish reasons, tool calls, logprob tokens and usage of a JSON answer."""
    if body.get("object") == "list":
        return {"models": [m["id"] for m in body["data"]]}
    if "choices" not in body:
        return {"body": body}
    choices = []
    for choice in body["choices"]:
        message = choice.get("message") or {}
        calls = [
            (c["function"]["name"], c["function"]["arguments"])
            for c in message.get("tool_calls") or []
        ]
        choices.append(
            {
                "text": choice.get("text", message.get("content")),
                "finish_reason": choice.get("finish_reason"),
                "tool_calls": calls,
                "logprob_tokens": logprob_tokens(choice.get("logprobs")),
            }
        )
    return {"choices": choices, "usage": body.get("usage")}


def stream_outcome(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """The same as :func:`whole_outcome`, gathered from a stream's chunks."""
    texts: dict[int, str] = {}
    reasons: dict[int, Any] = {}
    tokens: dict[int, list[str]] = {}
    calls: dict[int, str] = {}
    usage = [chunk["usage"] for chunk in chunks if chunk.get("usage")]
    for chunk in chunks:
        for choice in chunk.get("choices") or []:
            index = choice["index"]
            delta = choice.get("delta") or {}
            texts[index] = texts.get(index, "") + (choice.get("text") or delta.get("content") or "")
            reasons[index] = choice.get("finish_reason") or reasons.get(index)
            tokens.setdefault(index, []).extend(logprob_tokens(choice.get("logprobs")))
            for call in delta.get("tool_calls") or []:
                function = call.get("function") or {}
                calls[index] = (
                    calls.get(index, "")
                    + (function.get("name") or "")
                    + (function.get("arguments") or "")
                )
    return {
        "texts": texts,
        "finish_reasons": reasons,
        "logprob_tokens": tokens,
        "tool_calls": calls,
        "usage": usage[-1:],
    }


def logprob_tokens(logprobs: Any) -> list[str]:
    if not logprobs:
        return []
    if "content" in logprobs:  # chat
        return [entry["token"] for entry in logprobs["content"] or []]
    return list(logprobs.get("tokens") or [])  # completions


def compared(name: str, ours: Answer, theirs: Answer, volatile_names: set[str]) -> list[str]:
    """Where our answer differs from vLLM's (keys named in ``volatile_names`` aside)."""
    volatile = {k for k in ours.keys | theirs.keys if k.rsplit(".", 1)[-1] in volatile_names}
    checks = {
        "status": (ours.status, theirs.status),
        "error type": (ours.error_type, theirs.error_type),
        "keys": (sorted(ours.keys - volatile), sorted(theirs.keys - volatile)),
        "outcome": (ours.outcome, theirs.outcome),
    }
    differences = [
        f"{name}: {what}: ours {mine!r} vs vLLM {raw!r}"
        for what, (mine, raw) in checks.items()
        if mine != raw
    ]
    if name.startswith("bad-") and ours.status >= 500:
        differences.append(f"{name}: a client error answered {ours.status}")
    return differences


def test_the_table_is_big_enough() -> None:
    bad = [case for case in CASES if case.name.startswith("bad-")]
    assert len(CASES) >= 40 and len(bad) >= 10
    assert len({case.name for case in CASES}) == len(CASES)


def test_v1_answers_as_raw_vllm_does(stack: Stack, raw_vllm: str, tmp_path: Path) -> None:
    differences = []
    # Each case goes to both servers at once (each has its own engine; one request at a
    # time on each, so no batching changes an answer): ~100 s one after the other.
    took: dict[str, float] = {}
    with ThreadPoolExecutor(1) as pool:
        answers = []
        for case in CASES:
            started = time.monotonic()
            theirs_pending = pool.submit(send, raw_vllm, case)
            answers.append((send(stack.base_url, case), theirs_pending.result()))
            took[case.name] = time.monotonic() - started
    slowest = sorted(took.items(), key=lambda item: -item[1])[:8]
    print(f"\n[differential] {sum(took.values()):.1f} s; slowest: {slowest}")
    for case, (ours, theirs) in zip(CASES, answers, strict=True):
        if case.name in OPENAI_BODY_WHERE_VLLM_HAS_NONE:
            if ours.status != theirs.status or ours.keys != ERROR_KEYS:
                differences.append(f"{case.name}: ours {ours!r} vs vLLM {theirs!r}")
            continue
        differences += compared(case.name, ours, theirs, VOLATILE)
    (tmp_path / "differences.txt").write_text("\n".join(differences))
    assert not differences, "\n".join(differences)


# /v1/responses ------------------------------------------------------------------------

#: Response keys whose values differ between any two servers (ids, clocks).
RESPONSE_VOLATILE = {"id", "created_at", "completed_at", "item_id", "call_id", "response_id"}
RESPONSE_WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": WEATHER_PARAMS,
    "strict": True,
}
R = {"model": MODEL, "temperature": 0, "max_output_tokens": 12}

#: Stateless requests, sent to both servers as they are (``store`` off: nothing kept).
RESPONSE_CASES: dict[str, dict[str, Any]] = {
    "text": {**R, "input": "Say hello to Bob.", "store": False},
    "messages-instructions": {
        **R,
        "input": [{"role": "user", "content": "Name a colour."}],
        "instructions": "Answer in one word.",
        "store": False,
    },
    "stream": {**R, "input": "Say hello to Bob.", "stream": True, "store": False},
    "json-schema": {
        **R,
        "input": "Make up a person.",
        "text": {"format": {"type": "json_schema", "name": "person", "schema": SCHEMA}},
        "store": False,
    },
    "tool-required": {
        **R,
        "max_output_tokens": 40,
        "input": "What is the weather in Paris?",
        "tools": [RESPONSE_WEATHER_TOOL],
        "tool_choice": "required",
        "store": False,
    },
    "bad-over-context": {**R, "input": "hi", "max_output_tokens": 100_000, "store": False},
    "bad-input-type": {**R, "input": 5, "store": False},
    "bad-unknown-previous": {**R, "input": "hi", "previous_response_id": "resp_unknown"},
}


def response_outcome(base_url: str, body: dict[str, Any]) -> tuple[Answer, dict[str, Any]]:
    """A ``/v1/responses`` answer reduced to what must match, and its JSON (whole answers)."""
    response = requests.post(f"{base_url}/v1/responses", json=body, timeout=300)
    if body.get("stream"):
        events = [
            json.loads(line[6:])
            for line in response.text.splitlines()
            if line.startswith("data: {")
        ]
        final = events[-1].get("response") or {} if events else {}
        types = [event.get("type") for event in events]
        outcome = {
            # How many deltas carry the text is timing (vLLM's output batches), not shape.
            "event_types": [t for i, t in enumerate(types) if i == 0 or t != types[i - 1]],
            "deltas": "".join(e.get("delta", "") for e in events if "text.delta" in e["type"]),
            "final": final_outcome(final),
        }
        keys = key_paths(final)
        return Answer(response.status_code, None, keys, outcome), final
    answer = response.json()
    error = answer.get("error") if isinstance(answer, dict) else None
    if response.status_code >= 400 and isinstance(error, dict):
        return Answer(response.status_code, error.get("type"), key_paths(answer), {}), answer
    return Answer(response.status_code, None, key_paths(answer), final_outcome(answer)), answer


def final_outcome(response: dict[str, Any]) -> dict[str, Any]:
    """Status, output items (texts, function calls) and usage of one response."""
    output = []
    for item in response.get("output") or []:
        if item.get("type") == "message":
            texts = [part.get("text") for part in item.get("content") or []]
            output.append(("message", item.get("status"), texts))
        elif item.get("type") == "function_call":
            output.append(("function_call", item.get("name"), item.get("arguments")))
        else:
            output.append((item.get("type"),))
    return {
        "status": response.get("status"),
        "incomplete_details": response.get("incomplete_details"),
        "output": output,
        "usage": response.get("usage"),
    }


def test_v1_responses_answer_as_raw_vllm_does(stack: Stack, raw_vllm: str) -> None:
    """Stateless requests and a one-step ``previous_response_id`` chain, at temperature 0.

    Raw vLLM runs with its in-process response store on
    (``VLLM_ENABLE_RESPONSES_API_STORE=1``, ``tests/conftest.py``); we keep responses in
    Redis and expand the chain ourselves: the follow-up's prompt, and so its text and
    token counts, must be the same.
    """
    # A prefix neither engine has cached (as for /v1 above): cached token counts match, and
    # on CPUs with AMX a cached prefix's bf16 answer can differ from a fresh one. The chain's
    # two turns share one, so the follow-up finds its first turn cached on both servers.
    cases = {
        name: body if name.startswith("bad-") else {**body, "cache_salt": uuid.uuid4().hex}
        for name, body in RESPONSE_CASES.items()
    }
    chain_salt = uuid.uuid4().hex
    differences: list[str] = []
    answers: dict[str, tuple[Answer, Answer]] = {}
    started = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        for name, body in cases.items():
            theirs = pool.submit(response_outcome, raw_vllm, body)
            answers[name] = (response_outcome(stack.base_url, body)[0], theirs.result()[0])
        # One step of a chain: each server continues its own stored first response.
        first = {
            **R,
            "input": "My name is Ada. Say hello.",
            "store": True,
            "cache_salt": chain_salt,
        }
        theirs_first = pool.submit(response_outcome, raw_vllm, first)
        ours_first = response_outcome(stack.base_url, first)
        answers["chain-first"] = (ours_first[0], theirs_first.result()[0])
        follow = {**R, "input": "What is my name?", "cache_salt": chain_salt}
        theirs_next = pool.submit(
            response_outcome,
            raw_vllm,
            {**follow, "previous_response_id": theirs_first.result()[1]["id"]},
        )
        ours_next = response_outcome(
            stack.base_url, {**follow, "previous_response_id": ours_first[1]["id"]}
        )
        answers["chain-next"] = (ours_next[0], theirs_next.result()[0])
    print(f"\n[responses differential] {time.monotonic() - started:.1f} s")
    for name, (ours, theirs) in answers.items():
        differences += compared(name, ours, theirs, RESPONSE_VOLATILE)
    chain = answers["chain-next"][0].outcome["usage"]
    assert chain["input_tokens"] > answers["chain-first"][0].outcome["usage"]["input_tokens"]
    assert not differences, "\n".join(differences)
