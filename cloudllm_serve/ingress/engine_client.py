"""An :class:`~cloudllm_serve.engine.protocol.EngineClient` over a Serve deployment handle.

Ray and Serve failures (no replica, a replica that died mid-stream) become
:class:`~cloudllm_serve.errors.EngineUnavailableError` here, and a full queue
(Serve's ``BackPressureError``) becomes
:class:`~cloudllm_serve.errors.EngineOverloadedError`, so the service sees only the
project's own errors.

A request that got nothing from its replica because that replica's engine died
(:class:`~cloudllm_serve.engine.protocol.EngineDeadError`) or its actor is gone is
tried again, at most :data:`ENGINE_RETRIES` times, with the dead replica in its
``avoid_replicas`` so the router sends it elsewhere (an actor that is gone is named in
Ray's error; a retry whose replica could not be named waits :data:`RETRY_PAUSE_S` first,
for Serve's router to drop it). Once anything has been relayed to the client, a
resumable request whose replica died goes on as a continuation on another replica, within
the same bound (:mod:`cloudllm_serve.ingress.stream_resume`); any other failure ends the
stream with an error.

The fleet view asks Serve's controller for the engine deployment's status and
replicas, then each running replica for its live stats. That call goes to the replica
actor's ``record_routing_stats`` method directly, beside the request queue, so a
replica with a full batch still answers ``/health`` at once. Replicas are named by their
Ray node's name, and nodes Ray lost are listed (:mod:`cloudllm_serve.cluster_nodes`).
A request whose first item is slow while no replica runs at all is refused
(:mod:`cloudllm_serve.ingress.unserved`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from cloudllm_serve.cluster_nodes import ClusterNode, lost_nodes, node_names, read_nodes
from cloudllm_serve.engine.protocol import (
    EngineDeadError,
    EngineFleet,
    EngineModelInfo,
    EngineStats,
    GenerationChunk,
    GenerationRequest,
    OpenAICall,
    OpenAIItem,
    ReplicaStatus,
)
from cloudllm_serve.errors import EngineOverloadedError, EngineUnavailableError
from cloudllm_serve.ingress.context import current_request
from cloudllm_serve.ingress.stream_resume import (
    Continuation,
    generation_blocker,
    openai_blocker,
)
from cloudllm_serve.ingress.unserved import ENDED, first_item
from cloudllm_serve.placement import capacity_problem
from cloudllm_serve.ray_serve_internals import (
    SERVE_NAMESPACE,
    replica_id_in_error,
    serve_instance_details,
)
from cloudllm_serve.settings import Settings

#: How long a controller answer is reused (``/health`` may be polled often).
DETAILS_TTL_S = 1.0
#: How often a request is tried again after its replica's engine died under it.
ENGINE_RETRIES = 2
#: Pause before a retry whose dead replica could not be named (so not avoided).
RETRY_PAUSE_S = 0.5
#: How often a continuation refused for a full queue waits RETRY_PAUSE_S and tries again.
CONTINUATION_WAITS = 20

logger = logging.getLogger(__name__)
CallT = TypeVar("CallT", GenerationRequest, OpenAICall)


#: Outcomes of ``cloudllm_stream_resumes_total``: a request that had sent its client
#: something when its replica died went on elsewhere, could not (not resumable), or had
#: no try left.
RESUME_OUTCOMES = ("resumed", "not_resumable", "exhausted")


class ReplicaLost(Exception):
    """A try's replica died (``replica_id`` when known)."""

    def __init__(self, replica_id: str, description: str) -> None:
        super().__init__(description)
        self.replica_id = replica_id
        self.description = description


def _describe(error: BaseException) -> str:
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first_line[:300]}"


class ServeEngineClient:
    """Talks to the engine deployment through a ``DeploymentHandle``."""

    def __init__(
        self, handle: Any, settings: Settings, *, app_name: str, stats_timeout_s: float = 3.0
    ) -> None:
        self._handle = handle
        self._stream_handle = handle.options(stream=True)
        #: Answers that never change while the deployment runs, by method name.
        self._asked: dict[str, Any] = {}
        self._deployment = str(handle.deployment_name)
        self._app_name = app_name
        self._settings = settings
        self._stats_timeout_s = stats_timeout_s
        self._details: tuple[float, dict[str, Any]] | None = None
        self._nodes: tuple[float, list[ClusterNode]] | None = None
        self._actors: dict[str, Any] = {}
        #: Called with the dead replica's id each time a request is tried again.
        self.on_retry: Callable[[str], None] | None = None
        #: Called with an outcome of :data:`RESUME_OUTCOMES` each time a replica dies
        #: under a request that had sent its client something.
        self.on_resume: Callable[[str], None] | None = None

    def generate(self, request: GenerationRequest) -> AsyncIterator[list[GenerationChunk]]:
        """Stream one generation from an engine replica, in the batches it sends."""
        blocker = generation_blocker(request)
        if blocker is None:
            request = dataclasses.replace(request, resumable=True)
        return self._retrying(request, self._stream_handle.generate.remote, blocker)

    def openai(self, call: OpenAICall) -> AsyncIterator[list[OpenAIItem]]:
        """Stream one ``/v1`` call's items from an engine replica, in the batches it sends."""
        blocker = openai_blocker(call.kind, call.body)
        if blocker is None:
            call = dataclasses.replace(call, resumable=True)
        return self._retrying(call, self._stream_handle.openai.remote, blocker)

    async def _retrying(
        self, call: CallT, send: Callable[[CallT], Any], blocker: str | None
    ) -> AsyncIterator[Any]:
        """``send(call)``'s stream; tried again elsewhere while its replica died unheard.

        A resumable call (``blocker`` ``None``) whose replica died after it had sent
        something goes on elsewhere as a continuation of what its client got.
        """
        continuation = None
        if blocker is None:
            streamed = (
                call.stream
                if isinstance(call, GenerationRequest)
                else (call.body.get("stream") is True)
            )
            continuation = Continuation(streamed=streamed)
        relayed = False
        attempt = waits = 0
        while True:
            try:
                async for batch in self._relay(send(call)):
                    if continuation is not None:
                        if isinstance(call, GenerationRequest):
                            continuation.generation_batch(batch)
                        else:
                            batch = continuation.openai_batch(batch)
                            if not batch:
                                continue
                    relayed = True
                    yield batch
                return
            except EngineOverloadedError:
                # A continuation is an answer under way: it waits for room a while.
                if continuation is None or not continuation.started:
                    raise
                waits += 1
                if waits > CONTINUATION_WAITS:
                    raise
                await asyncio.sleep(RETRY_PAUSE_S)
                continue
            except ReplicaLost as lost:
                started = continuation.started if continuation is not None else relayed
                if started and continuation is None:
                    self._resume_outcome("not_resumable")
                    raise EngineUnavailableError(
                        f"the engine died while generating ({lost.description}); this "
                        f"request cannot continue on another replica ({blocker}): send it "
                        "again"
                    ) from None
                if attempt == ENGINE_RETRIES:
                    if started:
                        self._resume_outcome("exhausted")
                        raise EngineUnavailableError(
                            f"the engine died while generating ({lost.description}); no try "
                            f"is left to continue it on another replica ({attempt + 1} tries)"
                        ) from None
                    raise EngineUnavailableError(
                        f"engine unavailable: {lost.description} ({attempt + 1} tries)"
                    ) from None
                if started and continuation is not None:
                    logger.warning(
                        "request %s: %s after %d tokens; continuing on another engine replica",
                        call.request_id,
                        lost.description,
                        len(continuation.token_ids),
                    )
                    call = continuation.resumed(call)
                    self._resume_outcome("resumed")
                else:
                    logger.warning(
                        "request %s: %s; trying another engine replica",
                        call.request_id,
                        lost.description,
                    )
                    if self.on_retry is not None:
                        self.on_retry(lost.replica_id)
                if lost.replica_id:
                    avoided = (*call.avoid_replicas, lost.replica_id)
                    call = dataclasses.replace(call, avoid_replicas=avoided)
                else:
                    # Give Serve's router time to drop the replica it cannot be told to avoid.
                    await asyncio.sleep(RETRY_PAUSE_S)
                attempt += 1

    def _resume_outcome(self, outcome: str) -> None:
        """Count a replica's death under a request that had started (and audit a move)."""
        if self.on_resume is not None:
            self.on_resume(outcome)
        context = current_request.get()
        if outcome == "resumed" and context is not None:
            context.resumes += 1

    async def _ask_once(self, method: str) -> Any:
        """An engine replica's answer to ``method`` (asked once, then remembered)."""
        if method not in self._asked:
            try:
                self._asked[method] = await getattr(self._handle, method).remote()
            except Exception as error:
                raise EngineUnavailableError(f"engine unavailable: {_describe(error)}") from None
        return self._asked[method]

    async def models(self) -> dict[str, Any]:
        """``GET /v1/models`` from an engine replica (asked once, then remembered)."""
        models: dict[str, Any] = await self._ask_once("models")
        return models

    async def model_info(self) -> EngineModelInfo:
        """What the served model can take, from an engine replica (asked once)."""
        info: EngineModelInfo = await self._ask_once("model_info")
        return info

    async def _relay(self, items: Any) -> AsyncIterator[Any]:
        """A handle's stream, its failures turned into the project's errors."""
        from ray.serve.exceptions import BackPressureError

        try:
            first = await first_item(items, self._unserved)
            if first is ENDED:
                return
            yield first
            async for item in items:
                yield item
        except asyncio.CancelledError:
            raise
        except BackPressureError:
            raise EngineOverloadedError(
                "every engine replica is busy and the queue in front of them is full "
                f"(ENGINE_MAX_QUEUED_REQUESTS={self._settings.ENGINE_MAX_QUEUED_REQUESTS} "
                "per ingress replica); retry later",
                status_code=self._settings.OVERLOAD_STATUS_CODE,
                retry_after_s=self._settings.OVERLOAD_RETRY_AFTER_S,
            ) from None
        except EngineUnavailableError:
            raise
        except Exception as error:
            lost = _lost_replica(error)
            if lost is not None:
                raise ReplicaLost(lost, _describe(error)) from None
            raise EngineUnavailableError(f"engine unavailable: {_describe(error)}") from None

    async def fleet(self) -> EngineFleet:
        """The engine deployment's status, its replicas, and each running one's stats."""
        try:
            details = await asyncio.wait_for(self._serve_details(), self._stats_timeout_s)
            deployment = details["applications"][self._app_name]["deployments"][self._deployment]
        except Exception as error:
            raise EngineUnavailableError(
                f"Serve's controller did not describe the engine deployment: {_describe(error)}"
            ) from None
        listed = deployment.get("replicas", [])
        current = {str(r.get("actor_name")) for r in listed}
        self._actors = {name: a for name, a in self._actors.items() if name in current}
        replicas, nodes = await asyncio.gather(
            asyncio.gather(*(self._replica_status(r) for r in listed)), self._cluster_nodes()
        )
        names = node_names(nodes)
        replicas = [dataclasses.replace(r, node_name=names.get(r.node_id or "")) for r in replicas]
        running = any(r.state == "RUNNING" for r in replicas)
        live = [node.resources for node in nodes if node.alive]
        return EngineFleet(
            status=_name(deployment.get("status", "UNKNOWN")),
            message=str(deployment.get("message", "")),
            target_replicas=deployment.get("target_num_replicas"),
            replicas=sorted(replicas, key=lambda r: (r.state != "RUNNING", r.replica_id)),
            capacity_problem=None
            if running or not nodes
            else capacity_problem(self._settings, live),
            status_trigger=_name(deployment.get("status_trigger", "")),
            lost_nodes=lost_nodes(nodes),
        )

    async def _cluster_nodes(self) -> list[ClusterNode]:
        """Ray's node table (reused for ``DETAILS_TTL_S``; empty when it cannot be read)."""
        now = time.monotonic()
        if self._nodes is not None and now - self._nodes[0] < DETAILS_TTL_S:
            return self._nodes[1]
        try:
            nodes = await asyncio.wait_for(asyncio.to_thread(read_nodes), self._stats_timeout_s)
        except Exception as error:
            logger.warning("Ray's node table could not be read: %s", _describe(error))
            nodes = []
        self._nodes = (now, nodes)
        return nodes

    async def _unserved(self) -> str | None:
        """Why no engine replica can take a request now, or ``None`` when one will soon.

        ``None`` while a replica runs, and while one starts and no node is lost (a
        redeploy, a replica replaced on live nodes): the request keeps its place. With a
        node lost and no replica running, a starting replica may be waiting for that
        node's resources, which may never come back: refused. Serve's controller is asked
        (its answer shared for ``DETAILS_TTL_S``); when it cannot be asked, the request
        waits.
        """
        try:
            details = await asyncio.wait_for(self._serve_details(), self._stats_timeout_s)
            deployment = details["applications"][self._app_name]["deployments"][self._deployment]
        except Exception:
            return None
        replicas = deployment.get("replicas", [])
        states = {_name(r.get("state")) for r in replicas}
        if "RUNNING" in states:
            return None
        lost = ", ".join(node.public_name for node in lost_nodes(await self._cluster_nodes()))
        if "STARTING" in states and not lost:
            return None
        return (
            "engine unavailable: no engine replica is running (deployment "
            f"{_name(deployment.get('status', 'UNKNOWN'))}; replicas: "
            f"{', '.join(sorted(states)) or 'none'}"
            + (f"; node lost: {lost}" if lost else "")
            + "); retry later"
        )

    async def _serve_details(self) -> dict[str, Any]:
        now = time.monotonic()
        if self._details is not None and now - self._details[0] < DETAILS_TTL_S:
            return self._details[1]
        details = await serve_instance_details()
        if details is None:
            raise EngineUnavailableError("not connected to Serve")
        self._details = (now, details)
        return details

    async def _replica_status(self, replica: dict[str, Any]) -> ReplicaStatus:
        status = ReplicaStatus(
            replica_id=str(replica.get("replica_id", "")),
            state=_name(replica.get("state", "UNKNOWN")),
            node_ip=replica.get("node_ip"),
            node_id=replica.get("node_id"),
            pid=replica.get("pid"),
            started_at=replica.get("start_time_s"),
        )
        if status.state != "RUNNING" or not replica.get("actor_name"):
            return status
        try:
            actor = await self._actor(str(replica["actor_name"]))
            values = await asyncio.wait_for(
                actor.record_routing_stats.remote(), self._stats_timeout_s
            )
            stats = EngineStats.from_dict(values)
        except Exception as error:
            return dataclasses.replace(status, error=f"stats unavailable: {_describe(error)}")
        return dataclasses.replace(status, stats=stats)

    async def _actor(self, name: str) -> Any:
        """A replica's actor handle; the first lookup (a blocking GCS call) off the loop."""
        if name not in self._actors:
            import ray

            self._actors[name] = await asyncio.to_thread(
                ray.get_actor, name, namespace=SERVE_NAMESPACE
            )
        return self._actors[name]


def _lost_replica(error: BaseException) -> str | None:
    """The replica (id, or "" when unknown) whose death ``error`` reports, else ``None``.

    An engine replica raises :class:`EngineDeadError` (Ray hands it over wrapped, as an
    instance of it or with it as ``cause``); a replica actor that is gone gives Ray's
    ``RayActorError`` (``ActorDiedError``, ``ActorUnavailableError``).
    """
    from ray.exceptions import RayActorError

    for candidate in (error, getattr(error, "cause", None)):
        if isinstance(candidate, EngineDeadError):
            return candidate.replica_id
    if not isinstance(error, RayActorError):
        return None
    return replica_id_in_error(error)


def _name(value: Any) -> str:
    """An enum member's value (Serve's details hold enums), else the string."""
    return str(getattr(value, "value", value))
