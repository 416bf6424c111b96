"""Webhook delivery and the tenant's webhook operations.

`WebhookDispatcher` is the delivery worker each ingress replica runs in a thread: it claims due
deliveries from the outbox (`registry.webhooks`; leases keep two replicas off the same one),
checks the URL again (`serve.webhook_urls`: DNS may have changed since it was set), signs the
body per Standard Webhooks with the tenant's secrets (the `standardwebhooks` package) and POSTs
it, then records the attempt; the store schedules the retries and disables failing endpoints.
`WebhookService` is what the `/v1/webhooks` routes call.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import secrets
import socket
import threading
import time
from collections.abc import Iterator

import httpx
from pydantic import BaseModel, Field
from standardwebhooks import Webhook

from registry.jobs import timestamp
from registry.secret_box import SecretKeyError
from registry.settings import Settings
from registry.sql_base import utcnow
from registry.webhooks import (
    EVENT_TYPES,
    MAX_URL_CHARS,
    RESPONSE_EXCERPT_CHARS,
    Delivery,
    DueDelivery,
    Outcome,
    WebhookConfig,
    WebhookError,
    WebhookStore,
)
from serve.errors import APIError, InvalidField
from serve.protocol import STRICT_BODY, Text
from serve.webhook_urls import check_webhook_url, delivery_address

log = logging.getLogger(__name__)
CLAIM_BATCH = 16


def signature_headers(secrets_: list[str], msg_id: str, when: dt.datetime, body: str) -> dict:
    """The Standard Webhooks headers of `body`: one `v1,` signature per secret (the current
    one and, during a rotation's grace period, the previous one), space-separated."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": " ".join(Webhook(s).sign(msg_id, when, body) for s in secrets_),
    }


class WebhookDispatcher:
    def __init__(
        self, store: WebhookStore, settings: Settings, client: httpx.Client | None = None
    ) -> None:
        self.store = store
        self.settings = settings
        # Redirects are not followed: a redirect could lead past the URL check.
        self.client = client or httpx.Client(
            timeout=settings.webhook_timeout_s, follow_redirects=False, trust_env=False
        )
        self.owner = f"{socket.gethostname()}:{secrets.token_hex(4)}"[:64]

    def deliver_once(self) -> int:
        """Claim the due deliveries and attempt each once; how many were attempted."""
        claimed = self.store.claim(self.owner, self.settings.webhook_lease_s, CLAIM_BATCH)
        for due in claimed:
            outcome = self.attempt(due)
            status = self.store.record(
                due.id,
                self.owner,
                outcome,
                self.settings.webhook_retry_schedule_s,
                self.settings.webhook_disable_after_failures,
            )
            log.info("webhook %s to %s: %s → %s", due.id, due.url, outcome.summary(), status)
        return len(claimed)

    def attempt(self, due: DueDelivery) -> Outcome:
        start = time.perf_counter()

        def outcome(error: str | None, status_code: int | None = None, body: str | None = None):
            return Outcome(status_code, body, error, (time.perf_counter() - start) * 1000)

        try:
            address = delivery_address(due.url, self.settings)
        except InvalidField as e:
            return outcome(f"refused: {e.message}")
        keys = self.store.signing_secrets(due.tenant_id)
        if not keys:
            return outcome("no webhook secret: create one with POST /v1/webhooks/secret")
        headers = signature_headers(keys, due.event_id, utcnow(), due.payload)
        headers.update({"content-type": "application/json", "user-agent": "brandfarm-webhooks"})
        url, extensions = httpx.URL(due.url), {}
        if address is not None and address != url.host:
            # Connect to the checked address; TLS still verifies the certificate of the name.
            headers["host"] = url.netloc.decode()
            extensions["sni_hostname"] = url.host
            url = url.copy_with(host=address)
        try:
            with self.client.stream(
                "POST", url, content=due.payload.encode(), headers=headers, extensions=extensions
            ) as response:
                excerpt = b""
                for chunk in response.iter_bytes():
                    excerpt += chunk
                    if len(excerpt) >= RESPONSE_EXCERPT_CHARS:
                        break
        except httpx.TimeoutException:
            return outcome(f"timed out after {self.settings.webhook_timeout_s:g} s")
        except httpx.ConnectError as e:
            return outcome(f"could not connect: {e}"[:500])
        except httpx.HTTPError as e:  # the tenant sees this: plain words, no exception class
            return outcome(f"the request failed: {e}"[:500])
        body = excerpt.decode("utf-8", "replace")[:RESPONSE_EXCERPT_CHARS]
        error = None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"
        return outcome(error, response.status_code, body)

    def run(self, stop: threading.Event) -> None:
        """Deliver until `stop` is set; a pass that finds work is followed by another at once."""
        while not stop.is_set():
            try:
                if self.deliver_once():
                    continue
            except Exception:  # noqa: BLE001 - e.g. the database briefly down: next pass
                log.exception("webhook delivery pass failed")
            stop.wait(self.settings.webhook_poll_interval_s)

    def start(self) -> threading.Event:
        stop = threading.Event()
        threading.Thread(target=self.run, args=(stop,), name="webhooks", daemon=True).start()
        return stop


# --- the tenant's API ----------------------------------------------------------------------------
class WebhookConfigRequest(BaseModel):
    model_config = STRICT_BODY
    url: Text | None = Field(
        None,
        max_length=MAX_URL_CHARS,
        description="Default URL of the tenant's events (https, public); null clears it. "
        "Setting a disabled endpoint's URL again re-enables it.",
    )


def config_object(config: WebhookConfig) -> dict:
    return {
        "object": "webhook.config",
        "url": config.url,
        "has_secret": config.has_secret,
        "secret_created_at": timestamp(config.secret_created_at),
        "previous_secret_expires_at": timestamp(config.previous_secret_until),
        "disabled_endpoints": [
            {"url": url, "reason": reason} for url, reason in sorted(config.disabled.items())
        ],
        "event_types": list(EVENT_TYPES),
    }


def delivery_object(d: Delivery) -> dict:
    return {
        "id": d.id,
        "object": "webhook.delivery",
        "event_id": d.event_id,
        "event_type": d.event_type,
        "url": d.url,
        "status": d.status,
        "created_at": timestamp(d.created_at),
        "next_attempt_at": timestamp(d.next_attempt_at),
        "finished_at": timestamp(d.finished_at),
        "last_error": d.last_error,
        "payload": d.payload,
        "attempts": [
            {
                "started_at": timestamp(a.started_at),
                "duration_ms": round(a.duration_ms, 1),
                "status_code": a.status_code,
                "response_body": a.response_body,
                "error": a.error,
            }
            for a in d.attempts
        ],
    }


@contextlib.contextmanager
def _farm_key_needed() -> Iterator[None]:
    """A farm without its encryption key cannot store a secret: 503 for the tenant (the
    operator's fix is in the log), not a 500."""
    try:
        yield
    except SecretKeyError as e:
        log.error("%s", e)
        raise APIError(
            503,
            "webhook secrets cannot be stored now: the farm's encryption key is not configured",
            code="encryption_key_missing",
        ) from e


class WebhookService:
    def __init__(self, store: WebhookStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    def rotate_secret(self, tenant_id: str) -> dict:
        with _farm_key_needed():
            secret = self.store.rotate_secret(tenant_id, self.settings.webhook_secret_grace_s)
        return {
            **config_object(self.store.config(tenant_id)),
            "secret": secret,  # shown this once
        }

    def get_config(self, tenant_id: str) -> dict:
        return config_object(self.store.config(tenant_id))

    def set_config(self, tenant_id: str, req: WebhookConfigRequest) -> dict:
        url = check_webhook_url(req.url, self.settings, "url") if req.url is not None else None
        with _farm_key_needed():
            config = self.store.set_url(tenant_id, url)
            created = self.store.ensure_secret(tenant_id) if url is not None else None
        out = config_object(self.store.config(tenant_id) if created else config)
        if created:
            out["secret"] = created  # the tenant's first secret, shown this once
        return out

    def _delivery(self, tenant_id: str, delivery_id: str) -> Delivery:
        found = self.store.get(tenant_id, delivery_id)
        if found is None:
            raise APIError(
                404,
                f"no webhook delivery {delivery_id!r}",
                param="delivery_id",
                code="delivery_not_found",
            )
        return found

    def get_delivery(self, tenant_id: str, delivery_id: str) -> dict:
        return delivery_object(self._delivery(tenant_id, delivery_id))

    def list_deliveries(
        self, tenant_id: str, after: str | None, limit: int, event_type: str | None
    ) -> dict:
        if event_type is not None and event_type not in EVENT_TYPES:
            raise InvalidField("event_type", f"event_type must be one of {list(EVENT_TYPES)}")
        try:
            found, more = self.store.list(tenant_id, after, limit, event_type)
        except KeyError as e:
            raise InvalidField("after", f"no webhook delivery {after!r} to page after") from e
        return {"object": "list", "data": [delivery_object(d) for d in found], "has_more": more}

    def replay(self, tenant_id: str, delivery_id: str) -> dict:
        self._delivery(tenant_id, delivery_id)  # 404 first: another tenant's id reads missing
        try:
            replayed = self.store.replay(tenant_id, delivery_id, self.store.config(tenant_id).url)
        except WebhookError as e:
            raise APIError(409, str(e), code="delivery_not_replayable") from e
        return delivery_object(replayed)
