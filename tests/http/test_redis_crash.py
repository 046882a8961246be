"""redis-server SIGKILLed while turns stream in: no acknowledged turn is lost.

The policy under test is the one ``make serve`` runs (README, "Deploy"; docs/deployment.md,
"Redis"): an append-only file with ``appendfsync always``. Redis writes and fsyncs each
write to the file before it answers, so killing redis-server loses nothing it
acknowledged (and neither would a crash of the machine). Several clients send
``/generate`` turns (new conversations and continuations) while the test kills Redis
and restarts it on the same port and data; the app is never restarted. Afterwards
every turn answered 200 is in its conversation, once, in order, with its answer; a
turn answered 503 is there whole or not at all.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Any

from cloudllm_serve.devhost.launcher import REDIS_APPENDFSYNC
from tests.http.conftest import App
from tests.support import RedisServer, wait_for

#: Clients sending turns at the same time.
CLIENTS = 4
#: Kill / restart cycles.
CRASHES = 3
#: Least time Redis stays down in each cycle.
OUTAGE_S = 1.0
#: Turns answered 200 before the first kill and after each restart.
TURNS_BETWEEN = 50
#: Longest any answer may take, outage included (REDIS_TIMEOUT_S is 1 s here).
ANSWER_WITHIN_S = 5.0
#: Longest the app may take to answer /health 200 after Redis is back.
RECOVERY_WITHIN_S = 10.0


@dataclass
class Turn:
    """One ``/generate`` call: what was sent and what came back."""

    client: int
    conversation_id: str | None  # None: a first turn
    message: str
    status: int
    body: dict[str, Any]
    took_s: float


class Clients:
    """``CLIENTS`` threads sending turns until stopped, each keeping its own conversations."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.turns: list[Turn] = []
        #: What a client thread raised (the test client re-raises the app's errors).
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(index,), daemon=True)
            for index in range(CLIENTS)
        ]

    def _run(self, index: int) -> None:
        try:
            self._send_turns(index)
        except BaseException as error:
            self.errors.append(error)
            raise

    def _send_turns(self, index: int) -> None:
        rng = random.Random(index)
        mine: list[str] = []  # conversations this client started (their first turn got a 200)
        sent = 0
        while not self.stop.is_set():
            cid = rng.choice(mine) if mine and rng.random() < 0.7 else None
            message = f"c{index}-m{sent}"
            sent += 1
            body: dict[str, Any] = {"message": message, "max_tokens": 16}
            if cid is not None:
                body["conversation_id"] = cid
            started = time.monotonic()
            response = self.app.client.post("/generate", json=body)
            took_s = time.monotonic() - started
            turn = Turn(index, cid, message, response.status_code, response.json(), took_s)
            if response.status_code == 503:
                turn.body["retry_after"] = response.headers.get("Retry-After")
            with self.lock:
                self.turns.append(turn)
            if cid is None and response.status_code == 200:
                mine.append(response.json()["conversation_id"])
            if response.status_code == 503:
                time.sleep(0.01)  # a client that backs off a little, not a busy loop

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(ANSWER_WITHIN_S * 2)
        assert not any(thread.is_alive() for thread in self.threads), "a request hangs"
        assert not self.errors, f"a client failed: {self.errors[0]!r}"

    def count(self, status: int, since: int = 0) -> int:
        with self.lock:
            return sum(1 for turn in self.turns[since:] if turn.status == status)

    def wait_for(self, status: int, at_least: int, since: int = 0) -> None:
        """Wait (10 s at most) until ``at_least`` turns after the ``since``-th got ``status``."""
        wait_for(lambda: self.count(status, since) >= at_least, 10, 0.01)

    def sent(self) -> int:
        with self.lock:
            return len(self.turns)


def stored_pairs(app: App, conversation_id: str) -> list[tuple[str, str]]:
    """A conversation's messages as (user message, answer) pairs; fails on a half turn."""
    response = app.client.get(f"/conversations/{conversation_id}")
    assert response.status_code == 200, (conversation_id, response.text)
    messages = response.json()["messages"]
    roles = [m["role"] for m in messages]
    assert roles == ["user", "assistant"] * (len(messages) // 2), (conversation_id, roles)
    return [
        (messages[i]["content"], messages[i + 1]["content"]) for i in range(0, len(messages), 2)
    ]


def test_sigkill_of_redis_loses_no_acknowledged_turn(own_app: App, own_redis: RedisServer) -> None:
    config = own_redis.client().config_get("append*")
    assert config["appendonly"] == "yes"
    assert config["appendfsync"] == REDIS_APPENDFSYNC == "always"

    began = time.monotonic()
    clients = Clients(own_app)
    clients.start()
    recoveries: list[float] = []
    outage_503s: list[int] = []
    try:
        clients.wait_for(200, TURNS_BETWEEN)
        for _ in range(CRASHES):
            mark = clients.sent()
            own_redis.kill()  # while turns are in flight
            time.sleep(OUTAGE_S)
            # Down until every client has felt it (a few 503s each).
            clients.wait_for(503, 2 * CLIENTS, since=mark)
            outage_503s.append(clients.count(503, mark))
            own_redis.start()  # same port, same data folder
            restarted = time.monotonic()
            wait_for(lambda: own_app.client.get("/health").status_code == 200, RECOVERY_WITHIN_S)
            recoveries.append(time.monotonic() - restarted)
            mark = clients.sent()
            clients.wait_for(200, TURNS_BETWEEN, since=mark)
    finally:
        clients.join()
    turns = clients.turns

    # Every answer was a 200 or a prompt 503 that names Redis (a 404 here: a conversation
    # whose turns were answered 200 was lost with the crash).
    others = [(t.status, t.conversation_id, t.body) for t in turns if t.status not in (200, 503)]
    assert not others, f"{len(others)} answers neither 200 nor 503: {others[:3]}"
    for turn in turns:
        assert turn.took_s < ANSWER_WITHIN_S, turn
        if turn.status == 503:
            assert "Redis" in turn.body["detail"], turn
            assert int(turn.body["retry_after"]) > 0, turn

    # Each conversation holds exactly the turns sent to it that were stored, in the order
    # sent, each once and whole; every turn answered 200 is among them, with its answer.
    acked = [turn for turn in turns if turn.status == 200]
    by_conversation: dict[str, list[Turn]] = {}
    for turn in turns:
        cid = turn.conversation_id or (turn.body["conversation_id"] if turn.status == 200 else None)
        if cid is not None:
            by_conversation.setdefault(cid, []).append(turn)
    stored_503s = 0
    for cid, sent in by_conversation.items():
        pairs = stored_pairs(own_app, cid)
        stored = [message for message, _ in pairs]
        assert len(stored) == len(set(stored)), f"{cid}: a turn is stored twice: {stored}"
        assert stored == [t.message for t in sent if t.message in stored], (cid, stored)
        answers = dict(pairs)
        for turn in sent:
            if turn.status == 200:
                assert answers.get(turn.message) == turn.body["response"], (cid, turn, pairs)
            elif turn.message in answers:
                stored_503s += 1

    # Conversations nobody got an id for (a first turn answered 503) hold no half turn.
    listed = own_app.client.get("/conversations", params={"limit": 1000}).json()
    first_503s = {t.message for t in turns if t.conversation_id is None and t.status == 503}
    orphans = [c["conversation_id"] for c in listed["conversations"]]
    orphans = [cid for cid in orphans if cid not in by_conversation]
    for cid in orphans:
        pairs = stored_pairs(own_app, cid)
        assert len(pairs) <= 1 and all(message in first_503s for message, _ in pairs), pairs
        stored_503s += len(pairs)
    assert listed["total"] == len(by_conversation) + len(orphans)

    # The outages were felt, and the app served again after each without a restart.
    assert len(recoveries) == CRASHES
    print(
        f"\n{len(turns)} turns in {time.monotonic() - began:.1f} s: {len(acked)} answered 200 "
        f"(all stored), {len(turns) - len(acked)} answered 503 ({outage_503s} per outage; "
        f"{stored_503s} of them stored whole); {len(by_conversation)} conversations, "
        f"{len(orphans)} left by a failed first turn; /health 200 again "
        f"{', '.join(f'{s:.2f}' for s in recoveries)} s after each restart; slowest answer "
        f"{max(t.took_s for t in turns):.2f} s"
    )
