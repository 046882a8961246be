"""Access control and the access trail, as one pure-ASGI middleware.

For every HTTP request it

* takes ``X-Request-Id`` (letters, digits, ``._:-``, at most 128) or makes one, and
  returns it on the answer;
* with keys configured, authenticates ``Authorization: Bearer <key>`` on every path
  except :data:`PUBLIC_PATHS` and ``OPTIONS``: deny by default, so a route added
  later is protected unless it is declared public here. 401 carries
  ``WWW-Authenticate: Bearer`` and the body of the API the path belongs to;
* adds the ``x-ratelimit-*`` headers of the request's admission to the answer (on a
  stream, with the headers, before the first byte);
* when the answer is done, settles the rate-limit charge with the real token count (in
  the background, off the request's path) and writes the audit line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid

from cloudllm_serve.errors import AuthenticationError
from cloudllm_serve.ingress.audit import AuditLog
from cloudllm_serve.ingress.context import SCOPE_KEY, RequestContext, current_request
from cloudllm_serve.ingress.errors import OPENAI_PREFIX, error_headers, openai_error, seed_error
from cloudllm_serve.ingress.middleware import ASGIApp, Message, Receive, Scope, Send
from cloudllm_serve.ingress.rate_limits import RateLimiter
from cloudllm_serve.keys import KeyRegistry
from cloudllm_serve.metrics import IngressMetrics, api_of

logger = logging.getLogger(__name__)

#: Paths anyone may call when keys are on, and the docs pages' assets under
#: PUBLIC_PREFIX. Everything else needs a key.
PUBLIC_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
PUBLIC_PREFIX = "/docs/static/"
REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

MISSING_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
MALFORMED_HEADER = "Malformed Authorization header: expected 'Authorization: Bearer YOUR_KEY'."
WRONG_KEY = "Incorrect API key provided."


def bearer_key(header: bytes | None) -> tuple[str | None, str | None]:
    """``(key, None)`` from an ``Authorization`` value, else ``(None, problem)``."""
    if header is None:
        return None, MISSING_KEY
    try:
        text = header.decode("ascii").strip()
    except UnicodeDecodeError:
        return None, MALFORMED_HEADER
    scheme, _, key = text.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key or " " in key:
        return None, MALFORMED_HEADER
    return key, None


class AccessMiddleware:
    """Request id, authentication, rate-limit headers, settling, metrics and the audit log."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        registry: KeyRegistry,
        limiter: RateLimiter,
        audit: AuditLog,
        metrics: IngressMetrics | None = None,
        add_request_id: bool = True,
    ) -> None:
        self.app = app
        self.registry = registry
        self.limiter = limiter
        self.audit = audit
        self.metrics = metrics or IngressMetrics()
        self.add_request_id = add_request_id
        self._background: set[asyncio.Task[None]] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        incoming = headers.get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        context = RequestContext(
            request_id=incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        )
        scope.setdefault("state", {})[SCOPE_KEY] = context
        current_request.set(context)
        status: list[int] = []

        streaming: list[bool] = []

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
                content_type = dict(message.get("headers") or []).get(b"content-type", b"")
                streaming.append(content_type.startswith(b"text/event-stream"))
                # Inside Serve, Serve's own layer adds the same header (with the same id).
                extra = [(REQUEST_ID_HEADER, context.request_id)] if self.add_request_id else []
                if context.admission is not None:
                    extra += context.admission.headers()
                message["headers"] = [
                    *message.get("headers", []),
                    *((name.encode(), value.encode()) for name, value in extra),
                ]
            elif streaming and streaming[0] and message.get("body"):
                # The first event of a stream carries the first token (an error event
                # instead means no token: still the first byte a client sees).
                streaming[0] = False
                self.metrics.time_to_first_token.add(
                    time.perf_counter() - started, api=api_of(str(scope["path"]))
                )
            await send(message)

        try:
            if self._public(scope):
                context.decision = "public" if self.registry.enabled else "open"
            else:
                key, problem = bearer_key(headers.get(b"authorization"))
                principal = self.registry.authenticate(key) if key is not None else None
                if principal is None:
                    context.decision = "unauthenticated"
                    self.metrics.refusals.add(reason="auth")
                    await self._refuse(scope, sending, AuthenticationError(problem or WRONG_KEY))
                    return
                context.principal = principal
                context.decision = "allowed"
            await self.app(scope, receive, sending)
        finally:
            self._finish(scope, context, status[0] if status else 500, started)

    def _measure(self, scope: Scope, context: RequestContext, status: int, started: float) -> None:
        """Request, duration and token metrics of one answered request."""
        path = str(scope.get("path", ""))
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        api = api_of(path)
        metrics = self.metrics
        metrics.requests.add(api=api, route=route, status=str(status))
        metrics.request_duration.add(time.perf_counter() - started, api=api, route=route)
        tenant = context.principal.tenant_id if context.principal else ""
        if context.prompt_tokens:
            metrics.tokens.add(context.prompt_tokens, kind="prompt", tenant=tenant)
        if context.completion_tokens:
            metrics.tokens.add(context.completion_tokens, kind="completion", tenant=tenant)

    def _public(self, scope: Scope) -> bool:
        return (
            not self.registry.enabled
            or scope["method"] == "OPTIONS"
            or scope["path"] in PUBLIC_PATHS
            or str(scope["path"]).startswith(PUBLIC_PREFIX)
        )

    async def _refuse(self, scope: Scope, send: Send, error: AuthenticationError) -> None:
        openai = str(scope.get("path", "")).startswith(OPENAI_PREFIX)
        body = openai_error(error) if openai else seed_error(error)
        payload = json.dumps(body).encode()
        await send(
            {
                "type": "http.response.start",
                "status": error.status_code,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    *((k.encode(), v.encode()) for k, v in error_headers(error).items()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    def _finish(self, scope: Scope, context: RequestContext, status: int, started: float) -> None:
        if context.ticket is not None:
            context.ticket.release()
        admission = context.admission
        if admission is not None:
            used = context.settled_tokens(admission.charged_tokens)
            task = asyncio.ensure_future(self.limiter.settle(admission, used))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        route = scope.get("route")
        principal = context.principal
        self._measure(scope, context, status, started)
        if not self.audit.enabled:
            return
        client = scope.get("client")
        self.audit.write(
            {
                "request_id": context.request_id,
                "internal_id": context.internal_id,
                "tenant": principal.tenant_id if principal else None,
                "key_id": principal.key_id if principal else None,
                "client": client[0] if client else None,
                "method": scope.get("method"),
                "route": getattr(route, "path", None) or "(no route)",
                "status": status,
                "decision": context.decision,
                "conversation_id": context.conversation_id,
                "prompt_tokens": context.prompt_tokens,
                "completion_tokens": context.completion_tokens,
                "resumes": context.resumes,
                "latency_ms": round((time.perf_counter() - started) * 1000, 3),
            }
        )
