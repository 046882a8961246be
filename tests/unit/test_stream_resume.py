"""The continuation's bookkeeping and rewriting, without an engine.

Ingress side (:mod:`cloudllm_serve.ingress.stream_resume`): which requests can resume,
what counts as sent, and a whole answer joined. Engine side
(:mod:`cloudllm_serve.engine.resume`): a continued stream's chunks rewritten to follow on
from the first stream's, its usage the whole answer's, its prompt the ids appended.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from cloudllm_serve.engine.protocol import (
    GenerationRequest,
    OpenAIAnswer,
    OpenAICall,
    OpenAIProgress,
    OpenAIStreamEnd,
    SamplingOptions,
)
from cloudllm_serve.engine.resume import (
    ContinuedStream,
    ProgressRecorder,
    continued_input,
    continued_usage,
)
from cloudllm_serve.engine.stream_batching import coalesce
from cloudllm_serve.ingress.stream_resume import (
    Continuation,
    generation_blocker,
    openai_blocker,
)


def chunk(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def chat_chunk(content: str | None, created: int = 200, role: bool = False) -> str:
    delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {"content": content}
    return chunk(
        {
            "id": "chatcmpl-x",
            "object": "chat.completion.chunk",
            "created": created,
            "model": "m",
            "choices": [{"index": 0, "delta": delta}],
        }
    )


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({}, None),
        ({"temperature": 0, "seed": 3, "max_tokens": 8, "ignore_eos": True}, None),
        ({"response_format": {"type": "text"}}, None),
        ({"n": 2}, "n > 1"),
        ({"best_of": 3}, "n > 1"),
        ({"response_format": {"type": "json_object"}}, "structured output"),
        ({"structured_outputs": {"json": {}}}, "structured output"),
        ({"presence_penalty": 0.5}, "presence/frequency penalties"),
        ({"repetition_penalty": 1.2}, "a repetition penalty"),
        ({"logprobs": True}, "echo, log probabilities or token ids in the answer"),
        ({"stop": ["\n"]}, "a stop string"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"seed": 3}, "a seed with sampling (temperature not 0)"),
        ({"stream_options": {"continuous_usage_stats": True}}, "usage in every chunk"),
    ],
)
def test_what_a_v1_chat_call_can_resume(body: dict[str, Any], reason: str | None) -> None:
    assert openai_blocker("chat", body) == reason


def test_several_prompts_cannot_resume_one_prompt_of_ids_can() -> None:
    assert openai_blocker("completion", {"prompt": ["a", "b"]}) == "several prompts"
    assert openai_blocker("completion", {"prompt": [1, 2, 3]}) is None
    assert openai_blocker("completion", {"prompt": "a", "echo": True}) is not None


def test_what_a_generation_can_resume() -> None:
    def request(**options: Any) -> GenerationRequest:
        return GenerationRequest("r", SamplingOptions(max_tokens=4, **options))

    assert generation_blocker(request()) is None
    assert generation_blocker(request(temperature=0.7)) is None
    assert generation_blocker(request(json_schema={"type": "object"})) == "structured output"


def test_a_streams_progress_counts_once_the_string_after_it_was_sent() -> None:
    continuation = Continuation(streamed=True)
    first = chat_chunk(None, role=True)
    kept = continuation.openai_batch([first, OpenAIProgress([1], " a"), chat_chunk(" a")])
    assert kept == [first, chat_chunk(" a")] and continuation.token_ids == [1]
    # A batch cut between a progress item and its string: not sent yet.
    assert continuation.openai_batch([OpenAIProgress([2, 3], " b c")]) == []
    assert continuation.token_ids == [1]
    call = continuation.resumed(OpenAICall("chat", {"stream": True}, "r", resumable=True))
    assert call.resume_token_ids == (1,) and call.resume_created == 200
    # The continuation's stream end gets the text from before joined on.
    end = OpenAIStreamEnd(usage=None, message={"role": "assistant", "content": " d"})
    (joined,) = continuation.openai_batch([end])
    assert isinstance(joined, OpenAIStreamEnd) and joined.message is not None
    assert joined.message["content"] == " a d"


def test_a_whole_answers_continuation_is_joined() -> None:
    continuation = Continuation(streamed=False)
    assert continuation.openai_batch([OpenAIProgress([1, 2], "Hello th")]) == []
    assert continuation.started and continuation.token_ids == [1, 2]
    continuation.resumed(OpenAICall("completion", {}, "r", resumable=True))
    body = {"choices": [{"index": 0, "text": "ere."}], "usage": {"completion_tokens": 3}}
    (answer,) = continuation.openai_batch([OpenAIAnswer(200, body)])
    assert isinstance(answer, OpenAIAnswer)
    assert answer.body["choices"][0]["text"] == "Hello there."
    chat = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "ere."}}]}
    (answer,) = continuation.openai_batch([OpenAIAnswer(200, chat)])
    assert isinstance(answer, OpenAIAnswer)
    assert answer.body["choices"][0]["message"]["content"] == "Hello there."


def test_a_continued_stream_drops_its_role_chunk_and_keeps_the_first_created() -> None:
    stream = ContinuedStream(chat=True, resumed=4, created=100)
    assert stream.rewrite(chat_chunk(None, created=200, role=True)) is None
    assert stream.rewrite(chat_chunk(" c", created=200)) == chat_chunk(" c", created=100)
    usage = {"prompt_tokens": 14, "completion_tokens": 3, "total_tokens": 17}
    decoded = {"id": "chatcmpl-x", "created": 200, "choices": [], "usage": usage}
    rewritten = json.loads(stream.usage_chunk(decoded)[6:])
    assert rewritten["created"] == 100
    assert rewritten["usage"] == {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17}
    # A text completion has no role chunk: its first string stays.
    text = ContinuedStream(chat=False, resumed=1, created=None)
    assert text.rewrite(chat_chunk(" x")) == chat_chunk(" x")


def test_a_continuations_usage_and_prompt() -> None:
    usage = {
        "prompt_tokens": 12,
        "completion_tokens": 2,
        "total_tokens": 14,
        "prompt_tokens_details": {"cached_tokens": 12},
    }
    assert continued_usage(usage, 5) == {
        "prompt_tokens": 7,
        "completion_tokens": 7,
        "total_tokens": 14,
        "prompt_tokens_details": {"cached_tokens": 7},
    }
    prompt = {"type": "token", "prompt_token_ids": [1, 2], "prompt": "ab", "cache_salt": "s"}
    assert continued_input(prompt, [3]) == {
        "type": "token",
        "prompt_token_ids": [1, 2, 3],
        "cache_salt": "s",
    }
    with pytest.raises(ValueError):
        continued_input({"type": "embeds", "prompt_embeds": None}, [3])


def test_a_whole_answers_progress_is_what_is_new() -> None:
    recorder = ProgressRecorder()
    ids = [1, 2]
    recorder.add_cumulative(ids, "ab")
    assert recorder.take() == OpenAIProgress([1, 2], "ab")
    ids += [3]  # vLLM extends its list in place
    recorder.add_cumulative(ids, "abc")
    assert recorder.take() == OpenAIProgress([3], "c")
    assert recorder.take() is None


def test_one_per_batch_a_progress_item_leaves_with_the_next_item() -> None:
    async def items() -> AsyncIterator[object]:
        for item in ("role", OpenAIProgress([1], "a"), "a", OpenAIProgress([2], "b"), "b"):
            yield item

    async def batches() -> list[list[object]]:
        attached = lambda item: isinstance(item, OpenAIProgress)  # noqa: E731
        return [b async for b in coalesce(items(), 0, 64, attached=attached)]

    assert asyncio.run(batches()) == [
        ["role"],
        [OpenAIProgress([1], "a"), "a"],
        [OpenAIProgress([2], "b"), "b"],
    ]
