"""Redis frozen and killed under the real stack: 503s within seconds, recovery, no loss.

``stack.redis`` is the stack's own (``stack_redis``): the Redis the HTTP-layer tests and the
other stacks share is never stopped.
"""

from __future__ import annotations

import time

import requests

from tests.conftest import Stack
from tests.support import wait_for


def post_generate(stack: Stack, **body: object) -> requests.Response:
    return requests.post(f"{stack.base_url}/generate", json=body, timeout=60)


def health_is(stack: Stack, status: int) -> bool:
    return requests.get(f"{stack.base_url}/health", timeout=30).status_code == status


#: REDIS_TIMEOUT_S (3 s by default) plus room for a loaded 2-core machine.
OUTAGE_ANSWER_WITHIN_S = 6.0


def assert_outage_answers(stack: Stack, cid: str) -> None:
    # /health answers from a result up to 1 s old: the outage shows within that second.
    started = time.monotonic()
    health = requests.get(f"{stack.base_url}/health", timeout=30)
    while health.status_code == 200 and time.monotonic() - started < 1.5:
        time.sleep(0.1)
        health = requests.get(f"{stack.base_url}/health", timeout=30)
    assert time.monotonic() - started < OUTAGE_ANSWER_WITHIN_S + 1.5
    assert health.status_code == 503
    assert "redis" in health.json()["status"]
    assert health.json()["model_loaded"] is True
    for body in ({"message": "new one"}, {"message": "continue", "conversation_id": cid}):
        started = time.monotonic()
        response = post_generate(stack, max_tokens=8, **body)
        assert time.monotonic() - started < OUTAGE_ANSWER_WITHIN_S
        assert response.status_code == 503, response.text
        assert "Redis" in response.json()["detail"]
        assert int(response.headers["Retry-After"]) > 0


def test_frozen_then_killed_redis(stack: Stack) -> None:
    first = post_generate(stack, message="Remember the number 7.", max_tokens=12).json()
    cid = first["conversation_id"]
    before = requests.get(f"{stack.base_url}/conversations/{cid}", timeout=10).json()["messages"]

    later_messages = ["And now?", "Last one."]
    faults = [(stack.redis.freeze, stack.redis.thaw), (stack.redis.kill, stack.redis.start)]
    for (break_redis, restore_redis), message in zip(faults, later_messages, strict=True):
        break_redis()
        try:
            assert_outage_answers(stack, cid)
        finally:
            restore_redis()
        wait_for(lambda: health_is(stack, 200), 15, 0.5)
        response = post_generate(stack, message=message, conversation_id=cid, max_tokens=8)
        assert response.status_code == 200, response.text

    stored = requests.get(f"{stack.base_url}/conversations/{cid}", timeout=10).json()["messages"]
    assert stored[:2] == before
    assert [m["content"] for m in stored][::2] == ["Remember the number 7.", *later_messages]
