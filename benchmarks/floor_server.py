"""The floor of the serving-layer comparison: the simulated engine behind one plain server.

One process, no Ray: a Starlette app under uvicorn that runs the project's own
:class:`~cloudllm_serve.engine.vllm_engine.VLLMEngine` with ``LLM_MODEL=sim`` (the
simulated engine, :mod:`cloudllm_serve.engine.simulated`) in its own event loop and
hands each request straight to vLLM's OpenAI serving layer through
``VLLMEngine.openai``. Whatever a serving layer (Ray Serve, the project's ingress,
Ray Serve LLM) adds on top of the same engine is measured against this.

Routes: ``POST /v1/chat/completions`` (streamed as vLLM's SSE strings, one HTTP chunk
each, or one JSON answer), ``GET /v1/models`` and ``GET /health``.

Settings: ``LLM_MODEL=sim``, ``ENGINE_DEVICE=cpu``, ``VLLM_BLOCK_SIZE=32`` and
``METRICS_ENABLED=false`` are fixed; the ``SIM_*`` variables (``SIM_PRESET=ceiling``,
``SIM_STEP_MS``, ...) and ``VLLM_MAX_NUM_SEQS`` come from the environment. vLLM's
per-request log lines (``AsyncLLM.log_requests``) and uvicorn's access log are off.

Usage::

    SIM_PRESET=ceiling VLLM_MAX_NUM_SEQS=256 python -m benchmarks.floor_server --port 8103
    # ... prints "READY http://127.0.0.1:8103" once it listens; SIGTERM or SIGINT stop it
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from types import FrameType
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from cloudllm_serve.engine.protocol import OpenAIAnswer, OpenAICall, OpenAIItem, OpenAIStreamEnd
from cloudllm_serve.engine.vllm_engine import VLLMEngine
from cloudllm_serve.settings import Settings, load_settings

#: Settings the floor always runs with (environment variables of the same name lose).
FIXED_SETTINGS: dict[str, Any] = {
    "LLM_MODEL": "sim",
    "ENGINE_DEVICE": "cpu",
    "VLLM_BLOCK_SIZE": "32",
    "METRICS_ENABLED": "false",
}
#: Settings the environment may change (as ``make serve`` runs vLLM on a CPU host).
DEFAULT_SETTINGS: dict[str, Any] = {
    "VLLM_ENFORCE_EAGER": True,
    "VLLM_KV_CACHE_MEMORY_BYTES": 1024**3,
}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
#: How long a stopping server lets open streams finish.
GRACEFUL_SHUTDOWN_S = 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description="The simulated engine behind one plain ASGI server (no Ray): the floor."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8103, help="port to listen on")
    return parser.parse_args(argv)


def floor_settings() -> Settings:
    """The engine's settings: :data:`FIXED_SETTINGS` over the environment."""
    for name in FIXED_SETTINGS:
        # Not exported: vLLM warns of VLLM_* variables it does not know.
        os.environ.pop(name, None)
    return load_settings({**DEFAULT_SETTINGS, **FIXED_SETTINGS})


def _error(status: int, message: str) -> JSONResponse:
    """An OpenAI-style error body."""
    return JSONResponse(
        {"error": {"message": message, "type": "invalid_request_error", "code": status}},
        status_code=status,
    )


async def _events(first: str, items: AsyncIterator[OpenAIItem]) -> AsyncIterator[str]:
    """The stream's SSE strings, ``first`` included; the engine's stream end is dropped."""
    try:
        yield first
        async for item in items:
            if isinstance(item, str):
                yield item
    finally:
        # The client went away (or the stream ended): vLLM aborts the request.
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()


def build_app(engine: VLLMEngine) -> Starlette:
    """The Starlette application over a started ``engine``."""

    async def chat_completions(request: Request) -> Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the request body is not valid JSON")
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object")
        # vLLM prefixes the id it answers with ("chatcmpl-...").
        call = OpenAICall(kind="chat", body=body, request_id=uuid.uuid4().hex)
        items = aiter(engine.openai(call))
        try:
            first = await anext(items)
        except StopAsyncIteration:
            return _error(500, "the engine ended the call without an answer")
        if isinstance(first, OpenAIAnswer):
            await _close(items)
            return JSONResponse(first.body, status_code=first.status)
        if isinstance(first, OpenAIStreamEnd):
            await _close(items)
            return _error(500, "the engine ended the stream before any event")
        return StreamingResponse(
            _events(first, items), media_type="text/event-stream", headers=SSE_HEADERS
        )

    async def models(request: Request) -> Response:
        return JSONResponse(await engine.models())

    async def health(request: Request) -> Response:
        if engine.dead():
            return JSONResponse({"status": "engine dead"}, status_code=503)
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ]
    )


async def _close(items: AsyncIterator[OpenAIItem]) -> None:
    aclose = getattr(items, "aclose", None)
    if aclose is not None:
        await aclose()


def _after_serving(signum: int, frame: FrameType | None) -> None:
    """What a signal that uvicorn already handled does when it raises it again: nothing."""


async def start_engine(settings: Settings) -> VLLMEngine:
    """Start the project's engine on the simulated core, vLLM's per-request logs off."""
    engine = VLLMEngine(settings)
    await engine.start()
    # AsyncLLM logs "Added request ..." per request unless told otherwise (as
    # `vllm serve` does without --enable-log-requests, and Ray Serve LLM does).
    async_llm = getattr(engine, "_engine", None)
    if async_llm is not None and hasattr(async_llm, "log_requests"):
        async_llm.log_requests = False
    return engine


async def serve(args: argparse.Namespace) -> int:
    """Start the engine, serve until SIGTERM or SIGINT, stop the engine; the exit code."""
    import uvicorn

    started = time.monotonic()
    engine = await start_engine(floor_settings())
    try:
        config = uvicorn.Config(
            build_app(engine),
            host=args.host,
            port=args.port,
            lifespan="off",
            access_log=False,
            log_level="warning",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
        server = uvicorn.Server(config)
        # uvicorn handles SIGTERM and SIGINT while it serves, then restores the handlers
        # it found and raises the signal again: these make that a no-op, so the engine
        # is shut down below and the exit code is 0 (the default would kill at once).
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, _after_serving)
        serving = asyncio.create_task(server.serve())
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if server.started:
            print(f"READY http://{args.host}:{args.port}", flush=True)
            print(f"startup took {time.monotonic() - started:.1f} s", flush=True)
        await serving
        return 0 if server.started else 1
    finally:
        print("shutting down", flush=True)
        engine.shutdown()


def main(argv: list[str] | None = None) -> int:
    """Run the floor server; returns the exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        try:
            code = runner.run(serve(args))
        except SystemExit as stop:  # uvicorn could not start (the port is taken): 3
            code = stop.code if isinstance(stop.code, int) else 1
    print("stopped", flush=True)
    return code


if __name__ == "__main__":
    exit_code = 1
    with contextlib.suppress(KeyboardInterrupt):
        exit_code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # The engine is shut down and the socket closed: nothing is left to clean up. The
    # interpreter's own teardown would only print noise (AsyncLLM.__del__ shutting down
    # again once its module's globals are gone: a frame kept by a stored traceback holds
    # the engine; nanobind's leak report of Triton's bindings).
    os._exit(exit_code)
