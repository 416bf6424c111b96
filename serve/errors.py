"""API errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Every error leaving the API goes through `error_response`, whatever raised it (our checks,
FastAPI's validation, Starlette's 404/405, an unexpected exception).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
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
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


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
            503, f"the object store is unavailable; {retry}", code="storage_unavailable"
        )


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {
        "error": {
            "message": message,
            "type": _TYPES.get(
                status, "server_error" if status >= 500 else "invalid_request_error"
            ),
            "param": param,
            "code": code,
        }
    }
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, first_param = [], None
    for err in exc.errors():
        if err.get("type") == "json_invalid":  # its loc is a character offset, not a field
            first_param = first_param or "body"
            parts.append("body: the request body is not valid JSON")
            continue
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body",)]
        param = ".".join(loc) or "body"
        first_param = first_param or param
        if err.get("type") == "missing":
            parts.append(f"{param}: this field is required")
        else:
            parts.append(f"{param}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request", first_param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        return error_response(
            exc.status_code, str(exc.detail), None, code.get(exc.status_code), exc.headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}", None, "internal_error")
