"""What the ingress knows about one request beyond its body: who, what was charged, usage.

The access middleware (:mod:`cloudllm_serve.ingress.access`) makes one per request and
keeps it in the ASGI scope; routes read it through :func:`request_context`, handlers
fill in the conversation and token counts, and the middleware settles the rate-limit
charge and writes the audit line from it when the response is done.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request

from cloudllm_serve.errors import PermissionDeniedError
from cloudllm_serve.ingress.rate_limits import Admission
from cloudllm_serve.keys import Principal

SCOPE_KEY = "cloudllm_context"


@dataclass
class RequestContext:
    """One request's caller, rate-limit admission and outcome."""

    request_id: str
    principal: Principal | None = None
    admission: Admission | None = None
    conversation_id: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: What access control decided: public, open (no keys configured), allowed,
    #: unauthenticated, forbidden, rate_limited:<reason>.
    decision: str = "open"

    @property
    def tenant_id(self) -> str | None:
        """The caller's tenant (``None`` when keys are off or the route is public)."""
        return self.principal.tenant_id if self.principal else None

    def record_usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        """The generation's real token counts (settled against the estimate, audited)."""
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens

    def require_admin(self) -> None:
        """403 unless the caller's key is an admin key (or keys are off)."""
        if self.principal is not None and not self.principal.tenant.admin:
            self.decision = "forbidden"
            raise PermissionDeniedError(
                f"this route needs an admin key; tenant '{self.principal.tenant_id}' is not an "
                "admin (set admin: true in API_KEYS_FILE)"
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
