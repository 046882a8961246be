"""No input gets a 5xx: requests generated from the app's own OpenAPI schema (schemathesis).

Every operation of ``/openapi.json`` (the seed API, conversations, ``/v1``) gets requests
that follow its schema (positive) and requests that break it (negative), sent in-process
(ASGI) to the real app over a real Redis and the fake engine. A 5xx fails the test (501
only where the operation documents it and the model really takes no images), and so does
a status the operation does not document. Schema-conforming requests to ``/generate`` and
``/v1/chat/completions`` must mostly succeed: the schema declares what the handlers check.

Hypothesis runs derandomized (no example database), so every run sends the same requests.
"""

from __future__ import annotations

import math
import os
import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from schemathesis import APIOperation, Case, GenerationMode

from cloudllm_serve.engine.protocol import OpenAIAnswer, OpenAICall, OpenAIItem
from cloudllm_serve.ingress.openai_api.schemas import CHAT_BODY_DOC, COMPLETION_BODY_DOC
from cloudllm_serve.ingress.seed_api.image_input import IMAGE_CONTENT_TYPES
from tests.fakes import FakeEngine
from tests.http.conftest import build_app
from tests.support import RedisServer, image_bytes

#: The share of the examples below to send: ``make test`` sends them all, ``make test-fast``
#: (``FUZZ_SCALE=0.1``) fewer, to stay under its two minutes.
FUZZ_SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
#: Requests the whole run must send, at least.
MIN_REQUESTS = int(2000 * FUZZ_SCALE)
#: Most examples (positive, negative) per operation on the app whose model takes images;
#: cheap operations get more, the chat body (slow to generate) fewer.
EXAMPLES = (150, 100)
EXAMPLES_OF = {
    "POST /v1/chat/completions": (80, 60),
    "GET /conversations/{conversation_id}": (200, 0),
    "DELETE /conversations/{conversation_id}": (200, 0),
    "GET /v1/models/{model_id}": (200, 0),
}
#: The operations that take images, and their examples on the text-only app (a 501 there).
IMAGE_OPERATIONS = {
    "POST /vision": (25, 15),
    "POST /multimodal": (25, 15),
    "POST /v1/chat/completions": (30, 20),
}
#: Operations whose schema-conforming requests must mostly succeed, with the least share of
#: 2xx answers among those not refused for a reason the schema cannot state (see
#: :func:`_explained_refusal`); the rest: combinations such as n > 1 with store, too many
#: images, a data URL that is not base64.
MOSTLY_ACCEPTED = {"POST /generate": 0.7, "POST /v1/chat/completions": 0.6}


def _explained_refusal(status: int, text: str) -> bool:
    """Whether a schema-conforming request was refused for a reason the schema cannot state.

    Unknown conversation ids and models (404), a body over ``MAX_UPLOAD_BYTES`` (413), and
    an integer anywhere in free-form JSON beyond 64 bits (400: vLLM's and Redis's JSON
    cannot hold it). How many of these a run draws depends on Hypothesis's state from the
    tests before it in the process (one run: 38 of 80 chat bodies accepted, 35 of them so
    refused), so they do not count against an operation's share of 2xx.
    """
    return status in (404, 413) or (status == 400 and "integer out of range" in text)


FUZZ_SETTINGS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.generate],
    suppress_health_check=list(HealthCheck),
)


@st.composite
def uploads(draw: st.DrawFn) -> bytes:
    """An image file as a client may upload it: a real picture, a cut-off one, or junk."""
    picture = image_bytes(
        draw(st.integers(1, 40)),
        draw(st.integers(1, 40)),
        seed=draw(st.integers(0, 1000)),
        image_format=draw(st.sampled_from(["PNG", "JPEG", "WEBP", "GIF"])),
    )
    kind = draw(st.sampled_from(["whole", "whole", "cut", "junk"]))
    if kind == "cut":
        return picture[: draw(st.integers(1, len(picture) - 1))]
    if kind == "junk":
        return draw(st.binary(max_size=64))
    return picture


class VllmLikeFakeEngine(FakeEngine):
    """The fake engine, refusing on ``/v1`` what vLLM's request models refuse (400).

    vLLM validates the body in the engine replica; here the body is held to the schema
    ``/openapi.json`` documents for it, so the fake only ever sees bodies it can answer.
    """

    def __init__(self, bodies: dict[str, dict[str, Any]]) -> None:
        super().__init__()
        self.validators = {kind: Draft202012Validator(schema) for kind, schema in bodies.items()}

    async def openai_items(self, call: OpenAICall) -> AsyncIterator[OpenAIItem]:
        error = best_match(self.validators[call.kind].iter_errors(call.body))
        if error is not None:
            param = ".".join(map(str, error.absolute_path)) or None
            yield OpenAIAnswer(
                400,
                {"error": {"message": error.message, "type": "BadRequestError", "param": param}},
            )
            return
        async for item in super().openai_items(call):
            yield item


@dataclass
class Target:
    """One app under test: its name, the app, and whether its model takes images."""

    name: str
    app: FastAPI
    images: bool

    def examples(self, operation: APIOperation, mode: GenerationMode) -> int:
        """How many requests of ``mode`` to send ``operation`` (at most)."""
        if self.images:
            counts = EXAMPLES_OF.get(operation.label, EXAMPLES)
        else:
            counts = IMAGE_OPERATIONS.get(operation.label, (0, 0))
        count = counts[0] if mode is GenerationMode.POSITIVE else counts[1]
        # The share of 2xx needs its whole sample: too few requests make it noise.
        scale = 1.0 if operation.label in MOSTLY_ACCEPTED else FUZZ_SCALE
        return math.ceil(count * scale)


@dataclass
class Tally:
    """What the run sent and got: status codes by (app, operation, mode), and the failures."""

    statuses: dict[tuple[str, str, str], Counter[int]] = field(default_factory=dict)
    explained: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(sum(counts.values()) for counts in self.statuses.values())

    def record(self, key: tuple[str, str, str], status: int) -> None:
        self.statuses.setdefault(key, Counter())[status] += 1

    def accepted_share(self, label: str) -> float:
        """2xx answers to ``label``'s schema-conforming requests, among the unexplained."""
        key = ("vision", label, "positive")
        counts = self.statuses.get(key, Counter())
        total = sum(counts.values()) - self.explained[key]
        return sum(n for code, n in counts.items() if 200 <= code < 300) / total if total else 0.0

    def table(self) -> str:
        return "\n".join(
            f"{app:9} {label:40} {mode:8} {dict(sorted(counts.items()))}"
            for (app, label, mode), counts in sorted(self.statuses.items())
        )


def _fuzz_app(redis_server: RedisServer, *, images: bool) -> FastAPI:
    """The app as the ``app`` fixture builds it (real Redis, own key prefix, fake engine).

    The body limit is larger (generated bodies are rarely that big) and the audit log off.
    """
    engine = VllmLikeFakeEngine({"chat": CHAT_BODY_DOC, "completion": COMPLETION_BODY_DOC})
    engine.supports_images = images
    engine.fail_word = None  # no deliberate engine failure: any 5xx here is the app's
    app, _ = build_app(redis_server, engine, MAX_UPLOAD_BYTES=16384, AUDIT_LOG="off")
    return app


@pytest.fixture
def targets(redis_server: RedisServer) -> Iterator[list[Target]]:
    # Multipart image fields declare these content types: send pictures (or broken ones).
    for media_type in IMAGE_CONTENT_TYPES.split(", "):
        schemathesis.openapi.media_type(media_type, uploads())
    yield [
        Target("vision", _fuzz_app(redis_server, images=True), images=True),
        Target("text-only", _fuzz_app(redis_server, images=False), images=False),
    ]


def _problem(target: Target, operation: APIOperation, status: int) -> str | None:
    """Why ``status`` is wrong for ``operation``, or ``None`` if it is fine."""
    documented = str(status) in operation.definition.raw.get("responses", {})
    if status == 501 and documented and not target.images:
        return None
    if status >= 500:
        return "a server error"
    return None if documented else "a status the operation does not document"


def _fuzz(target: Target, operation: APIOperation, mode: GenerationMode, tally: Tally) -> None:
    """Send ``operation`` the generated requests of ``mode``; record every answer."""
    key = (target.name, operation.label, mode.value)
    examples = target.examples(operation, mode)
    if not examples:
        return
    strategy = operation.as_strategy(generation_mode=mode)
    if mode is GenerationMode.POSITIVE:
        strategy = st.one_of(strategy, *operation.get_strategies_from_examples())

    @settings(FUZZ_SETTINGS, max_examples=examples)
    @given(case=strategy)
    def run(case: Case) -> None:
        try:
            response = case.call(app=target.app)
        except Exception:  # the app raised instead of answering
            tally.record(key, 599)
            tally.failures.append(
                f"{key} raised:\n{traceback.format_exc()}{case.as_curl_command()}"
            )
            return
        tally.record(key, response.status_code)
        if _explained_refusal(response.status_code, response.text):
            tally.explained[key] += 1
        problem = _problem(target, operation, response.status_code)
        if problem is not None:
            tally.failures.append(
                f"{key}: {response.status_code} is {problem}: {response.text[:300]}\n"
                f"{case.as_curl_command()}"
            )

    try:
        run()
    except Unsatisfiable:
        # Nothing of the operation can be made invalid (it takes no parameters).
        assert mode is GenerationMode.NEGATIVE, key


def test_no_generated_request_gets_a_server_error(targets: list[Target]) -> None:
    tally = Tally()
    started = time.perf_counter()
    labels: set[str] = set()
    for target in targets:
        schema = schemathesis.openapi.from_asgi("/openapi.json", target.app)
        for result in schema.get_all_operations():
            operation = result.ok()
            labels.add(operation.label)
            for mode in GenerationMode:
                _fuzz(target, operation, mode, tally)
    report = f"{tally.requests} requests in {time.perf_counter() - started:.1f} s\n{tally.table()}"
    print(report)
    assert not tally.failures, "\n\n".join(tally.failures[:10]) + f"\n\n{report}"
    assert tally.requests >= MIN_REQUESTS, report
    called = {label for (_, label, _), counts in tally.statuses.items() if counts}
    assert called == labels, f"never called: {sorted(labels - called)}"
    text_only = {label for (app, label, _) in tally.statuses if app == "text-only"}
    assert text_only == set(IMAGE_OPERATIONS), text_only
    for label, share in MOSTLY_ACCEPTED.items():
        accepted = tally.accepted_share(label)
        print(f"{label}: {accepted:.2f} of the unexplained answers 2xx (at least {share})")
        assert accepted >= share, f"{label}: too few 2xx ({accepted:.2f})\n{report}"
