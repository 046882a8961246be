"""A continuation in one engine replica's code: the rest of an answer, after given tokens.

:class:`~cloudllm_serve.engine.server.EngineServer` runs in this process on the simulated
engine (vLLM's renderer, serving layer and output processing are real). A resumable
request reports its token ids; the same request sent again with the first few of them as
``resume_token_ids`` generates exactly the rest: on ``/generate`` (streamed and not) and
``/v1`` (chat and completions, streamed and not), with the usage of the whole answer.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from cloudllm_serve.engine.protocol import (
    GenerationChunk,
    GenerationRequest,
    OpenAIAnswer,
    OpenAICall,
    OpenAIProgress,
    OpenAIReplicaItem,
    OpenAIStreamEnd,
    SamplingOptions,
)
from cloudllm_serve.engine.server import EngineServer
from tests.sim.test_simulator_core import start

MAX_TOKENS = 12
CUT = 5
CREATED = 1_234_567


@pytest.fixture
def sim_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "LLM_MODEL": "sim",
        "ENGINE_DEVICE": "cpu",
        "VLLM_BLOCK_SIZE": "32",
        "METRICS_ENABLED": "false",
        "STREAM_BATCH_INTERVAL_MS": "0",
        "SIM_TTFT_MS": "5",
        "SIM_STEP_MS": "5",
    }.items():
        monkeypatch.setenv(name, value)


def generation(stream: bool, resume: tuple[int, ...] = ()) -> GenerationRequest:
    return GenerationRequest(
        request_id="gen-1",
        sampling=SamplingOptions(max_tokens=MAX_TOKENS),
        messages=[{"role": "user", "content": "Tell me a story."}],
        stream=stream,
        resumable=True,
        resume_token_ids=resume,
    )


async def chunks_of(server: EngineServer, request: GenerationRequest) -> list[GenerationChunk]:
    return [chunk async for batch in server.generate(request) for chunk in batch]


def ids_and_text(chunks: list[GenerationChunk]) -> tuple[list[int], list[str]]:
    """Every token id, and the text of each chunk (one token each here)."""
    ids = [i for c in chunks for choice in c.choices for i in choice.token_ids]
    return ids, [choice.text for c in chunks for choice in c.choices]


def openai(kind: str, body: dict[str, Any], **resume: Any) -> OpenAICall:
    return OpenAICall(
        kind=kind,  # type: ignore[arg-type]
        body={"max_tokens": MAX_TOKENS, **body},
        request_id="v1-1",
        resumable=True,
        **resume,
    )


async def items_of(server: EngineServer, call: OpenAICall) -> list[OpenAIReplicaItem]:
    return [item async for batch in server.openai(call) for item in batch]


def events(items: list[OpenAIReplicaItem]) -> list[dict[str, Any]]:
    return [json.loads(i[6:]) for i in items if isinstance(i, str) and i.startswith("data: {")]


def progress_ids(items: list[OpenAIReplicaItem]) -> list[int]:
    return [i for item in items if isinstance(item, OpenAIProgress) for i in item.token_ids]


def cut(items: list[OpenAIReplicaItem]) -> tuple[tuple[int, ...], str]:
    """The ids and text of the first progress items holding at least CUT tokens."""
    ids: list[int] = []
    text = ""
    for item in items:
        if isinstance(item, OpenAIProgress) and len(ids) < CUT:
            ids += item.token_ids
            text += item.text
    return tuple(ids), text


def chat_text(items: list[OpenAIReplicaItem]) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or "" for e in events(items) if e["choices"]
    )


def completion_text(items: list[OpenAIReplicaItem]) -> str:
    return "".join(e["choices"][0]["text"] for e in events(items) if e["choices"])


@pytest.mark.usefixtures("sim_env")
def test_a_continuation_generates_exactly_the_rest() -> None:
    chat = {"messages": [{"role": "user", "content": "Hi"}], "stream": True}
    text = {"prompt": "Once upon a time", "stream": True}

    async def scenario() -> dict[str, Any]:
        server = await start()
        got: dict[str, Any] = {}
        try:
            got["gen"] = await chunks_of(server, generation(stream=True))
            ids, _ = ids_and_text(got["gen"])
            got["gen_rest"] = await chunks_of(server, generation(True, tuple(ids[:CUT])))
            got["gen_whole_rest"] = await chunks_of(server, generation(False, tuple(ids[:CUT])))
            got["chat"] = await items_of(server, openai("chat", chat))
            with_usage = {**chat, "stream_options": {"include_usage": True}}
            resume = {"resume_token_ids": cut(got["chat"])[0], "resume_created": CREATED}
            got["chat_rest"] = await items_of(server, openai("chat", with_usage, **resume))
            got["text"] = await items_of(server, openai("completion", text))
            whole = openai(
                "completion", {"prompt": text["prompt"]}, resume_token_ids=cut(got["text"])[0]
            )
            got["text_rest"] = await items_of(server, whole)
        finally:
            server._backend.shutdown()
        return got

    got = asyncio.run(scenario())

    # /generate: every chunk carries its ids; the continuation is the rest, streamed or not.
    ids, texts = ids_and_text(got["gen"])
    assert len(ids) == MAX_TOKENS
    for rest in (got["gen_rest"], got["gen_whole_rest"]):
        rest_ids, rest_texts = ids_and_text(rest)
        assert ids[:CUT] + rest_ids == ids
        assert "".join(texts[:CUT]) + "".join(rest_texts) == "".join(texts)
        assert rest[-1].finished and rest[-1].prompt_tokens == got["gen"][-1].prompt_tokens

    # /v1 chat stream: each progress item comes right before the string holding its text,
    # the opening role chunk holds none.
    first = got["chat"]
    for index, item in enumerate(first):
        if isinstance(item, OpenAIProgress):
            following = first[index + 1]
            assert isinstance(following, str)
            assert json.loads(following[6:])["choices"][0]["delta"]["content"] == item.text
    assert len(progress_ids(first)) == MAX_TOKENS
    first_events = events(first)
    assert first_events[0]["choices"][0]["delta"]["role"] == "assistant"

    # Its continuation: no role chunk, the first stream's id and "created", the rest of
    # the text and of the ids, and the usage of the whole answer.
    rest = got["chat_rest"]
    rest_events = events(rest)
    assert all("role" not in e["choices"][0]["delta"] for e in rest_events if e["choices"])
    assert {e["id"] for e in rest_events} == {first_events[0]["id"]}
    assert {e["created"] for e in rest_events} == {CREATED}
    cut_ids, cut_text = cut(first)
    assert cut_text + chat_text(rest) == chat_text(first)
    assert list(cut_ids) + progress_ids(rest) == progress_ids(first)
    (end,) = [i for i in rest if isinstance(i, OpenAIStreamEnd)]
    (first_end,) = [i for i in first if isinstance(i, OpenAIStreamEnd)]
    assert end.usage is not None and first_end.usage is not None
    assert end.usage == first_end.usage
    assert [e["usage"] for e in rest_events if not e["choices"]] == [first_end.usage]

    # /v1 text completion, not streamed: the rest of the streamed text, the whole usage.
    (answer,) = [i for i in got["text_rest"] if isinstance(i, OpenAIAnswer)]
    assert answer.status == 200, answer.body
    assert cut(got["text"])[1] + answer.body["choices"][0]["text"] == completion_text(got["text"])
    assert answer.body["usage"]["completion_tokens"] == MAX_TOKENS
