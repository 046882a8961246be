"""The one place where errors become HTTP responses.

Two bodies, by API surface:

* the seed API: ``{"detail": "<sentence>", "error_type": "...", "param": ...}``; an
  unreadable or empty body is a 400, a bad field a 422 naming it;
* ``/v1`` (OpenAI): ``{"error": {"message", "type", "param", "code"}}``; every bad
  parameter is a 400, as OpenAI's clients expect.

:class:`~cloudllm_serve.errors.CloudLLMError` subclasses carry their status; 503s add
``Retry-After``. Anything else is a bug: 500, logged with its traceback.
"""

from __future__ import annotations

import logging
import math
import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from cloudllm_serve.errors import (
    AuthenticationError,
    CloudLLMError,
    EngineOverloadedError,
    InvalidRequestError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    StorageQuotaError,
)
from cloudllm_serve.ingress.seed_api.schemas import ErrorBody

logger = logging.getLogger(__name__)

OPENAI_PREFIX = "/v1/"
_BODY_ERRORS = {"json_invalid", "missing", "model_attributes_type", "dict_type", "model_type"}


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name.removesuffix("Error")).lower()


def _is_openai(request: Request) -> bool:
    return request.url.path.startswith(OPENAI_PREFIX)


def openai_error(error: CloudLLMError) -> dict[str, Any]:
    """OpenAI's error body for one of the project's errors."""
    kinds = {
        400: "invalid_request_error",
        401: "invalid_request_error",
        403: "permission_error",
        404: "not_found_error",
        409: "invalid_request_error",
        413: "invalid_request_error",
        415: "invalid_request_error",
        429: "rate_limit_error",
        501: "not_implemented_error",
        503: "service_unavailable_error",
        504: "timeout_error",
    }
    return {
        "error": {
            "message": error.message,
            "type": error.openai_type or kinds.get(error.status_code, "server_error"),
            "param": error.param,
            "code": getattr(error, "code", None) or error.status_code,
        }
    }


def openai_http_error(status: int, message: str) -> dict[str, Any]:
    """The OpenAI error body vllm serve gives a plain HTTP error (type: the status's phrase)."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "HTTP Error"
    return {"error": {"message": message, "type": phrase, "param": None, "code": status}}


def error_response(
    status: int,
    detail: str,
    error_type: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The seed API's error body (:class:`~cloudllm_serve.ingress.seed_api.schemas.ErrorBody`)."""
    return JSONResponse(
        {"detail": detail, "error_type": error_type, "param": param},
        status_code=status,
        headers=headers,
    )


def seed_error(error: CloudLLMError) -> dict[str, Any]:
    """The seed API's error body for one of the project's errors."""
    kind = getattr(error, "error_type", None) or _snake(type(error).__name__)
    return {"detail": error.message, "error_type": kind, "param": error.param}


def error_headers(error: CloudLLMError) -> dict[str, str]:
    """Headers that go with an error: when to retry, how to authenticate."""
    headers: dict[str, str] = {}
    if isinstance(error, ServiceUnavailableError):
        headers["Retry-After"] = str(error.retry_after_s)
    elif isinstance(error, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"
    elif isinstance(error, StorageQuotaError):
        headers["x-should-retry"] = "false"  # OpenAI's clients retry a 409 otherwise
    elif isinstance(error, RateLimitError):
        if error.retry_after_s is None:
            headers["x-should-retry"] = "false"
        else:
            headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
            headers["retry-after-ms"] = str(max(1, math.ceil(error.retry_after_s * 1000)))
        headers.update(getattr(error, "limit_headers", []))
    return headers


def cloudllm_error_response(error: CloudLLMError, *, openai: bool = False) -> JSONResponse:
    """Response for one of the project's errors, in the body of the API it came from."""
    body = openai_error(error) if openai else seed_error(error)
    return JSONResponse(body, status_code=error.status_code, headers=error_headers(error) or None)


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts)


def _body_problem(error: RequestValidationError, content_type: str) -> str | None:
    """A sentence when the body as a whole is unusable (not JSON, not an object, empty)."""
    for item in error.errors():
        loc = tuple(item.get("loc", ()))
        kind = item.get("type", "")
        if not (loc and loc[0] == "body" and kind in _BODY_ERRORS):
            continue
        if kind == "json_invalid":
            reason = item.get("ctx", {}).get("error", "invalid JSON")
            return f"request body is not valid JSON: {reason}"
        if len(loc) == 1:
            if content_type and "json" not in content_type:
                return (
                    "request body must be JSON sent with Content-Type: application/json "
                    f"(got {content_type})"
                )
            return 'request body must be a JSON object, e.g. {"message": "Hello"}'
    return None


def _field_problems(error: RequestValidationError) -> tuple[str, str | None]:
    messages = []
    for item in error.errors():
        field = _field_name(tuple(item.get("loc", ()))) or "body"
        message = str(item.get("msg", "invalid value")).removeprefix("Value error, ")
        if item.get("type") == "extra_forbidden":
            message = "unknown field"
        messages.append(f"{field}: {message}")
    problems = error.errors()
    first = _field_name(tuple(problems[0].get("loc", ()))) if problems else ""
    return "; ".join(messages), first or None


def validation_error_response(
    error: RequestValidationError, content_type: str = "", *, openai: bool = False
) -> JSONResponse:
    """400 for an unusable body; a bad field is 422 (seed API) or 400 (OpenAI API)."""
    body_problem = _body_problem(error, content_type)
    if body_problem is not None:
        if openai:
            return cloudllm_error_response(InvalidRequestError(body_problem), openai=True)
        return error_response(400, body_problem, "invalid_body", "body")
    detail, param = _field_problems(error)
    if openai:
        return cloudllm_error_response(InvalidRequestError(detail, param=param), openai=True)
    return error_response(422, detail, "invalid_field", param)


def refusal_reason(error: CloudLLMError) -> str | None:
    """The ``cloudllm_refusals_total`` reason of an error answered here, if it is a refusal.

    Timeouts are counted where they happen (some end a stream that already started).
    """
    if isinstance(error, EngineOverloadedError):
        return error.reason
    if isinstance(error, RateLimitError):
        return "rate_limit"
    if isinstance(error, (AuthenticationError, PermissionDeniedError)):
        return "auth"
    return None


def install_error_handlers(app: FastAPI) -> None:
    """Register every handler on ``app``."""

    async def on_cloudllm_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, CloudLLMError)
        reason = refusal_reason(error)
        service = getattr(request.app.state, "service", None)
        if reason is not None and service is not None:
            service.metrics.refusals.add(reason=reason)
        return cloudllm_error_response(error, openai=_is_openai(request))

    async def on_validation_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        return validation_error_response(
            error, request.headers.get("content-type", ""), openai=_is_openai(request)
        )

    async def on_http_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        if error.status_code == 413:
            return cloudllm_error_response(
                PayloadTooLargeError(str(error.detail), param="body"), openai=_is_openai(request)
            )
        headers = dict(error.headers) if error.headers else None
        if _is_openai(request):
            # As vllm serve answers an unknown /v1 route or a wrong method.
            body = openai_http_error(error.status_code, str(error.detail))
            return JSONResponse(body, status_code=error.status_code, headers=headers)
        try:
            error_type = HTTPStatus(error.status_code).phrase.lower().replace(" ", "_")
        except ValueError:
            error_type = "http_error"
        return error_response(error.status_code, str(error.detail), error_type, headers=headers)

    async def on_unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(error).__name__}", "internal_error")

    app.add_exception_handler(CloudLLMError, on_cloudllm_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)


def documented_errors(
    body: type[BaseModel], descriptions: dict[int, str]
) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for routes: the error body of each status, for ``/openapi.json``."""
    return {
        status: {"model": body, "description": description}
        for status, description in descriptions.items()
    }


#: The seed API's documented errors.
ErrorResponses = documented_errors(
    ErrorBody,
    {
        400: "malformed request",
        401: "no API key, a malformed Authorization header or an unknown key",
        404: "unknown conversation",
        409: "a storage quota of the tenant would be passed (conversations, messages per "
        "conversation, image bytes); nothing was stored",
        413: "request body (or an image) too large",
        415: "an image that is not PNG, JPEG, WEBP or GIF",
        422: "invalid field",
        429: "over a rate limit of the tenant (Retry-After), or engines overloaded",
        501: "not implemented",
        503: "Redis or engine unavailable, or Redis full (with Retry-After)",
    },
)
