"""Streams survive an engine crash: 32 answers running, one engine replica killed.

The sim stack has two engine replicas. 32 requests run at once (``/v1`` chat and text
completions streamed, ``/v1`` chat whole, ``/generate`` streamed and whole; 64 tokens
each), and one replica's process is killed (SIGKILL) while they generate. Every request
completes with its 64 tokens and no error: the requests of the dead replica go on the
other one from the tokens their clients got. A ``/v1`` answer (a seed, greedy) is the
text of an uninterrupted run of the same request, event ids and ``created`` unchanged,
usage counting each token once; a ``/generate`` answer (its start set by its own id) is
one unbroken run of the simulator's answer text. This module runs last in the group: the
killed replica is being replaced after it.
"""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from tests.conftest import Stack
from tests.sim.conftest import AUDIT_FILE
from tests.support import metric_total, scrape_metrics, wait_for

TOKENS = 64
#: Seconds after the requests start when a replica is killed: each stream has had its
#: first token (300 ms) and a batch or two (1 s apart), and has most of its answer to go.
KILL_AFTER_S = 1.6


def v1_body(kind: str, index: int, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "sim",
        "max_tokens": TOKENS,
        "temperature": 0,
        "seed": 11 * index,
        "ignore_eos": True,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": f"Story {index}, please."}]
    else:
        body["prompt"] = f"Story {index}:"
    return body


def events_of(response: requests.Response) -> list[str]:
    text = response.text
    return [e.removeprefix("data: ") for e in text.split("\n\n") if e.strip()]


def v1_answer(base: str, body: dict[str, Any]) -> dict[str, Any]:
    """One /v1 answer: its text, usage and (streamed) the events' ids and created.

    A chat completion when ``body`` has messages, else a text completion.
    """
    kind = "chat" if "messages" in body else "completion"
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    response = requests.post(base + path, json=body, timeout=300)
    assert response.status_code == 200, response.text
    if not body.get("stream"):
        body = response.json()
        choice = body["choices"][0]
        text = choice["message"]["content"] if kind == "chat" else choice["text"]
        return {"text": text, "usage": body["usage"]}
    events = events_of(response)
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    errors = [c for c in chunks if "error" in c]
    assert not errors, errors
    texts = [
        (c["choices"][0]["delta"].get("content") or "")
        if kind == "chat"
        else c["choices"][0]["text"]
        for c in chunks
        if c["choices"]
    ]
    roles = [c for c in chunks if c["choices"] and "role" in c["choices"][0].get("delta", {})]
    (usage,) = [c["usage"] for c in chunks if c.get("usage")]
    return {
        "text": "".join(texts),
        "usage": usage,
        "ids": {c["id"] for c in chunks},
        "created": {c["created"] for c in chunks},
        "roles": len(roles),
    }


def run_generate(base: str, index: int, stream: bool) -> dict[str, Any]:
    body = {"message": f"Tale {index}.", "max_tokens": TOKENS, "stream": stream}
    response = requests.post(f"{base}/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    if stream:
        events = [json.loads(e) for e in events_of(response)]
        assert events[-1]["type"] == "final", events[-2:]
        answer = events[-1]["response"]
        assert "".join(e["delta"] for e in events[:-1]) == answer["response"]
    else:
        answer = response.json()
    return {
        "text": answer["response"],
        "tokens": answer["model_info"]["timings"]["tokens_generated"],
    }


#: The 32 requests: (route, index, streamed).
REQUESTS = (
    [("chat", i, True) for i in range(8)]
    + [("completion", i, True) for i in range(8)]
    + [("chat", 8 + i, False) for i in range(4)]
    + [("generate", i, True) for i in range(8)]
    + [("generate", 8 + i, False) for i in range(4)]
)


def run(base: str, route: str, index: int, stream: bool) -> dict[str, Any]:
    if route == "generate":
        return run_generate(base, index, stream)
    return v1_answer(base, v1_body(route, index, stream))


def test_streams_continue_on_the_other_replica_when_one_dies(sim_stack: Stack) -> None:
    base = sim_stack.base_url
    status = requests.get(f"{base}/status/detailed", timeout=30).json()
    replicas = [r for r in status["engine"]["replicas"] if r["state"] == "RUNNING"]
    assert len(replicas) == 2, replicas
    resumed_before = metric_total(
        scrape_metrics(sim_stack.metrics_url),
        "ray_cloudllm_stream_resumes_total",
        outcome="resumed",
    )
    v1 = [r for r in REQUESTS if r[0] != "generate"]
    # The simulator's answer text from its start, three times over: every /generate
    # answer is a run of it.
    cycle_request = {**v1_body("completion", 0, False), "seed": 0, "max_tokens": 4 * TOKENS}
    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        uninterrupted = list(pool.map(lambda r: run(base, *r), v1))
        cycle = requests.post(f"{base}/v1/completions", json=cycle_request, timeout=120)
        assert cycle.status_code == 200, cycle.text
        answer_text = cycle.json()["choices"][0]["text"]

        started = time.monotonic()
        futures = [pool.submit(run, base, *r) for r in REQUESTS]
        time.sleep(KILL_AFTER_S)
        os.kill(int(replicas[0]["pid"]), signal.SIGKILL)
        outcomes = [future.result() for future in futures]
    took = time.monotonic() - started
    print(f"[stream resume] 32 answers in {took:.1f} s, replica {replicas[0]['replica_id']} killed")

    reference = dict(zip(v1, uninterrupted, strict=True))
    for request, got in zip(REQUESTS, outcomes, strict=True):
        route, _, stream = request
        if route == "generate":
            assert got["tokens"] == TOKENS, (request, got)
            assert got["text"] and got["text"] in answer_text, (request, got["text"])
            continue
        expected = reference[request]
        assert got["text"] == expected["text"], (request, got["text"], expected["text"])
        assert got["usage"]["completion_tokens"] == TOKENS, (request, got["usage"])
        assert got["usage"]["prompt_tokens"] == expected["usage"]["prompt_tokens"], request
        if stream:
            # One id and one "created" for the whole stream, one opening role chunk.
            assert len(got["ids"]) == 1 and len(got["created"]) == 1, (request, got)
            assert got["roles"] == (1 if route == "chat" else 0), (request, got)

    def resumed() -> float:
        samples = scrape_metrics(sim_stack.metrics_url)
        total = metric_total(samples, "ray_cloudllm_stream_resumes_total", outcome="resumed")
        return total - resumed_before

    # Each one that moved says so in its audit line, and in the metric.
    audit = sim_stack.log_path.parent / AUDIT_FILE

    def audited_moves() -> int:
        lines = [json.loads(line) for line in audit.read_text().splitlines()]
        return sum(int(line["resumes"]) for line in lines)

    # (A request's line is written just after its last byte.)
    moves = wait_for(audited_moves, timeout_s=10, interval_s=0.5)
    assert wait_for(lambda: resumed() >= moves, timeout_s=30, interval_s=1)
    print(f"[stream resume] {moves} requests continued on the other replica")
