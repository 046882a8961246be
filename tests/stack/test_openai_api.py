"""The OpenAI-compatible API, streaming and cancellation on the real stack (vLLM on SmolLM2)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from cloudllm_serve.local_models import default_model_dir
from tests.conftest import Stack
from tests.support import wait_for

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def busy(stack: Stack) -> int:
    stats = requests.get(f"{stack.base_url}/health", timeout=30).json()["vllm_stats"]
    return int(stats["running_requests"] + stats["pending_requests"])


def wait_idle(stack: Stack, timeout_s: float) -> float:
    started = time.monotonic()
    while busy(stack) > 0:
        assert time.monotonic() - started < timeout_s, "engine still busy"
        time.sleep(0.05)
    return time.monotonic() - started


def test_openai_sdk_script(stack: Stack) -> None:
    """The SDK script (sync + async clients) passes every check against the stack."""
    result = subprocess.run(
        [sys.executable, str(HERE / "openai_sdk_script.py"), "--base-url", stack.base_url],
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    checks = [line.split(":")[0] for line in result.stdout.splitlines() if line.startswith("ok ")]
    assert checks == [
        "ok models.list",
        "ok chat",
        "ok chat stream",
        "ok completions",
        "ok completions stream",
        "ok json_schema",
        "ok stop sequence",
        "ok unknown model",
        "ok temperature=-3",
        "ok named tool_choice",
        "ok tool message in a stored conversation",
        "ok 8 concurrent async streams",
    ]


#: The two ``vllm bench serve`` runs (backend, endpoint).
BENCH_ENDPOINTS = [("openai", "/v1/completions"), ("openai-chat", "/v1/chat/completions")]


def test_vllm_bench_serve(stack: Stack, tmp_path: Path) -> None:
    """`vllm bench serve` (random dataset) finishes against both endpoints with 0 failures.

    The two runs go at once: most of each run's time is importing vLLM (one core).
    """
    runs = {
        endpoint: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.vllm_bench_serve",
                "--base-url",
                stack.base_url,
                "--backend",
                backend,
                "--endpoint",
                endpoint,
                "--model",
                "SmolLM2-135M-Instruct",
                "--tokenizer",
                str(default_model_dir()),
                "--dataset-name",
                "random",
                "--random-input-len",
                "64",
                "--random-output-len",
                "32",
                "--num-prompts",
                "16",
                "--max-concurrency",
                "4",
                "--ignore-eos",
                "--save-result",
                "--result-dir",
                str(tmp_path),
                "--result-filename",
                f"{backend}.json",
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for backend, endpoint in BENCH_ENDPOINTS
    }
    for (backend, endpoint), run in zip(BENCH_ENDPOINTS, runs.values(), strict=True):
        output, _ = run.communicate(timeout=300)
        assert run.returncode == 0, f"{endpoint}: {output[-3000:]}"
        result = json.loads((tmp_path / f"{backend}.json").read_text())
        print(endpoint, {k: result[k] for k in ("completed", "failed", "median_ttft_ms")})
        assert result["completed"] == 16
        assert result["failed"] == 0
        assert result["total_output_tokens"] == 16 * 32
        assert result["median_ttft_ms"] > 0 and result["median_tpot_ms"] > 0


def stream_generate(stack: Stack, body: dict[str, Any]) -> tuple[list[float], str, dict[str, Any]]:
    """Arrival times (s) of each delta, their text, and the final response of a stream."""
    started = time.perf_counter()
    arrivals: list[float] = []
    text = ""
    final: dict[str, Any] = {}
    with requests.post(
        f"{stack.base_url}/generate", json={**body, "stream": True}, stream=True, timeout=120
    ) as response:
        assert response.status_code == 200, response.text
        for line in response.iter_lines():
            if not line:
                continue
            event = json.loads(line.removeprefix(b"data: "))
            if event["type"] == "delta":
                arrivals.append(time.perf_counter() - started)
                text += event["delta"]
            else:
                assert event["type"] == "final", event
                final = event["response"]
    return arrivals, text, final


def test_first_token_arrives_long_before_the_last(stack: Stack) -> None:
    wait_idle(stack, 30)  # measured alone, whatever the tests before it left running
    arrivals, text, final = stream_generate(
        stack, {"message": "Tell me a long story about a dragon.", "max_tokens": 120}
    )
    timings = final["model_info"]["timings"]
    first_ms, last_ms = arrivals[0] * 1000, arrivals[-1] * 1000
    print(
        f"first delta {first_ms:.0f} ms, engine ttft {timings['ttft_ms']:.0f} ms, "
        f"last delta {last_ms:.0f} ms, {len(arrivals)} deltas; timings {timings}"
    )
    assert len(arrivals) > 50
    assert first_ms < last_ms / 2  # streamed as made, not buffered to the end
    # The client sees the first token soon after the engine makes it. Right after the load
    # of the benchmark test before it, the first delta has come 0.6-1.3 s after the request
    # with an engine TTFT of 70 ms (an open item in docs/performance.md); alone it is
    # ~20 ms. The bound catches buffering, not that delay.
    assert first_ms - timings["ttft_ms"] < 1500
    assert text == final["response"]  # the deltas add up to the whole answer


def test_closing_a_stream_aborts_the_engine_request(stack: Stack) -> None:
    wait_idle(stack, 30)
    response = requests.post(
        f"{stack.base_url}/v1/completions",
        json={"prompt": "Once upon a time", "max_tokens": 500, "ignore_eos": True, "stream": True},
        stream=True,
        timeout=60,
    )
    lines = response.iter_lines()
    chunks = 0
    for line in lines:
        chunks += line.startswith(b"data: {")
        if chunks == 3:
            break
    # The request is running while the stream is open (/health's stats are up to 1 s old;
    # 500 tokens take over 10 s here, so a loaded host's late stats still see it running).
    seen: list[int] = []

    def running() -> bool:
        seen.append(busy(stack))
        return seen[-1] == 1

    try:
        wait_for(running, timeout_s=15, interval_s=0.2)
    except TimeoutError:
        raise AssertionError(f"requests running or waiting, as /health said: {seen}") from None
    response.close()
    drained_in = wait_idle(stack, 2)
    print(f"running back to 0 {drained_in:.2f} s after closing the stream")
    generated = requests.get(f"{stack.base_url}/status/detailed", timeout=10).json()
    assert generated["engine"]["summary"]["running_requests"] == 0


def test_abandoning_a_request_aborts_it_and_forgets_its_conversation(stack: Stack) -> None:
    wait_idle(stack, 30)
    before = requests.get(f"{stack.base_url}/conversations", timeout=10).json()["total"]
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(
            f"{stack.base_url}/generate",
            timeout=1.5,
            json={"message": "Write a very long essay about the sea.", "max_tokens": 500},
        )
    drained_in = wait_idle(stack, 2)
    print(f"running back to 0 {drained_in:.2f} s after the client gave up")
    time.sleep(0.5)
    after = requests.get(f"{stack.base_url}/conversations", timeout=10).json()["total"]
    assert after == before


def test_conversation_through_chat_completions(stack: Stack) -> None:
    url = f"{stack.base_url}/v1/chat/completions"
    first = requests.post(
        url,
        timeout=60,
        json={
            "messages": [{"role": "user", "content": "My name is Alice. Remember it."}],
            "max_tokens": 30,
            "temperature": 0,
            "store": True,
        },
    )
    cid = first.headers["X-Conversation-Id"]
    second = requests.post(
        url,
        timeout=60,
        json={
            "messages": [{"role": "user", "content": "What is my name?"}],
            "max_tokens": 30,
            "temperature": 0,
            "conversation_id": cid,
        },
    ).json()
    assert "Alice" in second["choices"][0]["message"]["content"]
    assert second["conversation_id"] == cid
    stored = requests.get(f"{stack.base_url}/conversations/{cid}", timeout=10).json()
    assert [(m["role"], m["content"]) for m in stored["messages"]] == [
        ("user", "My name is Alice. Remember it."),
        ("assistant", first.json()["choices"][0]["message"]["content"]),
        ("user", "What is my name?"),
        ("assistant", second["choices"][0]["message"]["content"]),
    ]


def test_generate_with_json_schema(stack: Stack) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    body = requests.post(
        f"{stack.base_url}/generate",
        timeout=60,
        json={
            "message": "Name a city and its country.",
            "max_tokens": 60,
            "temperature": 0,
            "json_schema": schema,
        },
    ).json()
    assert body["response_is_json"] is True, body
    assert set(body["response_json"]) == {"city", "country"}
    invalid = requests.post(
        f"{stack.base_url}/generate",
        timeout=60,
        json={"message": "x", "json_schema": {"type": "nonsense"}},
    )
    assert invalid.status_code == 400


def test_streamed_errors_keep_their_status(stack: Stack) -> None:
    too_long = requests.post(
        f"{stack.base_url}/v1/chat/completions",
        timeout=60,
        json={"messages": [{"role": "user", "content": "hello world " * 1500}], "stream": True},
    )
    assert too_long.status_code == 400
    assert "maximum context length" in too_long.json()["error"]["message"]


#: A JSON schema feature vLLM's grammar backend (xgrammar) refuses: a client error.
UNSUPPORTED_SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "number", "multipleOf": 3}},
    "required": ["n"],
}


@pytest.mark.parametrize(
    ("path", "body", "param_or_phrase"),
    [
        ("/v1/completions", {"prompt": [[27381192073]], "max_tokens": 4}, "out of vocabulary"),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "A number?"}],
                "max_tokens": 8,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "n", "schema": UNSUPPORTED_SCHEMA},
                },
            },
            "xgrammar",
        ),
        (
            "/generate",
            {"message": "A number?", "max_tokens": 8, "json_schema": UNSUPPORTED_SCHEMA},
            "xgrammar",
        ),
    ],
)
def test_requests_vllm_refuses_are_client_errors(
    stack: Stack, path: str, body: dict[str, Any], param_or_phrase: str
) -> None:
    """vLLM's VLLMValidationError (no ValueError) is a 400, never a 503 the SDK retries.

    Streamed on ``/v1``, vllm serve reports these in the stream (200, then an error event
    with code 400); so does ``/v1`` here (the differential test compares the two).
    """
    for stream in (False, True):
        response = requests.post(
            f"{stack.base_url}{path}", json={**body, "stream": stream}, timeout=60
        )
        print(f"\n[{path} stream={stream}] {response.status_code} {response.text[:200]}")
        assert param_or_phrase in response.text
        assert "Retry-After" not in response.headers
        if stream and path.startswith("/v1/"):
            assert response.status_code == 200, response.text
            first = json.loads(response.text.split("\n\n")[0].removeprefix("data: "))
            assert first["error"]["code"] == 400
        else:
            assert response.status_code == 400, response.text
