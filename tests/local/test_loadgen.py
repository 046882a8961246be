"""The ceiling benchmark's load generator and /proc CPU accounting, on a local SSE server.

No Ray, no vLLM: a small aiohttp server in a thread streams chat-completion-shaped
events (a role chunk, content chunks of which some are split across writes and some
share one, a usage chunk, ``data: [DONE]``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import socket
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from benchmarks import loadgen
from benchmarks.proc_cpu import (
    ProcCpu,
    classify,
    cpu_delta,
    cpu_snapshot,
    descendants,
    simulator_cpu_s,
)

#: Content events per answer.
TOKENS = 12
#: The server waits this long before its first event.
FIRST_DELAY_S = 0.05
#: ... and this long between writes.
GAP_S = 0.002
CONCURRENCY = 8


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    return event(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "sim",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
    )


@dataclass
class ServerState:
    bodies: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    peak: int = 0
    #: Answers wait (up to a few seconds) until this many requests are in flight.
    hold_until: int = CONCURRENCY
    full: asyncio.Event = field(default_factory=asyncio.Event)


class SseServer:
    """An OpenAI-shaped streaming server in a thread of its own; behaviour by model name.

    ``sim``: the answer described above; ``fail-503``: HTTP 503; ``no-usage``: no usage
    event; ``no-done``: the stream stops before ``[DONE]``; ``error-event``: an error
    event midway.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.state = ServerState()
        self.runner: web.AppRunner | None = None
        self.url = ""

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    def reset(self, hold_until: int = CONCURRENCY) -> ServerState:
        async def fresh() -> ServerState:
            return ServerState(hold_until=hold_until)

        self.state = asyncio.run_coroutine_threadsafe(fresh(), self.loop).result(30)
        return self.state

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        state = self.state
        state.bodies.append(body)
        model = body["model"]
        if model == "fail-503":
            return web.Response(status=503, text="overloaded")
        state.in_flight += 1
        state.peak = max(state.peak, state.in_flight)
        try:
            if state.in_flight >= state.hold_until:
                state.full.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.full.wait(), 5.0)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await asyncio.sleep(FIRST_DELAY_S)
            await response.write(chunk({"role": "assistant", "content": ""}))
            await self._content(response, model)
            if model == "no-done":
                return response
            if model != "no-usage":
                usage = {"prompt_tokens": 9, "completion_tokens": TOKENS, "total_tokens": 21}
                await response.write(
                    event({"id": "chatcmpl-1", "choices": [], "usage": usage, "model": "sim"})
                )
            await response.write(b"data: [DONE]\n\n")
            return response
        finally:
            state.in_flight -= 1

    async def _content(self, response: web.StreamResponse, model: str) -> None:
        k = 0
        while k < TOKENS:
            await asyncio.sleep(GAP_S)
            one = chunk({"content": f" t{k}"}, "length" if k == TOKENS - 1 else None)
            if model == "error-event" and k == TOKENS // 2:
                await response.write(
                    event({"error": {"message": "engine died", "type": "InternalServerError"}})
                )
                return
            if k % 4 == 1:  # split inside the marker, the halves written apart
                cut = one.index(b'"content"') + 3
                await response.write(one[:cut])
                await asyncio.sleep(GAP_S)
                await response.write(one[cut:])
            elif k % 4 == 2 and k + 1 < TOKENS:  # two events in one write
                k += 1
                await response.write(one + chunk({"content": f" t{k}"}))
            else:
                await response.write(one)
            k += 1


@pytest.fixture(scope="module")
def server() -> Iterator[SseServer]:
    running = SseServer()
    running.start()
    try:
        yield running
    finally:
        running.stop()


def test_counts_tokens_ttft_and_itl(server: SseServer) -> None:
    state = server.reset()
    requests = 24
    summary = loadgen.run_load(
        server.url, "sim", CONCURRENCY, requests, max_tokens=16, prompt_words=10, raw=True
    )
    assert summary["errors"] == 0, summary["error_examples"]
    assert summary["ok"] == summary["requests"] == requests
    assert summary["output_tokens"] == requests * TOKENS
    assert summary["tokens_per_s"] > 0
    # No more than the concurrency in flight, and all of it (answers wait for it).
    assert state.peak == CONCURRENCY
    assert summary["ttft_ms"]["p50"] > FIRST_DELAY_S * 1000
    assert summary["itl_ms"]["mean"] >= 0
    raw = summary["raw"]
    assert [r["index"] for r in raw] == list(range(requests))
    for r in raw:
        assert r["events"] == TOKENS
        assert len(r["itl_ms"]) == TOKENS - 1
        assert r["ttft_ms"] > FIRST_DELAY_S * 1000
        assert r["end"] > r["start"]
    assert summary["duration_s"] >= max(r["end"] for r in raw) - min(r["start"] for r in raw) - 1e-3
    assert summary["chunks_per_request"] >= 3
    assert summary["events_per_chunk"] >= 1

    # What was sent: plain OpenAI fields, a distinct prompt per request.
    body = state.bodies[0]
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 16
    assert "ignore_eos" not in body
    prompts = {b["messages"][0]["content"] for b in state.bodies}
    assert len(prompts) == requests
    assert all(len(p.split()) == 10 for p in prompts)


def test_http_errors_are_counted(server: SseServer) -> None:
    server.reset(hold_until=1)
    summary = loadgen.run_load(server.url, "fail-503", CONCURRENCY, 10)
    assert summary["ok"] == 0
    assert summary["errors"] == 10
    assert summary["output_tokens"] == 0
    assert summary["ttft_ms"] == {"p50": None, "p99": None, "mean": None}
    assert summary["error_examples"] == ["HTTP 503: overloaded"]


@pytest.mark.parametrize(
    ("model", "error"),
    [
        ("no-done", "stream ended without data: [DONE]"),
        ("error-event", "error event: engine died"),
    ],
)
def test_broken_streams_are_errors(server: SseServer, model: str, error: str) -> None:
    server.reset(hold_until=1)
    summary = loadgen.run_load(server.url, model, 4, 4)
    assert summary["errors"] == 4
    assert summary["error_examples"] == [error]


def test_tokens_fall_back_to_content_events(server: SseServer) -> None:
    server.reset(hold_until=1)
    summary = loadgen.run_load(server.url, "no-usage", 4, 4)
    assert summary["errors"] == 0
    assert summary["output_tokens"] == 4 * TOKENS


def test_refused_connections_are_errors() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    summary = loadgen.run_load(f"http://127.0.0.1:{port}", "sim", 2, 3, timeout_s=10)
    assert summary["errors"] == 3
    assert summary["error_examples"]


def test_processes_split_the_load_and_merge(server: SseServer) -> None:
    state = server.reset(hold_until=1)
    summary = loadgen.run_load(
        server.url, "sim", CONCURRENCY, 16, processes=2, warmup=2, raw=True, timeout_s=60
    )
    assert summary["processes"] == 2
    assert summary["errors"] == 0, summary["error_examples"]
    assert summary["output_tokens"] == 16 * TOKENS
    assert sorted(r["index"] for r in summary["raw"]) == list(range(16))
    assert sum(len(r["itl_ms"]) for r in summary["raw"]) == 16 * (TOKENS - 1)
    prompts = [b["messages"][0]["content"] for b in state.bodies]
    assert len(prompts) == 18 and len(set(prompts)) == 18  # warm-up ones included


def test_command_line_writes_json(server: SseServer, tmp_path: Path) -> None:
    server.reset(hold_until=1)
    out = tmp_path / "result.json"
    argv = ["--url", server.url, "--model", "sim", "--concurrency", "2", "--requests", "4"]
    assert loadgen.main([*argv, "--max-tokens", "8", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["ok"] == 4
    assert result["concurrency"] == 2
    assert "raw" not in result
    for key in ("duration_s", "tokens_per_s", "chunks_per_request", "events_per_chunk"):
        assert result[key] > 0
    assert set(result["itl_ms"]) == {"p50", "p99", "mean"}


def test_stream_scan_handles_split_events() -> None:
    role = chunk({"role": "assistant", "content": ""})
    tokens = [chunk({"content": f"w{k}"}) for k in range(3)]
    usage = event({"choices": [], "usage": {"completion_tokens": 7}})
    body = role + b"".join(tokens) + usage + b"data: [DONE]\n\n"
    scan = loadgen.StreamScan()
    cut_in_marker = len(role) + tokens[0].index(b'"content"') + 3
    pieces = [body[:cut_in_marker], body[cut_in_marker : len(role) + len(tokens[0]) + 5]]
    pieces.append(body[sum(map(len, pieces)) :])
    for at, piece in enumerate(pieces):
        scan.feed(piece, float(at))
    scan.finish(9.0)
    # The first token counts when its end arrives (piece 1), the other two in piece 2.
    assert (scan.times, scan.events) == ([1.0, 2.0], [1, 2])
    assert scan.done
    assert loadgen._usage_tokens(scan.usage_event) == 7
    assert scan.reads == 3

    crlf = loadgen.StreamScan()
    crlf.feed(tokens[0].replace(b"\n\n", b"\r\n\r\n"), 0.0)
    crlf.feed(b"data: [DONE]", 1.0)  # no blank line after the last event
    crlf.finish(2.0)
    assert (crlf.times, crlf.events, crlf.done) == ([0.0], [1], True)


def test_itl_samples_from_chunks() -> None:
    result = loadgen.RequestResult(index=0, start=0.0, end=1.0, sent=10.0)
    result.chunk_times = array("d", [10.5, 10.6, 10.9])
    result.chunk_events = array("q", [2, 1, 3])
    assert result.ttft_s == pytest.approx(0.5)
    assert result.events == result.tokens == 6
    assert result.itl_s() == pytest.approx([0.0, 0.1, 0.3, 0.0, 0.0])
    empty = loadgen.RequestResult(index=1, start=0.0, end=1.0)
    assert empty.ttft_s is None
    assert empty.itl_s().size == 0


def test_split_and_prompts() -> None:
    assert loadgen.split(10, 3) == [4, 3, 3]
    assert loadgen.split(2, 4) == [1, 1, 0, 0]
    assert loadgen.prompt(3, 5) != loadgen.prompt(4, 5)
    assert len(loadgen.prompt(3, 5).split()) == 5
    assert loadgen.chat_url("http://h:1/") == "http://h:1/v1/chat/completions"
    assert loadgen.chat_url("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"


# /proc CPU accounting ------------------------------------------------------------------

PR_SET_NAME = 15


def test_cpu_delta_attributes_cpu_to_the_thread_name() -> None:
    name = "loadgen-test-burner"  # Linux keeps 15 characters
    me = os.getpid()
    before = cpu_snapshot([me])
    burned, release = threading.Event(), threading.Event()

    def burn() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.prctl(PR_SET_NAME, name.encode(), 0, 0, 0) == 0
        start = time.thread_time()
        while time.thread_time() - start < 0.2:
            pass
        burned.set()
        release.wait(60)

    thread = threading.Thread(target=burn, name=name)
    thread.start()
    try:
        assert burned.wait(120)
        after = cpu_snapshot([me])
    finally:
        release.set()
        thread.join()
    delta = cpu_delta(before, after)[me]
    assert delta.threads_cpu_s[name[:15]] >= 0.15
    assert delta.cpu_s >= 0.15
    assert delta.name == after[me].name
    assert "pytest" in delta.cmdline or "python" in delta.cmdline


def test_cpu_delta_drops_gone_and_counts_new_processes() -> None:
    def proc(pid: int, cpu: float, start: int = 1, threads: float = 0.0) -> ProcCpu:
        return ProcCpu(
            pid, "p", "p", cpu, {"sim-step-loop": threads}, start, {pid: ("sim-step-loop", threads)}
        )

    before = {1: proc(1, 5.0, threads=1.0), 2: proc(2, 3.0), 3: proc(3, 9.0, start=1)}
    after = {1: proc(1, 7.5, threads=1.5), 3: proc(3, 0.5, start=2), 4: proc(4, 1.0)}
    delta = cpu_delta(before, after)
    assert sorted(delta) == [1, 3, 4]
    assert delta[1].cpu_s == pytest.approx(2.5)
    assert simulator_cpu_s(delta[1]) == pytest.approx(0.5)
    assert delta[3].cpu_s == pytest.approx(0.5)  # a reused pid: a new process
    assert delta[4].cpu_s == pytest.approx(1.0)
    assert simulator_cpu_s(ProcCpu(5, "p", "p", 1.0)) == 0.0


def test_descendants_include_children() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        found = descendants(os.getpid())
        assert found[0] == os.getpid()
        assert child.pid in found
        snapshot = cpu_snapshot(found)
        assert child.pid in snapshot
        assert os.getpid() in snapshot
        assert cpu_snapshot([2**22 + 7]) == {}  # no such process
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize(
    ("cmdline", "name", "role"),
    [
        ("ray::ProxyActor", "ray::ProxyActor", "proxy"),
        ("ray::ServeController", "ray::ServeContr", "controller"),
        ("ray::ServeReplica:cloudllm:Ingress", "ray::ServeRepli", "ingress"),
        ("ray::ServeReplica:cloudllm:EngineServer", "ray::ServeRepli", "engine"),
        ("ray::ServeReplica:cloudllm:EngineServer.initialize", "ray::ServeRepli", "engine"),
        ("ray::ServeReplica:default:LLMServer:sim", "ray::ServeRepli", "engine"),
        ("ray::ServeReplica:default:OpenAiIngress", "ray::ServeRepli", "ingress"),
        ("ray::ServeReplica:default:LLMRouter", "ray::ServeRepli", "ingress"),
        ("VLLM::EngineCore", "VLLM::EngineCor", "engine"),
        ("/x/ray/core/src/ray/gcs/gcs_server --log_dir=/tmp", "gcs_server", "ray-daemon"),
        ("/x/ray/core/src/ray/raylet/raylet --raylet_socket_name=x", "raylet", "ray-daemon"),
        ("/x/bin/python /x/ray/dashboard/dashboard.py --host=127.0.0.1", "python", "ray-daemon"),
        ("ray::DashboardAgent", "ray::DashboardA", "ray-daemon"),
        ("ray::IDLE", "ray::IDLE", "ray-daemon"),
        ("ray::TelemetryAgent", "ray::TelemetryA", "ray-daemon"),
        ("/usr/bin/redis-server 127.0.0.1:6379", "redis-server", "other"),
        ("python -m benchmarks.loadgen --model sim --url http://x/Ingress", "python", "other"),
        ("", "kworker/0:1", "other"),
    ],
)
def test_classify(cmdline: str, name: str, role: str) -> None:
    assert classify(ProcCpu(1, name, cmdline, 0.0)) == role
