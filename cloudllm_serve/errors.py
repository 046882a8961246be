"""The project's error classes.

Every error a client can cause or suffer is a :class:`CloudLLMError` subclass that
knows its HTTP status; the ingress turns them into responses in one place
(:mod:`cloudllm_serve.ingress.errors`). Anything else that escapes is a bug (500).
"""

from __future__ import annotations


class CloudLLMError(Exception):
    """Root of the project's errors: a message for the client and an HTTP status."""

    status_code: int = 500
    #: The ``error.type`` of a ``/v1`` answer, where it is not the status's usual one.
    openai_type: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class SettingsError(CloudLLMError):
    """A setting (environment variable) has a bad value; start-up stops."""


class InvalidRequestError(CloudLLMError):
    """The request is malformed or asks for something impossible (400)."""

    status_code = 400


class FieldTypeError(InvalidRequestError):
    """A field of the wrong JSON type: the 400 ``vllm serve``'s request model gives."""

    openai_type = "Bad Request"


class PromptTooLongError(InvalidRequestError):
    """The new message alone does not fit the model's context (400)."""


class ConversationNotFoundError(CloudLLMError):
    """No conversation has the given id (404)."""

    status_code = 404

    def __init__(self, conversation_id: str) -> None:
        super().__init__(f"conversation '{conversation_id}' not found", param="conversation_id")
        self.conversation_id = conversation_id


class ModelNotFoundError(CloudLLMError):
    """The request names a model this server does not serve (404)."""

    status_code = 404
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist.", param="model")
        self.model = model


class AuthenticationError(CloudLLMError):
    """No API key, a malformed ``Authorization`` header or an unknown key (401)."""

    status_code = 401
    code = "invalid_api_key"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="Authorization")


class PermissionDeniedError(CloudLLMError):
    """The key is valid but its tenant may not use this route (403)."""

    status_code = 403
    code = "permission_denied"


class RateLimitError(CloudLLMError):
    """The tenant is over one of its limits (429); ``Retry-After`` says when to retry.

    ``retry_after_s`` is ``None`` for a request that can never fit the limit (it gets
    ``x-should-retry: false``).
    """

    status_code = 429
    code = "rate_limit_exceeded"
    error_type = "rate_limit"

    def __init__(self, message: str, *, reason: str, retry_after_s: float | None) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


class StorageQuotaError(CloudLLMError):
    """Storing the turn would pass one of the tenant's storage quotas (409).

    Nothing was written. The message names the quota (as the key file spells it) and its
    limit; retrying does not help until the tenant deletes conversations
    (``x-should-retry: false``).
    """

    status_code = 409
    code = "storage_quota_exceeded"
    error_type = "storage_quota"

    def __init__(self, message: str, *, quota: str, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.quota = quota


class PayloadTooLargeError(CloudLLMError):
    """The request body is larger than ``MAX_UPLOAD_BYTES`` (413)."""

    status_code = 413


class UnsupportedMediaTypeError(CloudLLMError):
    """An upload is not in a format the endpoint takes (415)."""

    status_code = 415


class FeatureNotImplementedError(CloudLLMError):
    """The endpoint exists but is not available with this deployment (501)."""

    status_code = 501


class ServiceUnavailableError(CloudLLMError):
    """A dependency is down or overloaded; retrying later may succeed (503)."""

    status_code = 503
    retry_after_s: int = 5


class StoreUnavailableError(ServiceUnavailableError):
    """Redis, which keeps the conversations, cannot be reached."""


class StoreFullError(StoreUnavailableError):
    """Redis reached its ``maxmemory`` and refuses writes (``noeviction``); nothing was written."""

    retry_after_s = 30


class EngineUnavailableError(ServiceUnavailableError):
    """No vLLM engine replica can take the request."""


class EngineOverloadedError(ServiceUnavailableError):
    """Every engine replica is full and the queue in front of them is too (503 or 429).

    The status is ``OVERLOAD_STATUS_CODE``: the request was refused at once, nothing ran.
    ``reason`` says why: ``queue_full`` (Serve's queue bound; ``Retry-After`` is
    ``OVERLOAD_RETRY_AFTER_S``), ``deadline`` (it would not finish within
    ``REQUEST_TIMEOUT_S``), ``late`` (admitted, it waited for a batch slot while the
    engines slowed, and could no longer finish in time; refused before any byte) or
    ``tenant_share`` (its tenant holds its share of a full
    fleet); all but ``queue_full`` compute ``Retry-After`` from the admission's estimate.
    """

    code = "engine_overloaded"

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 503,
        retry_after_s: int = 2,
        reason: str = "queue_full",
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.retry_after_s = retry_after_s
        self.reason = reason


class RequestTimeoutError(CloudLLMError):
    """A generation did not finish within ``REQUEST_TIMEOUT_S``; it was stopped (504)."""

    status_code = 504
    code = "request_timeout"
