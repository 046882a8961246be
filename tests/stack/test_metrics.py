"""Metrics on the real stack: Ray's metrics agent, scraped as Prometheus would, and Prometheus.

The stack's agent listens on ``stack.metrics_url`` (``METRICS_EXPORT_PORT``); it
refreshes what it exports every few seconds, so each check polls until the numbers move.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO, Stack
from tests.support import Sample, metric_total, scrape_metrics, server_port, wait_for

DASHBOARD = REPO / "deployments" / "grafana" / "cloudllm.json"


def scrape(stack: Stack) -> list[Sample]:
    return scrape_metrics(stack.metrics_url)


total = metric_total


WATCHED: list[tuple[str, dict[str, str]]] = [
    ("ray_vllm_e2e_request_latency_seconds_count", {}),
    ("ray_vllm_time_to_first_token_seconds_count", {}),
    ("ray_vllm_generation_tokens_total", {}),
    ("ray_cloudllm_request_duration_seconds_count", {"api": "seed", "route": "/generate"}),
    (
        "ray_cloudllm_request_duration_seconds_count",
        {"api": "openai", "route": "/v1/chat/completions"},
    ),
    ("ray_cloudllm_requests_total", {"route": "/generate", "status": "200"}),
    ("ray_cloudllm_tokens_total", {"kind": "completion"}),
]


def readings(stack: Stack) -> list[float]:
    samples = scrape(stack)
    return [total(samples, name, **labels) for name, labels in WATCHED]


def settled_readings(stack: Stack) -> list[float]:
    """The readings once two of them, a few seconds apart, agree (earlier requests counted)."""
    previous = readings(stack)
    for _ in range(10):
        time.sleep(3)
        now = readings(stack)
        if now == previous:
            return now
        previous = now
    return previous


def test_engine_and_ingress_metrics_count_each_request(stack: Stack) -> None:
    before = settled_readings(stack)
    generated = 0
    for index in range(5):
        body = {"message": f"Count to {index + 3}.", "max_tokens": 8, "temperature": 0}
        answer = requests.post(f"{stack.base_url}/generate", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        generated += answer.json()["model_info"]["timings"]["tokens_generated"]
        chat = requests.post(
            f"{stack.base_url}/v1/chat/completions",
            json={
                "model": "SmolLM2-135M-Instruct",
                "messages": [{"role": "user", "content": f"Say {index}."}],
                "max_tokens": 6,
            },
            timeout=120,
        )
        assert chat.status_code == 200, chat.text
        generated += chat.json()["usage"]["completion_tokens"]
    expected = [10, 10, generated, 5, 5, 5, generated]

    def moved() -> list[float] | None:
        now = readings(stack)
        deltas = [round(a - b) for a, b in zip(now, before, strict=True)]
        return deltas if deltas == expected else None

    try:
        wait_for(moved, timeout_s=30, interval_s=1)
    except TimeoutError:
        now = readings(stack)
        deltas = [round(a - b) for a, b in zip(now, before, strict=True)]
        pytest.fail(
            f"after 30 s: {dict(zip([w[0] for w in WATCHED], deltas, strict=True))}, "
            f"expected {expected}"
        )


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["__inputs"][0]["name"] == "DS_PROMETHEUS"
    return [
        target["expr"].replace("$__rate_interval", "1m")
        for panel in dashboard["panels"]
        for target in panel["targets"]
    ]


@pytest.fixture(scope="module")
def prometheus(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus (Debian's package) scraping the stack every second."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is needed (make test installs Debian's package)"
    folder = tmp_path_factory.mktemp("prometheus")
    config = folder / "prometheus.yml"
    target = urllib.parse.urlsplit(stack.metrics_url).netloc
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs: [{{job_name: cloudllm, static_configs: [{{targets: ['{target}']}}]}}]\n"
    )
    port = server_port()
    log = (folder / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(url), timeout_s=60, interval_s=0.5)
        yield url
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def _ready(url: str) -> bool:
    try:
        return requests.get(f"{url}/-/ready", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def query(prometheus: str, expression: str) -> list[dict[str, object]]:
    answer = requests.get(f"{prometheus}/api/v1/query", params={"query": expression}, timeout=10)
    assert answer.status_code == 200, (expression, answer.text)
    body = answer.json()
    assert body["status"] == "success", (expression, body)
    return list(body["data"]["result"])


def test_every_dashboard_expression_returns_data(stack: Stack, prometheus: str) -> None:
    expressions = dashboard_expressions()
    assert len(expressions) >= 15
    deadline = time.monotonic() + 90
    missing = expressions
    round_ = 0
    while missing and time.monotonic() < deadline:
        # Traffic of every kind the dashboard shows: both APIs, streamed, a conversation.
        round_ += 1
        first = requests.post(
            f"{stack.base_url}/generate",
            json={"message": f"Hello {round_}", "max_tokens": 4},
            timeout=60,
        ).json()
        requests.post(
            f"{stack.base_url}/generate",
            json={
                "message": "And?",
                "max_tokens": 4,
                "stream": True,
                "conversation_id": first["conversation_id"],
            },
            timeout=60,
        )
        requests.post(
            f"{stack.base_url}/v1/chat/completions",
            json={
                "model": "SmolLM2-135M-Instruct",
                "stream": True,
                "max_tokens": 4,
                "messages": [{"role": "user", "content": "Hi"}],
            },
            timeout=60,
        )
        requests.post(f"{stack.base_url}/generate", json={"message": ""}, timeout=10)
        time.sleep(2)
        missing = [e for e in missing if not _has_number(query(prometheus, e))]
    assert not missing, f"dashboard expressions without data after traffic: {missing}"


def _has_number(result: list[dict[str, object]]) -> bool:
    for sample in result:
        value = sample.get("value")
        if isinstance(value, list) and value[1] not in ("NaN", "+Inf", "-Inf"):
            return True
    return False


def test_scrape_url_is_what_the_launcher_printed(stack: Stack) -> None:
    assert f"metrics: {stack.metrics_url}/metrics" in Path(stack.log_path).read_text()


def test_request_id_is_returned_and_vllm_gets_an_id_of_its_own(stack: Stack) -> None:
    """X-Request-Id is the correlation id (answers, audit lines; Serve's access lines are
    off); vLLM's request id is one the server made, never the client's (two requests may
    send the same X-Request-Id)."""
    request_id = f"trace-{uuid.uuid4().hex[:16]}"
    vllm_ids = []
    for path, body in [
        ("/generate", {"message": "Hi", "max_tokens": 2}),
        (
            "/v1/chat/completions",
            {
                "model": "SmolLM2-135M-Instruct",
                "max_tokens": 2,
                "messages": [{"role": "user", "content": "Hi"}],
            },
        ),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
    ]:
        answer = requests.post(
            f"{stack.base_url}{path}", json=body, headers={"X-Request-Id": request_id}, timeout=60
        )
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-Request-Id"] == request_id
        if path.startswith("/v1/"):
            vllm_ids.append(answer.json()["id"])
    made = requests.get(f"{stack.base_url}/health", timeout=10).headers["X-Request-Id"]
    assert made and made != request_id
    print(f"\n[request id] {request_id} -> vLLM's {vllm_ids}")
    assert all(request_id not in vllm_id for vllm_id in vllm_ids)
    assert len(set(vllm_ids)) == len(vllm_ids)
