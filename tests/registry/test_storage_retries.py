"""The object store client retries S3's "please try again" answers.

A proxy in front of the real embedded store (`rclone serve s3`) answers chosen requests with
500 InternalError, as rclone itself now and then does to concurrent PUTs; every other request
reaches rclone unchanged (Host header included, so signatures still verify).
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from registry.settings import Settings
from registry.storage import ObjectStore, StorageError, StoreTimeouts
from tests.object_store import s3_settings  # noqa: F401 (fixture)

INTERNAL_ERROR = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
    b"<Message>Internal Error</Message></Error>"
)


class FaultyProxy:
    """Forwards to `upstream`; the next `fail_puts` PUTs get 500 InternalError instead."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream).netloc
        self.fail_puts = 0
        self.puts_seen = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if self.command == "PUT":
                    proxy.puts_seen += 1
                    if proxy.fail_puts > 0:
                        proxy.fail_puts -= 1
                        self.send_response(500)
                        self.send_header("Content-Type", "application/xml")
                        self.send_header("Content-Length", str(len(INTERNAL_ERROR)))
                        self.end_headers()
                        self.wfile.write(INTERNAL_ERROR)
                        return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=10)
                try:
                    conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status)
                head = self.command == "HEAD"  # its Content-Length is the object's
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection") and (
                        head or k.lower() != "content-length"
                    ):
                        self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(s3_settings: Settings) -> Iterator[FaultyProxy]:  # noqa: F811
    p = FaultyProxy(s3_settings.resolved_s3_endpoint)
    yield p
    p.close()


def store_via(proxy: FaultyProxy, settings: Settings, retries: int) -> ObjectStore:
    return ObjectStore(
        proxy.url,
        settings.s3_access_key.get_secret_value(),
        settings.s3_secret_key.get_secret_value(),
        settings.s3_bucket,
        region=settings.s3_region,
        timeouts=StoreTimeouts(connect_s=2, read_s=10, retries=retries),
    )


def test_a_put_answered_500_internal_error_is_retried_and_lands(proxy, s3_settings) -> None:  # noqa: F811
    store = store_via(proxy, s3_settings, retries=2)
    proxy.fail_puts = 2
    info = store.put_bytes("tenants/retry-co/renders/r1/0.png", b"pixels" * 100, "image/png")
    assert proxy.puts_seen == 3 and proxy.fail_puts == 0
    assert store.get_bytes(info.key) == b"pixels" * 100
    store.verify(info.key, info.sha256)


def test_a_store_that_keeps_failing_gives_storage_error_after_the_retries(
    proxy,
    s3_settings,  # noqa: F811
) -> None:
    store = store_via(proxy, s3_settings, retries=1)
    proxy.fail_puts = 5
    with pytest.raises(StorageError):
        store.put_bytes("tenants/retry-co/renders/r2/0.png", b"x", "image/png")
    assert proxy.puts_seen == 2  # the first try and one retry, no more
