"""What the ingress knows about one request beyond its body: who, what was charged, usage.

The access middleware (:mod:`cloudllm_serve.ingress.access`) makes one per request and
keeps it in the ASGI scope; routes read it through :func:`request_context`, handlers
fill in the conversation and token counts, and the middleware settles the rate-limit
charge and writes the audit line from it when the response is done.
"""

from __future__ import annotations

import dataclasses
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import Request

from cloudllm_serve.errors import PermissionDeniedError
from cloudllm_serve.ingress.admission import AdmissionTicket
from cloudllm_serve.ingress.rate_limits import Admission
from cloudllm_serve.keys import Principal

SCOPE_KEY = "cloudllm_context"

#: How a request's token counts are known: ``none`` (the engine never got it),
#: ``counted`` (as its stream passed through), ``usage`` (the engine's own count),
#: ``unknown`` (a whole answer asked for and not received).
Metering = Literal["none", "counted", "usage", "unknown"]


@dataclass
class RequestContext:
    """One request's caller, rate-limit admission and outcome.

    ``request_id`` is the correlation id: the client's ``X-Request-Id`` when it sent one,
    returned on the answer and written in the audit line. Two requests may share it, so
    nothing that must tell requests apart uses it: that is ``internal_id``.
    """

    request_id: str
    #: Made by the server for this request alone: its concurrency slot (rate limits) and
    #: the engine's request id (vLLM's), never chosen by the client.
    internal_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    principal: Principal | None = None
    admission: Admission | None = None
    conversation_id: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: What access control decided: public, open (no keys configured), allowed,
    #: unauthenticated, forbidden, rate_limited:<reason>, overloaded:<reason>.
    decision: str = "open"
    #: How the token counts above are known; see :meth:`settled_tokens`.
    metering: Metering = "none"
    #: The admission's estimate: the prompt's part, and the most tokens it may generate.
    prompt_estimate: int = 0
    completion_estimate: int = 0
    #: How many times the generation moved to another engine replica, continuing its
    #: stream there after its engine died (:mod:`cloudllm_serve.ingress.stream_resume`).
    resumes: int = 0
    #: This request's place in the deadline admission, released when it is answered.
    ticket: AdmissionTicket | None = None

    @property
    def tenant_id(self) -> str | None:
        """The caller's tenant (``None`` when keys are off or the route is public)."""
        return self.principal.tenant_id if self.principal else None

    def record_usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        """The generation's real token counts (settled against the estimate, audited)."""
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.metering = "usage"

    def start_generation(self, *, stream: bool) -> None:
        """The engine was given the request: a stream is counted as it passes through."""
        if self.metering == "none":
            self.metering = "counted" if stream else "unknown"

    def count_tokens(self, completion_tokens: int, prompt_tokens: int | None = None) -> None:
        """Tokens of the engine's output as it passes through (before its usage is known)."""
        if self.metering == "usage":
            return
        self.metering = "counted"
        self.completion_tokens += completion_tokens
        if prompt_tokens:
            self.prompt_tokens = prompt_tokens

    def settled_tokens(self, charged: int) -> int:
        """What the generation costs the tenant, given the ``charged`` estimate.

        Nothing when the engine never got it; the engine's usage when known; else (a
        stream dropped, cut off by ``REQUEST_TIMEOUT_S`` or failed midway) the prompt
        and the tokens counted as they passed, at most the estimate's completion part;
        and the whole estimate when a whole answer was cut off (its count is unknown).
        """
        if self.metering in ("none", "usage"):
            return self.prompt_tokens + self.completion_tokens
        if self.metering == "unknown":
            return charged
        prompt = self.prompt_tokens or self.prompt_estimate
        return prompt + min(self.completion_tokens, self.completion_estimate)

    def detach(self) -> RequestContext:
        """A copy that owns this request's rate-limit admission and engine ticket.

        For a generation that outlives its HTTP request (a background response): this
        context then settles and releases nothing when its answer is done.
        """
        owned = dataclasses.replace(self)
        self.admission = None
        self.ticket = None
        return owned

    def require_admin(self) -> None:
        """403 unless the caller's key is an admin key (or keys are off)."""
        if self.principal is not None and not self.principal.tenant.admin:
            self.decision = "forbidden"
            raise PermissionDeniedError(
                f"this route needs an admin key; tenant '{self.principal.tenant_id}' is not an "
                "admin (set admin: true in API_KEYS_FILE)"
            )


#: The request being handled (set by the access middleware for the request's task), for
#: code that has no scope at hand (the engine client counts a stream's moves into it).
current_request: ContextVar[RequestContext | None] = ContextVar(
    "cloudllm_current_request", default=None
)


def context_of(scope: dict[str, Any] | Any) -> RequestContext:
    """The context the middleware stored in ``scope`` (a bare one outside it)."""
    state = scope.setdefault("state", {})
    context = state.get(SCOPE_KEY)
    if context is None:
        context = state[SCOPE_KEY] = RequestContext(request_id="")
    assert isinstance(context, RequestContext)
    return context


async def request_context(request: Request) -> RequestContext:
    """FastAPI dependency: this request's :class:`RequestContext`.

    ``async`` like every dependency here: FastAPI runs a plain ``def`` one in a worker
    thread, a hop per request whose cost grows with the tasks in flight (anyio looks
    for the root task among all of them): a fifth of the ingress's CPU at 256 streams.
    """
    return context_of(request.scope)
