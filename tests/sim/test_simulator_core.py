"""The simulated engine's time model, batch limit and crash, in one engine replica's code.

Each test starts :class:`~cloudllm_serve.engine.server.EngineServer` in this process on
the simulated engine (a few seconds: vLLM's renderer, tokenizer and serving layer are
real) with times large enough to tell apart on a slow machine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cloudllm_serve.engine.protocol import (
    EngineDeadError,
    GenerationChunk,
    GenerationRequest,
    SamplingOptions,
)
from cloudllm_serve.engine.server import EngineServer
from cloudllm_serve.settings import load_settings


@pytest.fixture
def sim_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name, value in {
        "LLM_MODEL": "sim",
        "ENGINE_DEVICE": "cpu",
        "VLLM_BLOCK_SIZE": "32",
        "METRICS_ENABLED": "false",
        "STREAM_BATCH_INTERVAL_MS": "0",
    }.items():
        monkeypatch.setenv(name, value)
    yield


async def start(**settings: Any) -> EngineServer:
    server = EngineServer.__new__(EngineServer)
    await server.__init__(load_settings(settings))  # type: ignore[misc]
    return server


def request(
    text: str, max_tokens: int, request_id: str, cache_salt: str | None = None
) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id,
        sampling=SamplingOptions(max_tokens=max_tokens),
        messages=[{"role": "user", "content": text}],
        cache_salt=cache_salt,
    )


async def run(server: EngineServer, req: GenerationRequest) -> tuple[float, list[GenerationChunk]]:
    """Seconds to the first token, and every chunk."""
    started = time.perf_counter()
    first: float | None = None
    chunks: list[GenerationChunk] = []
    async for batch in server.generate(req):
        for chunk in batch:
            if first is None and chunk.choices:
                first = time.perf_counter() - started
            chunks.append(chunk)
    assert first is not None
    return first, chunks


@pytest.mark.usefixtures("sim_env")
def test_time_to_first_token_follows_uncached_prompt_tokens() -> None:
    """200 ms + 5 ms per uncached token: a repeated long prompt is served from the cache.

    Only under the same ``cache_salt`` (a tenant's): the salt goes through vLLM's input
    processing into the engine core's request, as on vLLM.
    """
    long_text = " ".join(f"word{i}" for i in range(120))

    async def scenario() -> tuple[float, float, float, list[GenerationChunk], Any, Any]:
        server = await start(
            SIM_TTFT_MS=200, SIM_TTFT_MS_PER_TOKEN=5, SIM_STEP_MS=10, SIM_STEP_MS_PER_SEQ=0
        )
        cold, chunks = await run(server, request(long_text, 8, "cold", "tenant-a"))
        warm, _ = await run(server, request(long_text, 8, "warm", "tenant-a"))
        stats = await server.record_routing_stats()
        other, _ = await run(server, request(long_text, 8, "other", "tenant-b"))
        after = await server.record_routing_stats()
        server._backend.shutdown()
        return cold, warm, other, chunks, stats, after

    cold, warm, other, chunks, stats, after = asyncio.run(scenario())
    prompt_tokens = chunks[-1].prompt_tokens
    assert prompt_tokens > 200  # ~1 s of simulated prefill when nothing is cached
    assert cold >= (200 + 5 * prompt_tokens) / 1000 * 0.95
    # All but the last partial block was cached: at most 32 uncached tokens, 360 ms.
    assert warm < cold - 0.5, (cold, warm)
    assert stats["prefix_cache_hits"] >= prompt_tokens - 32
    # Another salt: nothing cached, as slow as the first.
    assert after["prefix_cache_hits"] == stats["prefix_cache_hits"]
    assert other > warm + 0.5, (warm, other)
    assert sum(c.choices[0].token_count for c in chunks if c.choices) == 8
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.usefixtures("sim_env")
def test_at_most_max_num_seqs_run_the_rest_wait() -> None:
    async def scenario() -> tuple[dict[str, Any], list[float]]:
        server = await start(VLLM_MAX_NUM_SEQS=2, SIM_TTFT_MS=10, SIM_STEP_MS=50)
        tasks = [
            asyncio.create_task(run(server, request(f"hello {i}", 10, f"r{i}"))) for i in range(4)
        ]
        await asyncio.sleep(0.3)
        stats = await server.record_routing_stats()
        done = await asyncio.gather(*tasks)
        server._backend.shutdown()
        return stats, sorted(first for first, _ in done)

    stats, firsts = asyncio.run(scenario())
    assert stats["running_requests"] == 2 and stats["pending_requests"] == 2
    # The two that waited got their first token after the first two's 10 steps of 50 ms.
    assert firsts[2] > firsts[1] + 0.3


@pytest.mark.usefixtures("sim_env")
def test_the_engine_dies_after_its_tokens_as_vllms_does() -> None:
    async def scenario() -> tuple[list[GenerationChunk], BaseException | None, bool, Any]:
        server = await start(SIM_CRASH_AFTER_TOKENS=5, SIM_TTFT_MS=5, SIM_STEP_MS=5)
        chunks: list[GenerationChunk] = []
        died: BaseException | None = None
        try:
            async for batch in server.generate(request("hello", 20, "doomed")):
                chunks += batch
        except EngineDeadError as error:
            died = error
        refused: type[BaseException] | None = None
        try:
            await run(server, request("again", 5, "next"))
        except EngineDeadError as error:
            refused = type(error)
        health_failed = False
        try:
            await server.check_health()
        except Exception:
            health_failed = True
        return chunks, died, health_failed, refused

    chunks, died, health_failed, refused = asyncio.run(scenario())
    # Midway, the replica raises EngineDeadError (not an error chunk), so that the ingress
    # can continue the request elsewhere; it names the crash.
    assert isinstance(died, EngineDeadError) and "engine died" in str(died), died
    assert all(c.error is None for c in chunks)
    # It died at 5 tokens (the last may be lost with the engine, as with vLLM's).
    assert 1 <= sum(c.choices[0].token_count for c in chunks if c.choices) <= 5
    # Serve's health check fails (the replica is replaced), and a new request is refused
    # as dead so that the ingress tries it on another replica.
    assert health_failed and refused is EngineDeadError
