"""Token limits charge what a request may generate and settle at what it did generate.

The real app over a real Redis and the fake engine; the tenant ``tpm-100`` has a limit
of 100 tokens per minute (``tests/tenants_support.py``). What a tenant was charged is
read from its rate-limit hash in Redis (``t``: tokens of the current window).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.http.test_tenants import TenantApp, make_app
from tests.support import RedisServer, wait_for

TENANT = "tpm-100"
#: A prompt of 20 words for the fake engine to repeat, and its estimate (characters / 4).
WORDS = "say:" + " ".join(f"w{i:02d}" for i in range(20))
ESTIMATE = -(-len(WORDS) // 4)


@pytest.fixture
def app(redis_server: RedisServer, tmp_path: Path) -> Iterator[TenantApp]:
    yield from make_app(redis_server, tmp_path)


@pytest.fixture
def slow_app(redis_server: RedisServer, tmp_path: Path) -> Iterator[TenantApp]:
    """Words come every 0.1 s; a generation is stopped after 1 s (REQUEST_TIMEOUT_S)."""
    for made in make_app(redis_server, tmp_path, REQUEST_TIMEOUT_S=1.0):
        made.engine.delay_s = 0.1
        # Mid-window, so that settling cannot land in the next minute's window.
        mid_window = (time.time() // 60) * 60 + 30
        made.service.limiter.clock = lambda at=mid_window: at
        yield made


def charged(app: TenantApp) -> int:
    """Tokens charged to the tenant in its current window (the hash's ``t``)."""
    client = redis.Redis.from_url(app.redis.url, decode_responses=True)
    with contextlib.closing(client):
        return int(client.hget(f"{app.prefix}rl:{{{TENANT}}}", "t") or 0)


def settled(app: TenantApp, *, below: int) -> int:
    """The tenant's charge once settling (in the background) has brought it under ``below``.

    Fails when it stays at ``below`` (the estimate) or drops to 0 (all refunded).
    """

    def check() -> int | None:
        tokens = charged(app)
        return tokens if 0 < tokens < below else None

    return wait_for(check, 5, 0.02)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        # Four prompts answered 25 tokens each: 100 tokens, however the prompts are given.
        ("/v1/completions", {"prompt": ["a", "b", "c", "d"], "max_tokens": 25}),
        ("/v1/completions", {"prompt": [[1, 2], [3], [4], [5]], "max_tokens": 25}),
        ("/v1/completions", {"prompt": ["a", "b"], "n": 2, "max_tokens": 25}),
        # Integers as vLLM's models take them (pydantic's lax mode).
        ("/v1/completions", {"prompt": "a", "n": 4.0, "max_tokens": 25}),
        ("/v1/completions", {"prompt": "a", "n": "4", "max_tokens": 25}),
        ("/v1/completions", {"prompt": "a", "max_tokens": "100"}),
        ("/v1/completions", {"prompt": "a", "max_tokens": 100.0}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "n": "4"}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": "100"},
        ),
        # Without max_tokens a chat may take the rest of the context (2048 tokens).
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]}),
    ],
)
def test_the_estimate_is_what_vllm_may_generate(
    app: TenantApp, path: str, body: dict[str, Any]
) -> None:
    response = app.client.post(path, json=body, headers=app.keys.auth(TENANT))
    assert response.status_code == 429, response.text
    assert response.headers["x-should-retry"] == "false"  # it can never fit 100 tokens
    assert app.engine.calls == []


def test_a_batch_that_fits_is_charged_per_prompt(app: TenantApp) -> None:
    app.engine.delay_s = 0.3  # still running when the charge is read
    body = {"prompt": ["a", "b", "c"], "max_tokens": "10", "n": 2.0}
    statuses: list[int] = []

    def send() -> None:
        response = app.client.post("/v1/completions", json=body, headers=app.keys.auth(TENANT))
        statuses.append(response.status_code)

    thread = threading.Thread(target=send)
    thread.start()
    wait_for(lambda: app.engine.running == 1, 5, 0.01)
    during = charged(app)
    thread.join()
    assert statuses == [200]
    # 3 prompts x 2 choices x 10 tokens, and the prompts' estimate: '["a", "b", "c"]' / 4.
    assert during == 60 + 4


def test_a_dropped_stream_is_charged_what_was_generated(app: TenantApp) -> None:
    app.engine.delay_s = 0.05
    body = {"prompt": WORDS, "max_tokens": 60, "stream": True}  # charged ESTIMATE + 60
    asgi = app.client.app
    headers = [
        (b"content-type", b"application/json"),
        *((k.lower().encode(), v.encode()) for k, v in app.keys.auth(TENANT).items()),
    ]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }

    async def drop_after_five_events() -> int:
        """Read five events, then go away: Serve cancels the request's task."""
        events: list[bytes] = []
        enough = asyncio.Event()
        request = [{"type": "http.request", "body": json.dumps(body).encode()}]

        async def receive() -> dict[str, Any]:
            if request:
                return request.pop()
            await asyncio.Event().wait()  # the client says nothing more
            raise AssertionError

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                events.append(message["body"])
                if len(events) == 5:
                    enough.set()

        task = asyncio.create_task(asgi(scope, receive, send))  # type: ignore[operator]
        await enough.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return len(events)

    assert app.client.portal.call(drop_after_five_events) == 5  # type: ignore[union-attr]
    wait_for(lambda: app.engine.cancelled == 1, 5, 0.02)
    # The prompt estimate and the 5 tokens sent (one or two more may have been counted
    # on their way), not 0 (the whole estimate refunded) nor all that was charged.
    assert ESTIMATE + 5 <= settled(app, below=ESTIMATE + 60) <= ESTIMATE + 8


def test_a_timeout_or_an_engine_failure_midway_is_charged_what_was_generated(
    slow_app: TenantApp,
) -> None:
    app, auth = slow_app, slow_app.keys.auth(TENANT)
    # /v1 stream: about 10 words, then the 504 as an event (charged ESTIMATE + 60 at first).
    body = {"prompt": WORDS, "max_tokens": 60, "stream": True}
    response = app.client.post("/v1/completions", json=body, headers=auth)
    assert "timeout_error" in response.text
    relayed = response.text.count('"choices"')
    assert relayed >= 1
    assert settled(app, below=ESTIMATE + 60) == ESTIMATE + relayed
    app.service.limiter.window_s = 1_000_000  # a new window for each case below
    # /generate stream: its chunks carry the real prompt tokens (the fake engine counts
    # its answer's 20 words); max_tokens is clamped to MAX_TOKENS_CAP (32).
    response = app.client.post(
        "/generate", json={"message": WORDS, "max_tokens": 60, "stream": True}, headers=auth
    )
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line[:6] == "data: "]
    assert events[-1]["type"] == "error" and events[-1]["status"] == 504
    relayed = sum(event["type"] == "delta" for event in events)
    assert relayed >= 1
    assert settled(app, below=ESTIMATE + 32) == 20 + relayed
    app.service.limiter.window_s = 2_000_000
    # A whole answer cut off: how much was generated is unknown; the estimate stays.
    response = app.client.post(
        "/v1/completions", json={"prompt": WORDS, "max_tokens": 60}, headers=auth
    )
    assert response.status_code == 504
    wait_for(lambda: app.engine.running == 0, 5, 0.02)
    assert charged(app) == ESTIMATE + 60
    app.service.limiter.window_s = 3_000_000
    # The engine fails after three words: a stream's error event, no usage.
    app.engine.delay_s = 0
    failing = {"prompt": "say:a b c FAIL d e", "max_tokens": 60, "stream": True}
    response = app.client.post("/v1/completions", json=failing, headers=auth)
    assert '"error"' in response.text
    assert settled(app, below=65) == 5 + 3  # prompt estimate (18 / 4) and 3 tokens


class SteppingClock:
    """The limiter's clock: ``times`` one after the other, the last one from then on."""

    def __init__(self, *times: float) -> None:
        self.times = list(times)

    def __call__(self) -> float:
        return self.times.pop(0) if len(self.times) > 1 else self.times[0]


def test_an_answer_settled_in_the_next_window_is_charged_there(app: TenantApp) -> None:
    window = 29_000_000
    # Admitted at the end of one window, settled (and the next request admitted) in the next.
    app.service.limiter.clock = SteppingClock(window * 60 + 59.9, (window + 1) * 60 + 0.5)
    auth = app.keys.auth(TENANT)
    # Charged 60 / 4 + 1 = 16 at first; the fake engine counts 35 prompt tokens and 1.
    message = " ".join(["a"] * 30)
    response = app.client.post(
        "/generate", json={"message": message, "max_tokens": 1}, headers=auth
    )
    assert response.status_code == 200
    assert response.json()["model_info"]["timings"]["prompt_tokens"] == 35
    # What the estimate left out (36 - 16) is charged to the window the answer ended in.
    wait_for(lambda: charged(app) == 20, 5, 0.02)
    after = app.client.get("/v1/models", headers=auth)
    assert after.headers["x-ratelimit-remaining-tokens"] == str(100 - 20)
