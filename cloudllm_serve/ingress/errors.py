"""The one place where errors become HTTP responses.

* :class:`~cloudllm_serve.errors.CloudLLMError` subclasses carry their status;
  503s add ``Retry-After``.
* Request validation: an unreadable or empty body is a 400, a bad field a 422; the
  ``detail`` sentence names each field at fault.
* Anything else is a bug: 500, logged with its traceback.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cloudllm_serve.errors import CloudLLMError, ServiceUnavailableError
from cloudllm_serve.ingress.schemas import ErrorBody

logger = logging.getLogger(__name__)

_BODY_ERRORS = {"json_invalid", "missing", "model_attributes_type", "dict_type", "model_type"}


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name.removesuffix("Error")).lower()


def error_response(
    status: int,
    detail: str,
    error_type: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The JSON body every error uses (:class:`~cloudllm_serve.ingress.schemas.ErrorBody`)."""
    return JSONResponse(
        {"detail": detail, "error_type": error_type, "param": param},
        status_code=status,
        headers=headers,
    )


def cloudllm_error_response(error: CloudLLMError) -> JSONResponse:
    """Response for one of the project's errors."""
    headers = None
    if isinstance(error, ServiceUnavailableError):
        headers = {"Retry-After": str(error.retry_after_s)}
    return error_response(
        error.status_code, error.message, _snake(type(error).__name__), error.param, headers
    )


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts)


def validation_error_response(
    error: RequestValidationError, content_type: str = ""
) -> JSONResponse:
    """400 for an unreadable/empty body, 422 naming the fields otherwise."""
    problems = list(error.errors())
    for item in problems:
        loc = tuple(item.get("loc", ()))
        kind = item.get("type", "")
        if (
            loc
            and loc[0] == "body"
            and (len(loc) == 1 or kind == "json_invalid")
            and kind in _BODY_ERRORS
        ):
            if kind == "json_invalid":
                reason = item.get("ctx", {}).get("error", "invalid JSON")
                detail = f"request body is not valid JSON: {reason}"
            elif content_type and "json" not in content_type:
                detail = (
                    f"request body must be JSON sent with Content-Type: application/json "
                    f"(got {content_type})"
                )
            else:
                detail = 'request body must be a JSON object, e.g. {"message": "Hello"}'
            return error_response(400, detail, "invalid_body", "body")
    messages = []
    for item in problems:
        field = _field_name(tuple(item.get("loc", ()))) or "body"
        message = str(item.get("msg", "invalid value")).removeprefix("Value error, ")
        if item.get("type") == "extra_forbidden":
            message = "unknown field"
        messages.append(f"{field}: {message}")
    first_field = _field_name(tuple(problems[0].get("loc", ()))) if problems else None
    return error_response(422, "; ".join(messages), "invalid_field", first_field or None)


def install_error_handlers(app: FastAPI) -> None:
    """Register every handler on ``app``."""

    async def on_cloudllm_error(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, CloudLLMError)
        return cloudllm_error_response(error)

    async def on_validation_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        return validation_error_response(error, request.headers.get("content-type", ""))

    async def on_http_error(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        try:
            error_type = HTTPStatus(error.status_code).phrase.lower().replace(" ", "_")
        except ValueError:
            error_type = "http_error"
        return error_response(
            error.status_code,
            str(error.detail),
            error_type,
            headers=dict(error.headers) if error.headers else None,
        )

    async def on_unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(error).__name__}", "internal_error")

    app.add_exception_handler(CloudLLMError, on_cloudllm_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)


#: ``responses=`` for routes: documents the error body in ``/openapi.json``.
ErrorResponses: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        400: "malformed request",
        404: "unknown conversation",
        413: "request body too large",
        422: "invalid field",
        501: "not implemented",
        503: "Redis or engine unavailable (with Retry-After)",
    }.items()
}
