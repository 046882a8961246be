"""A pure-ASGI middleware: arrival time, body-size and body-time limits.

A body may hold ``MAX_UPLOAD_BYTES``; on ``/vision`` and ``/multimodal`` it may hold
``MAX_IMAGES_PER_REQUEST`` images of that size each, base64-encoded (each image is then
held to ``MAX_UPLOAD_BYTES`` by :mod:`cloudllm_serve.ingress.images`).

Pure ASGI (not ``BaseHTTPMiddleware``) so it adds no task or copy per request and
does not get in the way of streamed responses.

The body must arrive within ``REQUEST_BODY_TIMEOUT_S`` of the request's start (its
headers read): a client that stalls its body gets a 408 and the connection is closed.
Neither Ray Serve nor uvicorn bounds that time (docs/deployment.md, "Timeouts").
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException

from cloudllm_serve.errors import PayloadTooLargeError
from cloudllm_serve.ingress.errors import OPENAI_PREFIX, openai_error
from cloudllm_serve.settings import Settings

#: ASGI types, shared by this module and :mod:`.access`.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

RECEIVED_AT = "cloudllm_received_at"
#: Routes whose bodies carry uploaded images.
IMAGE_ROUTES = frozenset({"/vision", "/multimodal"})
#: Room for the other fields and multipart framing of an image request.
_IMAGE_BODY_SLACK = 64 * 1024


def image_body_limit(settings: Settings) -> int:
    """The largest body of an image route: its images at their size limit, base64-encoded."""
    per_image = -(-settings.MAX_UPLOAD_BYTES * 4 // 3)
    return per_image * settings.MAX_IMAGES_PER_REQUEST + _IMAGE_BODY_SLACK


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def _too_large_body(scope: Scope, message: str) -> dict[str, Any]:
    error = PayloadTooLargeError(message, param="body")
    if str(scope.get("path", "")).startswith(OPENAI_PREFIX):
        return openai_error(error)
    return {"detail": message, "error_type": "payload_too_large", "param": "body"}


class RequestLimitsMiddleware:
    """Stamps ``scope['state'][RECEIVED_AT]`` and holds request bodies to their limits.

    A body over ``max_body_bytes`` is a 413; one not in within ``body_timeout_s`` of the
    request's start a 408 (``None``: no deadline).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        image_body_bytes: int | None = None,
        body_timeout_s: float | None = None,
    ) -> None:
        self.app = app
        self.body_timeout_s = body_timeout_s
        self.max_body_bytes = max_body_bytes
        self.image_body_bytes = image_body_bytes or max_body_bytes

    def _too_large_message(self, limit: int) -> str:
        if limit == self.max_body_bytes:
            return f"request body is larger than MAX_UPLOAD_BYTES ({limit} bytes)"
        return (
            f"request body is larger than {limit} bytes (MAX_IMAGES_PER_REQUEST images of "
            "MAX_UPLOAD_BYTES each, base64-encoded)"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})[RECEIVED_AT] = time.perf_counter()
        limit = self.image_body_bytes if scope.get("path") in IMAGE_ROUTES else self.max_body_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_json(send, 413, _too_large_body(scope, self._too_large_message(limit)))
            return

        received = 0
        receive_in_time = self._deadline_receive(receive)

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive_in_time()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # HTTPException passes FastAPI's body parsing untouched and is
                    # rendered by the app's handler.
                    raise HTTPException(413, detail=self._too_large_message(limit))
            return message

        await self.app(scope, limited_receive, send)

    def _deadline_receive(self, receive: Receive) -> Receive:
        """``receive`` that raises a 408 when the body is not in by the deadline.

        Once the body is complete, later calls (waiting for a disconnect while a
        response streams) have no deadline.
        """
        timeout_s = self.body_timeout_s
        if timeout_s is None:
            return receive
        deadline = asyncio.get_running_loop().time() + timeout_s
        body_done = False

        async def receive_in_time() -> Message:
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                # Rendered by the app's handler, like the 413 above; the connection is
                # closed after the answer (the rest of the body may never come).
                raise HTTPException(
                    408,
                    detail="the request body did not arrive within REQUEST_BODY_TIMEOUT_S "
                    f"({timeout_s:g} s)",
                    headers={"Connection": "close"},
                ) from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        return receive_in_time
