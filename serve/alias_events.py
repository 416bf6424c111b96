"""Instant alias updates in the ingress: a promotion or rollback is served on the next request.

A brand's aliases move through the farm's API (`AdapterService.set_alias`) or straight in MLflow
(whose registry webhook posts to `POST /internal/mlflow/alias-events`). Either way the ingress
that learns of it drops its own cached alias answers for that brand at once and appends a row
to the farm database's alias event log (`registry.alias_events`); every ingress replica polls
that log every `alias_event_poll_s` and drops what the new rows name, since the webhook reaches
only one replica. Where MLflow's webhook is not registered (an external server, a file store,
`alias_webhook` off), aliases changed outside the farm's API still take effect within
`adapter_resolve_ttl_s`: logged once, and shown by `/healthz` (`alias_updates`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

from registry import alias_webhook
from registry.adapter_refs import check_name
from registry.alias_events import AliasEventLog
from registry.settings import Settings
from serve.errors import APIError
from serve.io_pools import BlockingPool
from serve.resolver import AdapterResolver

log = logging.getLogger(__name__)

#: How often the ingress asks MLflow again whether its webhook is registered.
WEBHOOK_CHECK_S = 60.0
#: How often old events are pruned (any replica; idempotent).
PRUNE_EVERY_S = 600.0
_BATCH = 1000


class AliasEvents:
    def __init__(
        self,
        resolver: AdapterResolver,
        events: AliasEventLog,
        settings: Settings,
        db_pool: BlockingPool,
        webhook_problem: Callable[[], str | None] | None = None,
    ) -> None:
        self.resolver = resolver
        self.events = events
        self.db_pool = db_pool
        self.poll_s = settings.alias_event_poll_s
        self.ttl_s = settings.adapter_resolve_ttl_s
        secret = settings.mlflow_webhook_secret
        self.secret = secret.get_secret_value() if secret else None
        self.webhook_problem = webhook_problem or (lambda: alias_webhook.problem(settings))
        self.fallback_reason: str | None = "not checked yet"
        self.last_seen = 0  # the newest event id this replica has applied
        self.received = 0  # webhook deliveries accepted by this replica
        self._logged_fallback = False
        self._db_failing = False

    # --- learning of a change ---------------------------------------------------------------
    async def changed(self, tenant: str, brand: str, source: str) -> None:
        """`tenant`'s `brand` has new aliases: forget them here now, tell the other replicas."""
        self.resolver.invalidate(tenant, brand)
        try:
            await self.db_pool.run(self.events.record, tenant, brand, source)
        except Exception as e:  # noqa: BLE001 - the change itself happened; others fall back
            log.warning(
                "could not record the alias change of %s/%s for the other ingress replicas "
                "(they see it within adapter_resolve_ttl_s): %s",
                tenant,
                brand,
                e,
            )

    async def webhook(self, headers: dict[str, str], body: bytes) -> dict:
        """An MLflow delivery: 401 unless its signature verifies; then invalidate."""
        if self.secret is None:
            raise APIError(401, "this farm has no mlflow_webhook_secret", code="invalid_signature")
        why = alias_webhook.verify(
            self.secret,
            headers.get(alias_webhook.DELIVERY_ID_HEADER.lower()),
            headers.get(alias_webhook.TIMESTAMP_HEADER.lower()),
            headers.get(alias_webhook.SIGNATURE_HEADER.lower()),
            body,
        )
        if why:
            log.warning("refused an MLflow webhook delivery: %s", why)
            raise APIError(401, f"MLflow webhook refused: {why}", code="invalid_signature")
        self.received += 1
        try:
            event = json.loads(body)
            name = event["data"]["name"]
            entity = event["entity"]
        except (ValueError, KeyError, TypeError):
            raise APIError(400, "not an MLflow webhook payload", code="invalid_payload") from None
        tenant, _, brand = str(name).partition(".")
        if entity != "model_version_alias" or not _is_brand(tenant, brand):
            return {"status": "ignored"}  # not a brand adapter (MLflow's test payload, say)
        await self.changed(tenant, brand, "mlflow")
        return {"status": "invalidated", "tenant": tenant, "brand": brand}

    # --- every replica ------------------------------------------------------------------------
    def status(self) -> dict:
        """What /healthz shows: whether changes made outside the farm's API show at once."""
        return {
            "instant": self.fallback_reason is None,
            "webhook": "active" if self.fallback_reason is None else "unavailable",
            "fallback_reason": self.fallback_reason,
            "ttl_s": self.ttl_s,
            "last_event_id": self.last_seen,
            "deliveries_received": self.received,
        }

    def poll_once(self) -> int:
        """Apply the events newer than the last seen; returns how many."""
        rows = self.events.after(self.last_seen, _BATCH)
        if len(rows) == _BATCH:  # far behind: cheaper to forget everything than to replay
            self.resolver.invalidate_all()
            self.last_seen = self.events.latest()
            return len(rows)
        for event_id, tenant, brand in rows:
            self.resolver.invalidate(tenant, brand)
            self.last_seen = event_id
        return len(rows)

    def check_webhook(self) -> None:
        reason = self.webhook_problem()
        self.fallback_reason = reason
        if reason and not self._logged_fallback:
            self._logged_fallback = True
            log.warning(
                "MLflow alias webhook unavailable (%s): alias changes made outside the farm's "
                "API reach serving within adapter_resolve_ttl_s=%gs",
                reason,
                self.ttl_s,
            )
        elif not reason:
            self._logged_fallback = False

    def run(self, stop: threading.Event) -> None:
        try:
            self.last_seen = self.events.latest()  # older events predate this replica's cache
        except Exception as e:  # noqa: BLE001 - then the first poll replays what is kept
            log.warning("alias event log unreadable at start: %s", e)
        next_check = next_prune = time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_check:
                next_check = now + WEBHOOK_CHECK_S
                try:
                    self.check_webhook()
                except Exception as e:  # noqa: BLE001 - a probe, never fatal
                    self.fallback_reason = f"could not ask MLflow: {e}"
            try:
                self.poll_once()
                if now >= next_prune:
                    next_prune = now + PRUNE_EVERY_S
                    self.events.prune()
                if self._db_failing:
                    log.info("alias event log readable again")
                self._db_failing = False
            except Exception as e:  # noqa: BLE001 - keep polling; the TTL still holds
                if not self._db_failing:
                    log.warning("alias event log unreadable (TTL fallback meanwhile): %s", e)
                self._db_failing = True
            stop.wait(self.poll_s)

    def start(self) -> threading.Event:
        """Poll in a daemon thread; set the event to stop it."""
        stop = threading.Event()
        threading.Thread(target=self.run, args=(stop,), name="alias-events", daemon=True).start()
        return stop


def _is_brand(tenant: str, brand: str) -> bool:
    try:
        check_name("tenant", tenant)
        check_name("brand", brand)
    except ValueError:
        return False
    return True
