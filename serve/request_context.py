"""The request id and tenant of the request being served, for log lines in serve/.

The API's middleware sets them per request (a context variable follows the request's task and
the threads it hands work to via `contextvars.copy_context`); `request_logger` prefixes each log
line with them, so an operator can find every line of the request a tenant reports.
"""

from __future__ import annotations

import logging
import secrets
from contextvars import ContextVar
from typing import Any

request_id: ContextVar[str | None] = ContextVar("brandfarm_request_id", default=None)
tenant_id: ContextVar[str | None] = ContextVar("brandfarm_tenant", default=None)


def new_request_id() -> str:
    return "req_" + secrets.token_hex(8)


class _RequestLog(logging.LoggerAdapter):
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        rid, tenant = request_id.get(), tenant_id.get()
        if rid is None:
            return msg, kwargs
        return f"[{rid} tenant={tenant or '-'}] {msg}", kwargs


def request_logger(name: str) -> logging.LoggerAdapter:
    """A logger whose lines carry the current request id and tenant."""
    return _RequestLog(logging.getLogger(name), {})
