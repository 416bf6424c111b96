"""Webhooks in SQL: each tenant's signing secrets and default URL, the endpoints' health, and a
durable outbox of events and their deliveries with every attempt.

An event is written once (`enqueue`, or `add_event` inside the caller's own transaction, so that
a job's terminal transition and its event commit together) with one delivery row aimed at the
event's URL or the tenant's default. Delivery workers (`serve.webhooks`) on any number of ingress
replicas `claim` due deliveries with a lease (a compare-and-set on the row), send them, and
`record` each attempt: success, a retry at the next step of the backoff schedule, or failure. An
endpoint whose deliveries keep failing is disabled, with the reason; setting its URL again
re-enables it. Secrets are `whsec_` + base64 of 32 random bytes (the Standard Webhooks format).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import (
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, Session, mapped_column

from registry.secret_box import SecretBox, missing_key
from registry.sql_base import Base, utcnow
from registry.tenants import TenantRow

EVENT_TYPES = (
    "render.succeeded",
    "render.failed",
    "render.cancelled",
    "fine_tuning.job.succeeded",
    "fine_tuning.job.failed",
    "fine_tuning.job.cancelled",
    "adapter.version.created",
)
#: Delivery statuses: `pending` until it succeeds or its retries are spent (`failed`);
#: `no_endpoint` and `endpoint_disabled` were never sent. All but `pending` may be replayed.
DELIVERY_STATUSES = ("pending", "succeeded", "failed", "no_endpoint", "endpoint_disabled")
MAX_URL_CHARS = 2048
RESPONSE_EXCERPT_CHARS = 1024
SECRET_BYTES = 32
SEALED_CHARS = 400  # a sealed secret is ~170 characters


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    # SQLite hands back naive datetimes (stored as UTC); Postgres aware ones.
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=dt.UTC)


class WebhookTenantRow(Base):
    """A tenant's signing secrets and default URL."""

    __tablename__ = "webhook_tenants"
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    # Encrypted with the farm key (`registry.secret_box`); a plain `whsec_` value is a row
    # written before encryption, sealed by the ingress at start.
    secret: Mapped[str | None] = mapped_column(String(SEALED_CHARS))
    secret_created_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # After a rotation, deliveries carry a signature by the previous secret too, until then.
    previous_secret: Mapped[str | None] = mapped_column(String(SEALED_CHARS))
    previous_secret_until: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    url: Mapped[str | None] = mapped_column(String(MAX_URL_CHARS))


class WebhookEndpointRow(Base):
    """One URL a tenant's events go to, and whether it is disabled (and why)."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (UniqueConstraint("tenant_id", "url"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    url: Mapped[str] = mapped_column(String(MAX_URL_CHARS))
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    disabled_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    disabled_reason: Mapped[str | None] = mapped_column(Text)


class WebhookEventRow(Base):
    __tablename__ = "webhook_events"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # the `webhook-id` header
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[str] = mapped_column(Text)  # the exact JSON body: {type, timestamp, data}
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WebhookDeliveryRow(Base):
    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_finished", "status", "finished_at"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    event_id: Mapped[str] = mapped_column(ForeignKey("webhook_events.id"), index=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    url: Mapped[str | None] = mapped_column(String(MAX_URL_CHARS))
    status: Mapped[str] = mapped_column(String(20), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # of this round (a replay resets)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class WebhookAttemptRow(Base):
    __tablename__ = "webhook_attempts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_deliveries.id"), index=True)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    duration_ms: Mapped[float] = mapped_column(Float)
    status_code: Mapped[int | None] = mapped_column(Integer)
    response_body: Mapped[str | None] = mapped_column(Text)  # an excerpt
    error: Mapped[str | None] = mapped_column(Text)


class WebhookError(ValueError):
    """A webhook operation was refused (unknown tenant, nothing to replay)."""


@dataclass(frozen=True)
class WebhookConfig:
    url: str | None
    has_secret: bool
    secret_created_at: dt.datetime | None
    previous_secret_until: dt.datetime | None
    disabled: dict[str, str]  # URL → why it was disabled


@dataclass(frozen=True)
class Outcome:
    """One delivery attempt's result."""

    status_code: int | None
    response_body: str | None
    error: str | None
    duration_ms: float

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    def summary(self) -> str:
        return self.error or f"HTTP {self.status_code}"


@dataclass(frozen=True)
class DueDelivery:
    """A delivery a worker has claimed: what to send where."""

    id: str
    event_id: str
    tenant_id: str
    url: str
    payload: str
    attempts: int


@dataclass(frozen=True)
class Attempt:
    started_at: dt.datetime
    duration_ms: float
    status_code: int | None
    response_body: str | None
    error: str | None


@dataclass(frozen=True)
class Delivery:
    id: str
    event_id: str
    event_type: str
    payload: dict
    url: str | None
    status: str
    created_at: dt.datetime
    next_attempt_at: dt.datetime | None
    finished_at: dt.datetime | None
    last_error: str | None
    attempts: list[Attempt]


def _upsert_endpoint(session: Session, tenant_id: str, url: str) -> WebhookEndpointRow:
    """The endpoint row of (tenant, url), created if missing (safe against a racing insert)."""
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    session.execute(
        dialect.insert(WebhookEndpointRow)
        .values(tenant_id=tenant_id, url=url, consecutive_failures=0)
        .on_conflict_do_nothing(index_elements=["tenant_id", "url"])
    )
    return session.scalars(
        select(WebhookEndpointRow).where(
            WebhookEndpointRow.tenant_id == tenant_id, WebhookEndpointRow.url == url
        )
    ).one()


def add_event(
    session: Session,
    tenant_id: str,
    event_type: str,
    data: dict,
    webhook_url: str | None = None,
) -> str:
    """Write an event and its delivery in `session`'s transaction; returns the delivery id.
    The URL is `webhook_url`, else the tenant's default; with neither, the delivery is recorded
    as `no_endpoint`. A URL whose endpoint is disabled is recorded as `endpoint_disabled`."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown webhook event type {event_type!r}; known: {EVENT_TYPES}")
    now = utcnow()
    event_id = f"msg_{secrets.token_hex(12)}"
    body = {"type": event_type, "timestamp": now.isoformat().replace("+00:00", "Z"), "data": data}
    session.add(
        WebhookEventRow(
            id=event_id,
            tenant_id=tenant_id,
            type=event_type,
            payload=json.dumps(body, separators=(",", ":")),
            created_at=now,
        )
    )
    url = webhook_url
    if url is None:
        config = session.get(WebhookTenantRow, tenant_id)
        url = config.url if config is not None else None
    status, due = "no_endpoint", None
    if url is not None:
        endpoint = _upsert_endpoint(session, tenant_id, url)
        status, due = ("endpoint_disabled", None) if endpoint.disabled_at else ("pending", now)
    delivery_id = f"whdel_{secrets.token_hex(12)}"
    session.flush()  # the delivery references the event
    session.add(
        WebhookDeliveryRow(
            id=delivery_id,
            event_id=event_id,
            tenant_id=tenant_id,
            url=url,
            status=status,
            attempts=0,
            next_attempt_at=due,
            created_at=now,
            finished_at=None if status == "pending" else now,
        )
    )
    return delivery_id


class WebhookStore:
    """`box` seals the signing secrets at rest (`registry.secret_box`); without one, a secret
    cannot be created, and only a plain row written before encryption can be read."""

    def __init__(self, engine: Engine, box: SecretBox | None = None) -> None:
        self.engine = engine
        self.box = box

    def _seal(self, secret: str) -> str:
        if self.box is None:
            raise missing_key("cannot store a webhook secret")
        return self.box.seal(secret)

    def _open(self, stored: str) -> str:
        if self.box is None:
            if SecretBox.is_sealed(stored):
                raise missing_key("cannot read a webhook secret")
            return stored
        return self.box.open(stored)

    def reseal_secrets(self) -> int:
        """Seal every secret with the box's first key: plain rows written before encryption,
        and rows sealed with an older key (so it can be dropped). Each row is a compare-and-set
        on the value read, so ingress replicas that start together may all run it. Returns how
        many values it changed."""
        if self.box is None:
            raise missing_key("cannot seal the webhook secrets")
        changed = 0
        with Session(self.engine) as s:
            rows = s.execute(
                select(
                    WebhookTenantRow.tenant_id,
                    WebhookTenantRow.secret,
                    WebhookTenantRow.previous_secret,
                )
            ).all()
        for tenant_id, *values in rows:
            for column, value in zip(("secret", "previous_secret"), values, strict=True):
                if value is None or self.box.is_current(value):
                    continue
                col = getattr(WebhookTenantRow, column)
                with Session(self.engine) as s, s.begin():
                    done = s.execute(
                        update(WebhookTenantRow)
                        .where(WebhookTenantRow.tenant_id == tenant_id, col == value)
                        .values({column: self.box.reseal(value)})
                    )
                    changed += done.rowcount
        return changed

    # --- a tenant's secrets and default URL --------------------------------------------------
    def _tenant_row(self, session: Session, tenant_id: str) -> WebhookTenantRow:
        if session.get(TenantRow, tenant_id) is None:
            raise WebhookError(f"no tenant {tenant_id!r}")
        row = session.get(WebhookTenantRow, tenant_id)
        if row is None:
            row = WebhookTenantRow(tenant_id=tenant_id)
            session.add(row)
        return row

    def rotate_secret(self, tenant_id: str, grace_s: float) -> str:
        """A new signing secret (shown once to the caller); the old one keeps signing for
        `grace_s` seconds, beside the new one."""
        secret = new_secret()
        now = utcnow()
        with Session(self.engine) as s, s.begin():
            row = self._tenant_row(s, tenant_id)
            if row.secret is not None and grace_s > 0:
                row.previous_secret = row.secret
                row.previous_secret_until = now + dt.timedelta(seconds=grace_s)
            else:
                row.previous_secret, row.previous_secret_until = None, None
            row.secret, row.secret_created_at = self._seal(secret), now
        return secret

    def ensure_secret(self, tenant_id: str) -> str | None:
        """Create the tenant's first secret; the new secret, or None if it already had one."""
        with Session(self.engine) as s, s.begin():
            row = self._tenant_row(s, tenant_id)
            if row.secret is not None:
                return None
            secret = new_secret()
            row.secret, row.secret_created_at = self._seal(secret), utcnow()
            return secret

    def signing_secrets(self, tenant_id: str) -> list[str]:
        """The secrets a delivery is signed with now: the current one, then the previous one
        while its grace period lasts. Empty if the tenant has none."""
        with Session(self.engine) as s:
            row = s.get(WebhookTenantRow, tenant_id)
            if row is None or row.secret is None:
                return []
            out = [self._open(row.secret)]
            until = _aware(row.previous_secret_until)
            if row.previous_secret and until is not None and until > utcnow():
                out.append(self._open(row.previous_secret))
            return out

    def set_url(self, tenant_id: str, url: str | None) -> WebhookConfig:
        """Set (None: clear) the tenant's default URL; setting a URL re-enables its endpoint."""
        with Session(self.engine) as s, s.begin():
            row = self._tenant_row(s, tenant_id)
            row.url = url
            if url is not None:
                s.flush()
                endpoint = _upsert_endpoint(s, tenant_id, url)
                endpoint.disabled_at, endpoint.disabled_reason = None, None
                endpoint.consecutive_failures = 0
        return self.config(tenant_id)

    def config(self, tenant_id: str) -> WebhookConfig:
        with Session(self.engine) as s:
            row = s.get(WebhookTenantRow, tenant_id)
            disabled = s.scalars(
                select(WebhookEndpointRow).where(
                    WebhookEndpointRow.tenant_id == tenant_id,
                    WebhookEndpointRow.disabled_at.is_not(None),
                )
            )
            return WebhookConfig(
                url=row.url if row else None,
                has_secret=bool(row and row.secret),
                secret_created_at=_aware(row.secret_created_at) if row else None,
                previous_secret_until=_aware(row.previous_secret_until) if row else None,
                disabled={e.url: e.disabled_reason or "" for e in disabled},
            )

    # --- the outbox ----------------------------------------------------------------------------
    def enqueue(
        self, tenant_id: str, event_type: str, data: dict, webhook_url: str | None = None
    ) -> str:
        """Record an event for delivery (its own transaction); returns the delivery id."""
        with Session(self.engine) as s, s.begin():
            return add_event(s, tenant_id, event_type, data, webhook_url)

    def claim(self, owner: str, lease_s: float, limit: int) -> list[DueDelivery]:
        """Take up to `limit` due deliveries for `lease_s` seconds. Each row is taken by a
        compare-and-set on its lease, so two workers never hold the same delivery; a worker
        that dies lets its lease run out and another takes the delivery over."""
        now = utcnow()
        free = or_(WebhookDeliveryRow.lease_until.is_(None), WebhookDeliveryRow.lease_until < now)
        due = (
            WebhookDeliveryRow.status == "pending",
            WebhookDeliveryRow.next_attempt_at <= now,
            free,
        )
        claimed: list[DueDelivery] = []
        with Session(self.engine) as s:
            ids = s.scalars(
                select(WebhookDeliveryRow.id)
                .where(*due)
                .order_by(WebhookDeliveryRow.next_attempt_at)
                .limit(limit)
            ).all()
        for delivery_id in ids:
            with Session(self.engine) as s, s.begin():
                won = s.execute(
                    update(WebhookDeliveryRow)
                    .where(WebhookDeliveryRow.id == delivery_id, *due)
                    .values(lease_owner=owner, lease_until=now + dt.timedelta(seconds=lease_s))
                )
                if won.rowcount != 1:
                    continue  # another worker took it
                row = s.get(WebhookDeliveryRow, delivery_id)
                endpoint = _upsert_endpoint(s, row.tenant_id, row.url)
                if endpoint.disabled_at is not None:
                    # Disabled since it was queued: it waits for a replay, unsent.
                    row.status, row.finished_at = "endpoint_disabled", now
                    row.lease_owner, row.lease_until, row.next_attempt_at = None, None, None
                    continue
                event = s.get(WebhookEventRow, row.event_id)
                claimed.append(
                    DueDelivery(
                        row.id, row.event_id, row.tenant_id, row.url, event.payload, row.attempts
                    )
                )
        return claimed

    def record(
        self,
        delivery_id: str,
        owner: str,
        outcome: Outcome,
        retry_schedule_s: Sequence[float],
        disable_after: int,
    ) -> str | None:
        """Record one attempt by the lease holder `owner`; returns the delivery's new status
        (None: the lease was lost, and the attempt is not recorded). A failed attempt is
        retried after `retry_schedule_s[attempts - 1]` seconds while the schedule lasts; the
        endpoint is disabled after `disable_after` deliveries in a row that failed for good."""
        now = utcnow()
        with Session(self.engine) as s, s.begin():
            row = s.get(WebhookDeliveryRow, delivery_id, with_for_update=True)
            if row is None or row.status != "pending" or row.lease_owner != owner:
                return None
            s.add(
                WebhookAttemptRow(
                    delivery_id=delivery_id,
                    started_at=now - dt.timedelta(milliseconds=outcome.duration_ms),
                    duration_ms=outcome.duration_ms,
                    status_code=outcome.status_code,
                    response_body=(outcome.response_body or "")[:RESPONSE_EXCERPT_CHARS] or None,
                    error=outcome.error,
                )
            )
            row.attempts += 1
            row.last_status_code, row.last_error = outcome.status_code, outcome.error
            row.lease_owner, row.lease_until = None, None
            endpoint = _upsert_endpoint(s, row.tenant_id, row.url)
            if outcome.ok:
                row.status, row.finished_at, row.next_attempt_at = "succeeded", now, None
                endpoint.consecutive_failures = 0
            elif row.attempts <= len(retry_schedule_s):
                wait = retry_schedule_s[row.attempts - 1]
                row.next_attempt_at = now + dt.timedelta(seconds=wait)
            else:
                row.status, row.finished_at, row.next_attempt_at = "failed", now, None
                endpoint.consecutive_failures += 1
                if endpoint.consecutive_failures >= disable_after and not endpoint.disabled_at:
                    endpoint.disabled_at = now
                    endpoint.disabled_reason = (
                        f"{endpoint.consecutive_failures} deliveries in a row failed after "
                        f"{row.attempts} attempts each; the last: {outcome.summary()}"
                    )
            return row.status

    # --- a tenant's view ----------------------------------------------------------------------
    def _delivery(self, s: Session, row: WebhookDeliveryRow) -> Delivery:
        event = s.get(WebhookEventRow, row.event_id)
        attempts = s.scalars(
            select(WebhookAttemptRow)
            .where(WebhookAttemptRow.delivery_id == row.id)
            .order_by(WebhookAttemptRow.id)
        )
        return Delivery(
            id=row.id,
            event_id=row.event_id,
            event_type=event.type,
            payload=json.loads(event.payload),
            url=row.url,
            status=row.status,
            created_at=_aware(row.created_at),
            next_attempt_at=_aware(row.next_attempt_at),
            finished_at=_aware(row.finished_at),
            last_error=row.last_error,
            attempts=[
                Attempt(
                    _aware(a.started_at), a.duration_ms, a.status_code, a.response_body, a.error
                )
                for a in attempts
            ],
        )

    def get(self, tenant_id: str, delivery_id: str) -> Delivery | None:
        with Session(self.engine) as s:
            row = s.get(WebhookDeliveryRow, delivery_id)
            if row is None or row.tenant_id != tenant_id:
                return None
            return self._delivery(s, row)

    def list(
        self, tenant_id: str, after: str | None, limit: int, event_type: str | None = None
    ) -> tuple[list[Delivery], bool]:
        """Newest first; `after` is the id of the last delivery of the previous page."""
        with Session(self.engine) as s:
            q = select(WebhookDeliveryRow).where(WebhookDeliveryRow.tenant_id == tenant_id)
            if event_type is not None:
                q = q.join(WebhookEventRow).where(WebhookEventRow.type == event_type)
            if after:
                anchor = s.get(WebhookDeliveryRow, after)
                if anchor is None or anchor.tenant_id != tenant_id:
                    raise KeyError(after)
                q = q.where(
                    (WebhookDeliveryRow.created_at < anchor.created_at)
                    | (
                        (WebhookDeliveryRow.created_at == anchor.created_at)
                        & (WebhookDeliveryRow.id < anchor.id)
                    )
                )
            rows = s.scalars(
                q.order_by(
                    WebhookDeliveryRow.created_at.desc(), WebhookDeliveryRow.id.desc()
                ).limit(limit + 1)
            ).all()
            out = [self._delivery(s, r) for r in rows[:limit]]
        return out, len(rows) > limit

    def replay(self, tenant_id: str, delivery_id: str, url: str | None = None) -> Delivery | None:
        """Send a finished delivery again, now, with a fresh retry schedule (same event, same
        `webhook-id`), to its URL, or to `url` (the tenant's default, for one that had none).
        None if the tenant has no such delivery; WebhookError if it cannot be sent."""
        with Session(self.engine) as s, s.begin():
            row = s.get(WebhookDeliveryRow, delivery_id, with_for_update=True)
            if row is None or row.tenant_id != tenant_id:
                return None
            if row.status == "pending":
                raise WebhookError(f"delivery {delivery_id} is still being attempted")
            target = row.url or url
            if target is None:
                raise WebhookError("no webhook URL: set a default with PUT /v1/webhooks/config")
            endpoint = _upsert_endpoint(s, tenant_id, target)
            if endpoint.disabled_at is not None:
                raise WebhookError(
                    f"the endpoint {target} is disabled ({endpoint.disabled_reason}); "
                    "re-enable it by setting it again with PUT /v1/webhooks/config"
                )
            row.url, row.status, row.attempts = target, "pending", 0
            row.next_attempt_at, row.finished_at = utcnow(), None
            row.lease_owner, row.lease_until = None, None
        return self.get(tenant_id, delivery_id)
