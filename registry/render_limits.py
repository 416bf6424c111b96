"""Per-tenant render admission that holds across ingress replicas: in-flight slots and hourly
image-quota reservations are SQL rows with a lease, taken atomically under a per-tenant lock.

Admission is one short write transaction that holds the tenant's lock: `SELECT ... FOR UPDATE`
of the tenant's row on Postgres, `BEGIN IMMEDIATE` (the database's single writer lock) on
SQLite. Under it the limiter counts the tenant's live slots and its hourly usage plus live
reservations, and inserts its own rows only if they fit; so of any number of concurrent
requests, on any number of ingress replicas, no more are admitted than the limits allow.

A slot or reservation lives until its holder releases it (render done, failed or cancelled),
or commits a reservation as usage (a `renders` row, in the same transaction), or until its
lease runs out: an ingress that crashed mid-render leaks nothing for longer than one lease.
Holders renew the lease while they work (`renew`), so a long render keeps what it holds.
Times are the ingress's clock (as for the usage rows), so the replicas' clocks should agree
to well within a lease.

Async renders (`registry.render_queue`) count in the same totals without rows of their own: an
unfinished one reserves its images from the hourly quota (checked when it is queued, under the
same lock: `check_quota`), and one in progress holds one of the tenant's in-flight renders (the
dispatcher claims only with room: `room`).
"""

from __future__ import annotations

import datetime as dt
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import DateTime, ForeignKey, Integer, String, delete, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, Session, mapped_column

from registry.render_queue import rendering, unfinished_images
from registry.sql_base import Base, utcnow
from registry.tenants import RenderOrigin, RenderRow, TenantRow, adapter_columns

QUOTA_WINDOW = dt.timedelta(hours=1)


class RenderSlotRow(Base):
    """One render in flight for a tenant, held until released or its lease expires."""

    __tablename__ = "render_slots"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)


class QuotaReservationRow(Base):
    """Images set aside from a tenant's hourly quota for a render that has not finished."""

    __tablename__ = "quota_reservations"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    images: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)


class AdmissionRefused(Exception):
    """A render would take the tenant over a limit. `limit` is `max_inflight_renders` or
    `images_per_hour`; `used` counts what is in flight, or used plus reserved this hour."""

    def __init__(self, limit: str, cap: int, used: int, asked: int) -> None:
        self.limit, self.cap, self.used, self.asked = limit, cap, used, asked
        super().__init__(f"{limit}={cap}: {used} in use, {asked} asked")


@dataclass
class Admission:
    """What one admitted render holds: its slot and, for a tenant with a quota, its
    reservation of `images` images (None: no slot asked / no quota to reserve from).
    `ended` once committed or released: it holds nothing any more."""

    tenant_id: str
    images: int
    slot_id: str | None
    reservation_id: str | None
    ended: bool = False


def _new_id() -> str:
    return secrets.token_hex(12)


class RenderLimiter:
    """In-flight slots and quota reservations in the farm database. Thread-safe (a session
    per call); every method is one transaction."""

    def __init__(
        self, engine: Engine, lease_s: float, clock: Callable[[], dt.datetime] = utcnow
    ) -> None:
        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s}")
        self.engine = engine
        self.lease = dt.timedelta(seconds=lease_s)
        self.clock = clock
        self._sqlite_writer = threading.Lock() if engine.dialect.name == "sqlite" else None

    @contextmanager
    def _writing(self) -> Iterator[Session]:
        """A write transaction. On SQLite it holds the database's writer lock from its first
        statement, and the threads of this process queue for it on a lock of their own."""
        if self._sqlite_writer is None:
            with Session(self.engine) as s, s.begin():
                yield s
            return
        # SQLite's busy handler polls with growing sleeps; threads that queue here instead are
        # served in turn (see bench/render_limits.py).
        with self._sqlite_writer, Session(self.engine) as s, s.begin():
            # pysqlite begins lazily at the first write; a read before it would let two
            # admissions count the same rows. IMMEDIATE takes the writer lock now (another
            # process's admission waits up to the busy timeout).
            s.connection().exec_driver_sql("BEGIN IMMEDIATE")
            yield s

    @contextmanager
    def _tenant_locked(self, tenant_id: str) -> Iterator[tuple[Session, TenantRow]]:
        """A write transaction holding the tenant's admission lock until it commits: the
        tenant's row lock on Postgres, the writer lock on SQLite."""
        with self._writing() as s:
            tenant = s.scalar(select(TenantRow).where(TenantRow.id == tenant_id).with_for_update())
            if tenant is None:
                raise KeyError(tenant_id)
            yield s, tenant

    def _drop_expired(self, s: Session, tenant_id: str, now: dt.datetime) -> None:
        for table in (RenderSlotRow, QuotaReservationRow):
            s.execute(delete(table).where(table.tenant_id == tenant_id, table.expires_at <= now))

    @staticmethod
    def _slots_held(s: Session, tenant_id: str, now: dt.datetime) -> int:
        """Live slots (synchronous requests) plus async renders in progress."""
        n = s.scalar(
            select(func.count())
            .select_from(RenderSlotRow)
            .where(RenderSlotRow.tenant_id == tenant_id, RenderSlotRow.expires_at > now)
        )
        return int(n or 0) + int(s.scalar(rendering(tenant_id)) or 0)

    @staticmethod
    def _quota_used(s: Session, tenant_id: str, now: dt.datetime) -> int:
        """Images rendered in the last hour plus images live reservations hold."""
        rendered = s.scalar(
            select(func.coalesce(func.sum(RenderRow.images), 0)).where(
                RenderRow.tenant_id == tenant_id, RenderRow.created_at >= now - QUOTA_WINDOW
            )
        )
        reserved = s.scalar(
            select(func.coalesce(func.sum(QuotaReservationRow.images), 0)).where(
                QuotaReservationRow.tenant_id == tenant_id, QuotaReservationRow.expires_at > now
            )
        )
        queued = s.scalar(unfinished_images(tenant_id))
        return int(rendered or 0) + int(reserved or 0) + int(queued or 0)

    def check_quota(self, s: Session, tenant_id: str, images: int, render_id: str) -> None:
        """An `EnqueueCheck` for async renders: refuse the queued render `render_id` (already
        written in `s`, the tenant locked) if its `images` take the tenant over its hourly
        quota. Its row is the reservation: nothing else is written."""
        tenant = s.get(TenantRow, tenant_id)
        if tenant is None:
            raise KeyError(tenant_id)
        if tenant.images_per_hour is None:
            return
        used = self._quota_used(s, tenant_id, self.clock())  # the new row included
        if used > tenant.images_per_hour:
            raise AdmissionRefused("images_per_hour", tenant.images_per_hour, used - images, images)

    def room(self, s: Session, tenant_id: str, max_inflight: int | None) -> int | None:
        """How many more renders the tenant may start now under its in-flight cap (its own
        `max_inflight_renders`, else `max_inflight`; None: no cap). A `RoomCheck` for claims:
        on Postgres it takes the tenant's row lock, so a claim and an admission of the same
        tenant count one after the other."""
        tenant = s.scalar(select(TenantRow).where(TenantRow.id == tenant_id).with_for_update())
        cap = tenant.max_inflight_renders if tenant is not None else None
        cap = max_inflight if cap is None else cap
        if cap is None:
            return None
        return cap - self._slots_held(s, tenant_id, self.clock())

    def admit(
        self, tenant_id: str, images: int, max_inflight: int | None, slot: bool = True
    ) -> Admission:
        """Take a slot (unless `slot` is False) and reserve `images` images of the tenant's
        hourly quota, both or neither. `max_inflight` is the farm's in-flight cap, used when
        the tenant has no `max_inflight_renders` of its own (None: no cap). Raises
        `AdmissionRefused`, or KeyError for an unknown tenant."""
        if images < 1:
            raise ValueError(f"images must be >= 1, got {images}")
        with self._tenant_locked(tenant_id) as (s, tenant):
            now = self.clock()
            self._drop_expired(s, tenant_id, now)
            slot_id = None
            if slot:
                cap = tenant.max_inflight_renders
                cap = max_inflight if cap is None else cap
                if cap is not None:
                    held = self._slots_held(s, tenant_id, now)
                    if held >= cap:
                        raise AdmissionRefused("max_inflight_renders", cap, held, 1)
                slot_id = _new_id()
                s.add(
                    RenderSlotRow(
                        id=slot_id, tenant_id=tenant_id, created_at=now, expires_at=now + self.lease
                    )
                )
            reservation_id = None
            quota = tenant.images_per_hour
            if quota is not None:
                used = self._quota_used(s, tenant_id, now)
                if used + images > quota:
                    raise AdmissionRefused("images_per_hour", quota, used, images)
                reservation_id = _new_id()
                s.add(
                    QuotaReservationRow(
                        id=reservation_id,
                        tenant_id=tenant_id,
                        images=images,
                        created_at=now,
                        expires_at=now + self.lease,
                    )
                )
        return Admission(tenant_id, images, slot_id, reservation_id)

    def renew(self, admission: Admission) -> bool:
        """Extend the admission's lease by one lease from now; False if any of its rows had
        already expired (and may have been dropped: its limits no longer hold it)."""
        expires = self.clock() + self.lease
        renewed = expected = 0
        with self._writing() as s:
            for table, row_id in (
                (RenderSlotRow, admission.slot_id),
                (QuotaReservationRow, admission.reservation_id),
            ):
                if row_id is None:
                    continue
                expected += 1
                renewed += s.execute(
                    update(table).where(table.id == row_id).values(expires_at=expires)
                ).rowcount
        return renewed == expected

    @staticmethod
    def _drop(s: Session, admission: Admission) -> None:
        if admission.slot_id is not None:
            s.execute(delete(RenderSlotRow).where(RenderSlotRow.id == admission.slot_id))
        if admission.reservation_id is not None:
            held = QuotaReservationRow.id == admission.reservation_id
            s.execute(delete(QuotaReservationRow).where(held))

    def commit(
        self,
        admission: Admission,
        render_id: str,
        images: int,
        base_model: str,
        origin: RenderOrigin | None = None,
        adapter: tuple[str, int] | None = None,
    ) -> None:
        """The render succeeded: its slot and reservation become one usage row (`images`
        images; `origin`: the stored render an edit started from; `adapter`: the (brand,
        version) it used), in one transaction, so usage is counted exactly once."""
        with self._writing() as s:
            self._drop(s, admission)
            s.add(
                RenderRow(
                    id=render_id,
                    tenant_id=admission.tenant_id,
                    images=images,
                    base_model=base_model,
                    created_at=self.clock(),
                    **(origin.describe() if origin else {}),
                    **adapter_columns(adapter),
                )
            )
        admission.ended = True

    def release(self, admission: Admission) -> None:
        """Give back the slot and reservation of a render that failed or was cancelled (a
        no-op after `commit`), so the render charges nothing."""
        if admission.ended:
            return
        with self._writing() as s:
            self._drop(s, admission)
        admission.ended = True

    def inflight(self, tenant_id: str) -> int:
        """The tenant's live slots, on every ingress."""
        with Session(self.engine) as s:
            return self._slots_held(s, tenant_id, self.clock())

    def quota_used(self, tenant_id: str) -> int:
        """Images the tenant rendered in the last hour plus those live reservations hold."""
        with Session(self.engine) as s:
            return self._quota_used(s, tenant_id, self.clock())
