"""Tenants, their API keys, their limit overrides and their render usage, in SQL through
SQLAlchemy.

A key is `bf-<key_id>-<secret>`. Only `sha256(salt || secret)` is stored; lookups go by `key_id`
and the digest is compared in constant time. SQLite by default, any SQLAlchemy URL (Postgres)
by configuration.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    func,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from registry.db import make_engine
from registry.sql_base import Base, utcnow

TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
_KEY = re.compile(r"^bf-([0-9a-f]{12})-([A-Za-z0-9_-]{43})$")
_DUMMY_SALT = b"\0" * 16


class TenantRow(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(63), primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    images_per_hour: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Overrides of the farm's tenant limits (registry.settings); NULL: the setting applies.
    max_concurrent_fine_tunes: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_queued_jobs: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_stored_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    render_retention_days: Mapped[float | None] = mapped_column(Float, nullable=True)
    max_inflight_renders: Mapped[int | None] = mapped_column(Integer, nullable=True)


class ApiKeyRow(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(12), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    salt: Mapped[bytes] = mapped_column(LargeBinary(16))
    digest: Mapped[bytes] = mapped_column(LargeBinary(32))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class RenderRow(Base):
    """One accepted render request: usage for quotas and the audit trail of stored objects."""

    __tablename__ = "renders"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, index=True
    )
    images: Mapped[int] = mapped_column(Integer)
    base_model: Mapped[str] = mapped_column(String(255))
    # When the retention sweep deleted the render's objects; the row stays as usage record.
    expired_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Set when the render is an operation on a stored render (vary, upscale, ...): its source.
    source_render: Mapped[str | None] = mapped_column(String(32), nullable=True)
    source_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    operation: Mapped[str | None] = mapped_column(String(20), nullable=True)
    # The adapter version the render used (None: the base model): per-version render counts.
    adapter_brand: Mapped[str | None] = mapped_column(String(63), nullable=True)
    adapter_version: Mapped[int | None] = mapped_column(Integer, nullable=True)

    __table_args__ = (Index("ix_renders_adapter", "tenant_id", "adapter_brand", "adapter_version"),)


def adapter_columns(adapter: tuple[str, int] | None) -> dict[str, object]:
    """A usage row's adapter columns for the (brand, version) a render used."""
    if adapter is None:
        return {}
    return {"adapter_brand": adapter[0], "adapter_version": adapter[1]}


@dataclass(frozen=True)
class VersionUsage:
    """Renders and images of one adapter version, from the usage rows (every ingress)."""

    renders: int
    images: int


@dataclass(frozen=True)
class RenderOrigin:
    """Where a derived render came from: an image of a stored render and the operation."""

    source_render: str
    source_index: int
    operation: str

    def describe(self) -> dict:
        return {
            "source_render": self.source_render,
            "source_index": self.source_index,
            "operation": self.operation,
        }


@dataclass(frozen=True)
class StoredRender:
    """A tenant's render as recorded: what an operation on it needs to know."""

    id: str
    images: int
    expired: bool


@dataclass(frozen=True)
class LimitOverrides:
    """A tenant's own limits; None means the farm's setting of the same name applies."""

    max_concurrent_fine_tunes: int | None = None
    max_queued_jobs: int | None = None
    max_stored_bytes: int | None = None
    render_retention_days: float | None = None
    max_inflight_renders: int | None = None

    @classmethod
    def of(cls, row: TenantRow) -> LimitOverrides:
        return cls(**{name: getattr(row, name) for name in LIMIT_FIELDS})


LIMIT_FIELDS = tuple(LimitOverrides.__dataclass_fields__)


@dataclass(frozen=True)
class Tenant:
    id: str
    created_at: dt.datetime
    images_per_hour: int | None
    active_keys: int
    limits: LimitOverrides = LimitOverrides()


@dataclass(frozen=True)
class IssuedKey:
    tenant_id: str
    key_id: str
    key: str  # the plaintext key: shown once, never stored


class TenantError(ValueError):
    """A tenant operation was refused (bad name, duplicate, unknown tenant or key)."""


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


class TenantDirectory:
    """Create tenants, issue and revoke keys, authenticate requests, count usage."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def from_url(cls, url: str) -> TenantDirectory:
        return cls(make_engine(url))

    def _issue_key(self, session: Session, tenant_id: str) -> IssuedKey:
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        session.add(
            ApiKeyRow(id=key_id, tenant_id=tenant_id, salt=salt, digest=_digest(salt, secret))
        )
        return IssuedKey(tenant_id, key_id, f"bf-{key_id}-{secret}")

    def create_tenant(self, name: str, images_per_hour: int | None = None) -> IssuedKey:
        if not TENANT_NAME.match(name):
            raise TenantError(
                f"tenant name {name!r} must match [a-z0-9][a-z0-9-]{{1,62}} "
                "(lowercase letters, digits, dashes; 2-63 characters)"
            )
        if images_per_hour is not None and images_per_hour < 1:
            raise TenantError("images_per_hour must be >= 1 (or unset for no quota)")
        try:
            with Session(self.engine) as s, s.begin():
                s.add(TenantRow(id=name, images_per_hour=images_per_hour))
                s.flush()
                return self._issue_key(s, name)
        except IntegrityError as e:
            raise TenantError(f"tenant {name!r} already exists") from e

    def add_key(self, tenant_id: str) -> IssuedKey:
        with Session(self.engine) as s, s.begin():
            if s.get(TenantRow, tenant_id) is None:
                raise TenantError(f"no tenant {tenant_id!r}")
            return self._issue_key(s, tenant_id)

    def revoke_key(self, key_id: str) -> str:
        """Revoke a key by its id (the 12 hex characters after `bf-`); returns its tenant."""
        with Session(self.engine) as s, s.begin():
            row = s.get(ApiKeyRow, key_id)
            if row is None:
                raise TenantError(f"no key {key_id!r}")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            return row.tenant_id

    def _tenants(self, tenant_id: str | None) -> list[Tenant]:
        with Session(self.engine) as s:
            active = (
                select(ApiKeyRow.tenant_id, func.count().label("n"))
                .where(ApiKeyRow.revoked_at.is_(None))
                .group_by(ApiKeyRow.tenant_id)
                .subquery()
            )
            q = select(TenantRow, func.coalesce(active.c.n, 0)).outerjoin(
                active, active.c.tenant_id == TenantRow.id
            )
            if tenant_id is not None:
                q = q.where(TenantRow.id == tenant_id)
            rows = s.execute(q.order_by(TenantRow.id)).all()
            return [
                Tenant(t.id, t.created_at, t.images_per_hour, int(n), LimitOverrides.of(t))
                for t, n in rows
            ]

    def set_limits(self, tenant_id: str, **overrides: float | None) -> Tenant:
        """Set the named limit overrides (`LimitOverrides` fields); None returns one to the
        farm's setting. Counts and bytes must be >= 0, retention days > 0."""
        unknown = set(overrides) - set(LIMIT_FIELDS)
        if unknown:
            raise TenantError(f"unknown limits {sorted(unknown)}; known: {list(LIMIT_FIELDS)}")
        for name, value in overrides.items():
            if value is None:
                continue
            if name == "render_retention_days":
                if not value > 0:
                    raise TenantError(f"{name} must be > 0 days (or unset: keep forever)")
            else:
                top = 2**63 if name == "max_stored_bytes" else 2**31  # BIGINT / INTEGER columns
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < top:
                    raise TenantError(f"{name} must be a whole number in [0, {top}), got {value!r}")
        with Session(self.engine) as s, s.begin():
            row = s.get(TenantRow, tenant_id)
            if row is None:
                raise TenantError(f"no tenant {tenant_id!r}")
            for name, value in overrides.items():
                setattr(row, name, value)
        return self._tenants(tenant_id)[0]

    def list_tenants(self) -> list[Tenant]:
        return self._tenants(None)

    def get_tenant(self, tenant_id: str) -> Tenant | None:
        """One tenant (a single-row query: the render path asks this on every request)."""
        found = self._tenants(tenant_id)
        return found[0] if found else None

    def authenticate(self, key: str | None) -> str | None:
        """The tenant id a key belongs to, or None. Same work whether or not the key exists."""
        m = _KEY.match(key or "")
        key_id, secret = (m.group(1), m.group(2)) if m else ("", "")
        row = None
        if m:
            with Session(self.engine) as s:
                row = s.get(ApiKeyRow, key_id)
        salt, expected = (row.salt, row.digest) if row else (_DUMMY_SALT, b"\0" * 32)
        ok = hmac.compare_digest(_digest(salt, secret), expected)
        if ok and row is not None and row.revoked_at is None:
            return row.tenant_id
        return None

    def images_in_last_hour(self, tenant_id: str) -> int:
        since = utcnow() - dt.timedelta(hours=1)
        with Session(self.engine) as s:
            n = s.scalar(
                select(func.coalesce(func.sum(RenderRow.images), 0)).where(
                    RenderRow.tenant_id == tenant_id, RenderRow.created_at >= since
                )
            )
            return int(n or 0)

    def record_render(
        self,
        render_id: str,
        tenant_id: str,
        images: int,
        base_model: str,
        origin: RenderOrigin | None = None,
    ) -> None:
        with Session(self.engine) as s, s.begin():
            s.add(
                RenderRow(
                    id=render_id,
                    tenant_id=tenant_id,
                    images=images,
                    base_model=base_model,
                    **(origin.describe() if origin else {}),
                )
            )

    def get_render(self, tenant_id: str, render_id: str) -> StoredRender | None:
        """The tenant's own render; None for a missing id and for another tenant's alike."""
        with Session(self.engine) as s:
            row = s.scalar(
                select(RenderRow).where(RenderRow.id == render_id, RenderRow.tenant_id == tenant_id)
            )
            if row is None:
                return None
            return StoredRender(row.id, row.images, row.expired_at is not None)

    def render_origin(self, render_id: str) -> RenderOrigin | None:
        """What a render was derived from, as recorded (None for a plain generation)."""
        with Session(self.engine) as s:
            row = s.get(RenderRow, render_id)
            if row is None or row.operation is None:
                return None
            return RenderOrigin(row.source_render, row.source_index, row.operation)

    def adapter_usage(
        self, tenant_id: str, since: dt.datetime | None = None
    ) -> dict[tuple[str, int], VersionUsage]:
        """(brand, version) -> the tenant's successful renders and images with that version,
        since `since` (default: ever; usage rows outlive the images' retention)."""
        when = [RenderRow.created_at >= since] if since is not None else []
        with Session(self.engine) as s:
            rows = s.execute(
                select(
                    RenderRow.adapter_brand,
                    RenderRow.adapter_version,
                    func.count(),
                    func.coalesce(func.sum(RenderRow.images), 0),
                )
                .where(
                    RenderRow.tenant_id == tenant_id, RenderRow.adapter_brand.is_not(None), *when
                )
                .group_by(RenderRow.adapter_brand, RenderRow.adapter_version)
            ).all()
        return {(b, int(v)): VersionUsage(int(n), int(i)) for b, v, n, i in rows}

    def count_renders(self, tenant_id: str | None = None) -> int:
        with Session(self.engine) as s:
            q = select(func.count()).select_from(RenderRow)
            if tenant_id:
                q = q.where(RenderRow.tenant_id == tenant_id)
            return int(s.scalar(q) or 0)
