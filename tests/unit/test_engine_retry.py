"""An engine replica whose engine died: the ingress tries the request on another one.

The client is :class:`ServeEngineClient` as the ingress builds it, over a handle whose
replicas are scripted: ``dead`` ones raise what an engine replica raises when its vLLM
engine is gone (through Ray, as a ``RayTaskError`` of it), before or after a chunk. A
resumable request that had sent something goes on elsewhere as a continuation; one that
is not resumable ends with an error naming the crash.
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import AsyncIterator
from typing import Any

import pytest
from ray.exceptions import ActorDiedError, RayTaskError
from ray.serve.exceptions import BackPressureError

from cloudllm_serve.engine.protocol import (
    ChoiceDelta,
    EngineDeadError,
    GenerationChunk,
    GenerationRequest,
    SamplingOptions,
)
from cloudllm_serve.errors import EngineOverloadedError, EngineUnavailableError
from cloudllm_serve.ingress import engine_client
from cloudllm_serve.ingress.engine_client import ENGINE_RETRIES, ServeEngineClient
from cloudllm_serve.settings import Settings

CHUNK = GenerationChunk(finished=True)
#: A chunk of a resumable request: one token, its id reported.
TOKEN = GenerationChunk(choices=(ChoiceDelta(0, " a", 1, token_ids=[7]),))


def through_ray(error: Exception) -> Exception:
    """``error`` as a Serve handle raises it in the caller (Ray's wrapping of it)."""
    wrapped: Exception = RayTaskError("generate", "Traceback ...", error).as_instanceof_cause()
    return wrapped


class ScriptedMethod:
    """``handle.generate``: each ``remote`` call plays the next script entry.

    An entry is ``"ok"`` (one chunk), ``"dead"`` (engine dead before anything),
    ``"dead-after-chunk"``, or ``"actor-gone"`` (the replica's process died).
    """

    def __init__(self, script: list[str]) -> None:
        self.script = script
        self.calls: list[GenerationRequest] = []

    def remote(self, request: GenerationRequest) -> AsyncIterator[list[GenerationChunk]]:
        self.calls.append(request)
        return self._play(self.script[len(self.calls) - 1], f"replica-{len(self.calls)}")

    async def _play(self, step: str, replica: str) -> AsyncIterator[list[GenerationChunk]]:
        if step == "dead":
            raise through_ray(EngineDeadError(replica, "EngineDeadError: EngineCore died"))
        if step == "actor-gone":
            raise ActorDiedError()
        if step == "busy":
            raise BackPressureError(num_queued_requests=2, max_queued_requests=2)
        if step == "dead-after-chunk":
            yield [TOKEN]
            raise through_ray(EngineDeadError(replica, "EngineDeadError: EngineCore died"))
        yield [CHUNK]


class ScriptedHandle:
    deployment_name = "EngineServer"

    def __init__(self, script: list[str]) -> None:
        self.generate = ScriptedMethod(script)

    def options(self, **_: Any) -> ScriptedHandle:
        return self


def run(
    script: list[str], sampling: SamplingOptions | None = None
) -> tuple[list[Any], ScriptedMethod, list[str], list[str]]:
    """Chunks (or the error) one generation gets, the calls made, the retries and the
    outcomes of replicas dying after something was sent."""
    handle = ScriptedHandle(script)
    client = ServeEngineClient(handle, Settings(), app_name="test")
    retried: list[str] = []
    resumed: list[str] = []
    client.on_retry = retried.append
    client.on_resume = resumed.append
    request = GenerationRequest(request_id="r1", sampling=sampling or SamplingOptions(max_tokens=4))

    async def collect() -> list[Any]:
        got: list[Any] = []
        try:
            async for batch in client.generate(request):
                got += batch
        except (EngineUnavailableError, EngineOverloadedError) as error:
            got.append(error)
        return got

    return asyncio.run(collect()), handle.generate, retried, resumed


def test_a_request_unheard_by_a_dead_engine_is_tried_elsewhere() -> None:
    got, method, retried, _ = run(["dead", "ok"])
    assert got == [CHUNK]
    assert retried == ["replica-1"]
    assert [call.avoid_replicas for call in method.calls] == [(), ("replica-1",)]


def test_each_dead_replica_is_avoided_and_tries_are_bounded() -> None:
    got, method, retried, _ = run(["dead"] * (ENGINE_RETRIES + 1))
    assert len(method.calls) == ENGINE_RETRIES + 1
    assert method.calls[-1].avoid_replicas == ("replica-1", "replica-2")
    assert isinstance(got[-1], EngineUnavailableError)
    assert f"{ENGINE_RETRIES + 1} tries" in str(got[-1])
    assert retried == ["replica-1", "replica-2"]


def test_a_replica_actor_gone_is_tried_again() -> None:
    got, method, _, _ = run(["actor-gone", "ok"])
    assert got == [CHUNK] and len(method.calls) == 2


def test_a_stream_that_had_sent_tokens_continues_after_them_elsewhere() -> None:
    got, method, retried, resumed = run(["dead-after-chunk", "ok"])
    assert got == [TOKEN, CHUNK]
    assert [(c.resume_token_ids, c.avoid_replicas) for c in method.calls] == [
        ((), ()),
        ((7,), ("replica-1",)),
    ]
    assert all(c.resumable for c in method.calls)
    assert resumed == ["resumed"] and retried == []


def test_continuations_are_bounded_with_the_retries() -> None:
    got, method, _, resumed = run(["dead-after-chunk"] * (ENGINE_RETRIES + 1))
    assert got[:-1] == [TOKEN] * (ENGINE_RETRIES + 1)
    assert isinstance(got[-1], EngineUnavailableError)
    assert "the engine died while generating" in str(got[-1]) and "no try" in str(got[-1])
    assert method.calls[-1].resume_token_ids == (7,) * ENGINE_RETRIES
    assert resumed == ["resumed"] * ENGINE_RETRIES + ["exhausted"]


def test_a_continuation_waits_for_room_where_a_new_request_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(engine_client, "RETRY_PAUSE_S", 0.0)
    got, method, _, resumed = run(["dead-after-chunk", "busy", "busy", "ok"])
    assert got == [TOKEN, CHUNK] and len(method.calls) == 4
    assert resumed == ["resumed"]
    got, _, _, _ = run(["busy", "ok"])
    assert len(got) == 1 and isinstance(got[0], EngineOverloadedError)


def test_a_stream_that_cannot_resume_ends_with_an_error_naming_the_crash() -> None:
    schema = SamplingOptions(max_tokens=4, json_schema={"type": "object"})
    got, method, retried, resumed = run(["dead-after-chunk", "ok"], schema)
    assert got[0] == TOKEN and isinstance(got[1], EngineUnavailableError)
    assert "the engine died while generating" in str(got[1])
    assert "structured output" in str(got[1])
    assert len(method.calls) == 1 and not method.calls[0].resumable
    assert retried == [] and resumed == ["not_resumable"]


@pytest.mark.parametrize("replica", ["abc123", ""])
def test_the_engine_dead_error_crosses_ray_with_its_replica(replica: str) -> None:
    error = pickle.loads(pickle.dumps(EngineDeadError(replica, "gone")))
    assert (error.replica_id, error.reason) == (replica, "gone")
    assert isinstance(through_ray(error), EngineDeadError)


def test_a_replica_actor_gone_is_named_from_rays_message() -> None:
    """Ray's ActorDiedError for a Serve replica names it: that replica is avoided."""
    from ray.core.generated.common_pb2 import ActorDiedErrorContext

    from cloudllm_serve.ingress.engine_client import _lost_replica

    context = ActorDiedErrorContext(
        class_name="ServeReplica:cloudllm:EngineServer",
        name="SERVE_REPLICA::cloudllm#EngineServer#j1c8dwti",
        actor_id=b"\x01" * 16,
        ray_namespace="serve",
    )
    assert _lost_replica(ActorDiedError(context)) == "j1c8dwti"
    assert _lost_replica(ActorDiedError()) == ""  # no name: tried again after a pause
    assert _lost_replica(ValueError("SERVE_REPLICA::a#b#c")) is None
