"""Webhook test parts: a real receiver (a threaded HTTP server on 127.0.0.1 that checks every
delivery with the `standardwebhooks` package, as a tenant's endpoint would, and can be told to
fail its first requests), and API services with only the webhook routes working."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from sqlalchemy.engine import Engine
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from cluster.processes import free_ports
from registry.secret_box import SecretBox
from registry.settings import Settings
from registry.tenants import TenantDirectory
from registry.webhooks import WebhookStore
from serve.api import ApiServices
from serve.webhooks import WebhookService


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    verified: dict | None  # the parsed body when the signature checked out
    answered: int
    at: float  # time.perf_counter() when it arrived


class WebhookReceiver:
    def __init__(self, secret: str | None = None, fail_first: int = 0) -> None:
        self.secret = secret
        self.fail_first = fail_first
        self.received: list[Received] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                receiver._receive(self, body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_ports(1)[0]), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/hooks/brandfarm"

    def _receive(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        headers = dict(handler.headers.items())
        verified = None
        if self.secret is not None:
            try:
                verified = Webhook(self.secret).verify(body, headers)
            except WebhookVerificationError:
                verified = None
        with self._lock:
            failing = len(self.received) < self.fail_first
            status = 503 if failing else (200 if verified is not None else 401)
            self.received.append(Received(headers, body, verified, status, time.perf_counter()))
        reply = b"try later" if failing else b"thanks"
        handler.send_response(status)
        handler.send_header("content-length", str(len(reply)))
        handler.end_headers()
        handler.wfile.write(reply)

    def accepted(self, event_type: str | None = None) -> list[Received]:
        """The deliveries it verified and answered 200 (of `event_type`, if given)."""
        with self._lock:
            return [
                r
                for r in self.received
                if r.answered == 200 and event_type in (None, r.verified["type"])
            ]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def webhook_services(engine: Engine, settings: Settings) -> ApiServices:
    """API services over `engine` where only authentication and `/v1/webhooks` work (no object
    store, model or cluster: nothing else is called)."""
    return ApiServices(
        model=None,
        tenants=TenantDirectory(engine),
        store=None,
        images=None,
        files=None,
        jobs=None,
        adapters=None,
        max_request_bytes=64 * 1024,
        max_upload_bytes=64 * 1024,
        webhooks=WebhookService(WebhookStore(engine, SecretBox.of_settings(settings)), settings),
    )
