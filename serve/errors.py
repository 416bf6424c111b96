"""API errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

The exceptions services raise and the body they become, with no web framework: the engine and
the request/job dataclasses import this module, and `serve.error_handlers` turns these into
responses. A message says what is wrong and what to do; it never carries an internal URL, host,
path or exception class (those go to the logs, tagged with the request id).
"""

from __future__ import annotations

from pydantic import BaseModel, Field

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class APIError(Exception):
    """An error the API answers with; `status` is the HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        details: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers
        self.details = details  # extra fields of the error object (e.g. a gate's figures)


class InvalidField(APIError):
    """A request field broke a rule; the message names the field and the limit."""

    def __init__(self, param: str, message: str, *, status: int = 400, code: str | None = None):
        super().__init__(status, message, param=param, code=code or "invalid_value")


class ServiceUnavailable(APIError):
    """A dependency is down or out of capacity: a retryable 503 with `Retry-After`."""

    def __init__(self, message: str, code: str, retry_after_s: int = 2) -> None:
        super().__init__(
            503, f"{message}; retry shortly", code=code, headers={"Retry-After": str(retry_after_s)}
        )


class StorageUnavailable(APIError):
    """The object store failed during a request: a retryable 503 (nothing was kept)."""

    def __init__(self, retry: str = "retry shortly") -> None:
        super().__init__(
            503,
            f"the object store is unavailable; {retry}",
            code="storage_unavailable",
            headers={"Retry-After": "2"},
        )


def registry_unavailable() -> ServiceUnavailable:
    """MLflow did not answer in time or refused: every adapter route answers this."""
    return ServiceUnavailable("the adapter registry is unavailable", "registry_unavailable")


def error_type(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def _printable(text: str | None) -> str | None:
    """`text` as valid UTF-8: a lone surrogate a client sent (say, as a field name) is escaped,
    so that the error about it can itself be encoded."""
    if text is None:
        return None
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    details: dict | None = None,
) -> dict:
    return {
        "error": {
            "message": _printable(message),
            "type": error_type(status),
            "param": _printable(param),
            "code": code,
            **(details or {}),
        }
    }


class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong and what to do; names the field and limit.")
    type: str = Field(description="`invalid_request_error`, `rate_limit_error` or `server_error`.")
    param: str | None = Field(description="The request field at fault, if one is.")
    code: str | None = Field(description="A stable machine-readable code, e.g. `invalid_value`.")


class ErrorResponse(BaseModel):
    """The body of every 4xx and 5xx answer (OpenAI's error shape)."""

    error: ErrorDetail
