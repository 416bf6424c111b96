"""Every error leaving the API becomes one OpenAI-shaped body (`serve.errors.error_body`),
whatever raised it: our checks, FastAPI's validation, Starlette's 404/405, or an unexpected
exception (a generic 500 naming the request id; the detail goes to the log under that id).
"""

from __future__ import annotations

import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve import request_context
from serve.errors import APIError, error_body

log = request_context.request_logger(__name__)
REQUEST_ID_HEADER = "X-Request-Id"


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    details: dict | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(status, message, param, code, details), status_code=status, headers=headers
    )


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, first_param = [], None
    for err in exc.errors():
        if err.get("type") == "json_invalid":  # its loc is a character offset, not a field
            first_param = first_param or "body"
            parts.append("body: the request body is not valid JSON")
            continue
        # FastAPI prefixes the place a value came from; the field's own name is what the
        # client sent.
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path", "header")]
        param = ".".join(loc) or "body"
        first_param = first_param or param
        if err.get("type") == "missing":
            parts.append(f"{param}: this field is required")
        else:
            parts.append(f"{param}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request", first_param


def internal_error_response() -> JSONResponse:
    rid = request_context.request_id.get()
    return error_response(
        500,
        f"internal error; retry, and if it persists report request id {rid}",
        None,
        "internal_error",
    )


_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _usable_id(raw: bytes | None) -> str | None:
    """A request id from a header, if it is safe to put in a log line."""
    if raw is None:
        return None
    text = raw.decode("latin-1")
    return text if _ID.match(text) else None


class RequestIds:
    """Give each request an id (in the logs and the `X-Request-Id` response header), and answer
    an exception no handler took with a generic 500 instead of its text."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Behind Ray Serve the proxy has already given the request its id (in this header, and
        # in Serve's own logs) and puts it on the response itself: reuse it, add nothing.
        incoming = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER.lower().encode())
        rid = _usable_id(incoming) or request_context.new_request_id()
        request_context.request_id.set(rid)
        request_context.tenant_id.set(None)
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if incoming is None:
                    message["headers"] = [
                        *message.get("headers", []),
                        (REQUEST_ID_HEADER.lower().encode(), rid.encode()),
                    ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            await internal_error_response()(scope, receive, send_with_id)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        if exc.status >= 500:
            log.warning("answered %s %s: %s", exc.status, exc.code, exc.message)
        return error_response(
            exc.status, exc.message, exc.param, exc.code, exc.headers, exc.details
        )

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
