"""The durable render queue: one SQL row per async render, and each tenant's render plan.

A render moves queued → in_progress → succeeded | failed | cancelled and never leaves a terminal
state. Every change is a compare-and-set on the row (`UPDATE ... WHERE status = ... AND
lease_owner = ...`, then the row count), so of two racing changes exactly one wins: a dispatcher
whose lease expired (its render was queued again and claimed by another) records nothing, and
a render cancelled while it ran is never recorded as succeeded. The usage row that charges the
tenant (`renders`, keyed by the render id) is written in the same transaction as the success,
so a render is charged exactly once, and never when it was cancelled.

Claims take the queued rows in scheduling order, `tier` first (fast before relax), then the
virtual finish time of weighted fair queuing (start-time fair queuing: a render's virtual start
is the later of the tier's virtual time and its tenant's last virtual finish; its finish adds
its cost, image-steps, divided by the tenant's weight). Postgres claims with `FOR UPDATE SKIP
LOCKED`, so two dispatchers never wait on each other's rows; SQLite serialises writers and the
compare-and-set alone decides.

A synchronous render (`POST /v1/images/generations`) takes a ticket in the same order: a row
with `sync` set, leased from the start to the dispatcher of the ingress replica that holds its
client (`lease_owner` on a queued row). Only that dispatcher claims it, and it hands the turn to
the waiting request, which renders, stores and charges as before (`finish_sync` closes the row;
no usage row, no event here). A sync ticket whose dispatcher's lease lapsed (its replica died,
and with it the client's connection) fails; it is never queued again.

Async renders count against their tenant's hourly quota from enqueue (`unfinished_images`) and,
while in progress, against its in-flight cap (`rendering`), in the same counts the synchronous
path's admission uses (`registry.render_limits`): a terminal change stops counting them and a
success's usage row replaces them in one transaction, so nothing is reserved twice or leaked.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    Select,
    String,
    Text,
    false,
    func,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, Session, mapped_column

from registry.sql_base import Base, utcnow
from registry.tenants import RenderRow, TenantRow, adapter_columns

STATUSES = ("queued", "in_progress", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
UNFINISHED = ("queued", "in_progress")
#: Priority tiers, in claim order: a relax render is claimed only when no fast one waits.
TIERS = {"fast": 0, "relax": 1}
#: Render plans and the tiers each allows.
PLANS = {"fast": ("fast", "relax"), "relax": ("relax",)}


class RenderTaskRow(Base):
    __tablename__ = "render_tasks"
    __table_args__ = (
        Index("ix_render_tasks_claim", "status", "tier", "vfinish"),
        Index("ix_render_tasks_event_pending", "event_pending"),
        Index("ix_render_tasks_finished", "status", "finished_at"),  # the retention sweep
    )
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    priority: Mapped[str] = mapped_column(String(8))
    tier: Mapped[int] = mapped_column(Integer)
    request: Mapped[str] = mapped_column(Text)  # JSON: the validated job, adapter, format
    webhook_url: Mapped[str | None] = mapped_column(Text)
    images: Mapped[int] = mapped_column(Integer)
    cost: Mapped[float] = mapped_column(Float)  # image-steps
    vstart: Mapped[float] = mapped_column(Float, default=0.0)
    vfinish: Mapped[float] = mapped_column(Float, default=0.0)
    progress_step: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    # The dispatcher of the latest claim, kept after the render ends (which ingress ran it).
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    result: Mapped[str | None] = mapped_column(Text)  # JSON: stored image keys and seeds
    error: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(String(40))
    # True from a terminal change until its event was handed to the sink (`event_sent`).
    event_pending: Mapped[bool] = mapped_column(Boolean, default=False)
    # The ticket of a synchronous request (`lease_owner`: its ingress's dispatcher).
    sync: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class RenderPlanRow(Base):
    """A tenant's render plan (which tiers), its fair-share weight and its queue-length cap;
    a tenant without a row has the farm's defaults."""

    __tablename__ = "render_plans"
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    plan: Mapped[str] = mapped_column(String(16))
    weight: Mapped[float] = mapped_column(Float, default=1.0)
    max_queued: Mapped[int | None] = mapped_column(Integer)


@dataclass(frozen=True)
class RenderTask:
    id: str
    tenant_id: str
    status: str
    priority: str
    request: dict
    webhook_url: str | None
    images: int
    cost: float
    vstart: float
    vfinish: float
    progress_step: int
    progress_total: int
    attempts: int
    lease_owner: str | None
    claimed_by: str | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    result: dict | None
    error: str | None
    error_code: str | None
    sync: bool = False

    @classmethod
    def of(cls, r: RenderTaskRow) -> RenderTask:
        return cls(
            r.id,
            r.tenant_id,
            r.status,
            r.priority,
            json.loads(r.request),
            r.webhook_url,
            r.images,
            r.cost,
            r.vstart,
            r.vfinish,
            r.progress_step,
            r.progress_total,
            r.attempts,
            r.lease_owner,
            r.claimed_by,
            r.created_at,
            r.started_at,
            r.finished_at,
            json.loads(r.result) if r.result else None,
            r.error,
            r.error_code,
            r.sync,
        )


@dataclass(frozen=True)
class RenderPlan:
    plan: str
    weight: float
    max_queued: int | None  # None: the farm's setting applies

    @property
    def tiers(self) -> tuple[str, ...]:
        return PLANS[self.plan]


class QueueFull(Exception):
    """The tenant already has `cap` unfinished renders."""

    def __init__(self, cap: int, used: int) -> None:
        super().__init__(f"{used} unfinished renders of {cap}")
        self.cap = cap
        self.used = used


#: `check(session, tenant_id, images, render_id)`, run inside the enqueue's transaction with the
#: tenant locked and the new row written: raises to refuse it (`RenderLimiter.check_quota`).
EnqueueCheck = Callable[[Session, str, int, str], None]
#: `room(session, tenant_id)`: how many more renders the tenant may start now (None: no cap).
RoomCheck = Callable[[Session, str], int | None]


def _async_rows(tenant_id: str) -> object:  # a SQL expression
    return (RenderTaskRow.tenant_id == tenant_id) & RenderTaskRow.sync.is_(False)


def unfinished_images(tenant_id: str) -> Select:
    """Images of the tenant's async renders not yet ended: reserved from its hourly quota."""
    return select(func.coalesce(func.sum(RenderTaskRow.images), 0)).where(
        _async_rows(tenant_id), RenderTaskRow.status.in_(UNFINISHED)
    )


def rendering(tenant_id: str) -> Select:
    """The tenant's async renders in progress: each holds one of its in-flight renders."""
    return select(func.count()).where(_async_rows(tenant_id), RenderTaskRow.status == "in_progress")


class RenderQueueStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # --- plans ---------------------------------------------------------------------------------
    def plan(self, tenant_id: str, default_plan: str) -> RenderPlan:
        with Session(self.engine) as s:
            row = s.get(RenderPlanRow, tenant_id)
            if row is None:
                return RenderPlan(default_plan, 1.0, None)
            return RenderPlan(row.plan, row.weight, row.max_queued)

    def set_plan(
        self, tenant_id: str, plan: str, weight: float = 1.0, max_queued: int | None = None
    ) -> RenderPlan:
        if plan not in PLANS:
            raise ValueError(f"plan must be one of {sorted(PLANS)}, got {plan!r}")
        if not 0 < weight <= 1000:
            raise ValueError(f"weight must be in (0, 1000], got {weight}")
        if max_queued is not None and not 0 <= max_queued < 2**31:
            raise ValueError(f"max_queued must be a whole number >= 0, got {max_queued}")
        with Session(self.engine) as s, s.begin():
            if s.get(TenantRow, tenant_id) is None:
                raise KeyError(tenant_id)
            row = s.get(RenderPlanRow, tenant_id)
            if row is None:
                row = RenderPlanRow(tenant_id=tenant_id)
                s.add(row)
            row.plan, row.weight, row.max_queued = plan, weight, max_queued
        return RenderPlan(plan, weight, max_queued)

    # --- enqueue -------------------------------------------------------------------------------
    def enqueue(
        self,
        tenant_id: str,
        priority: str,
        request: dict,
        images: int,
        steps: int,
        weight: float,
        max_queued: int | None,
        webhook_url: str | None = None,
        *,
        check: EnqueueCheck | None = None,
        sync_owner: str | None = None,
        lease_s: float = 60.0,
        render_id: str | None = None,
    ) -> RenderTask:
        """Record a queued render with its fair-queuing tags; `QueueFull` when the tenant
        already has `max_queued` unfinished async renders, and whatever `check` raises (the
        hourly quota), both decided atomically with the insert. `sync_owner`: the ticket of a
        synchronous request, leased for `lease_s` to that dispatcher (`render_id` given by it).
        `render_id` is the id the caller drew (a new one by default)."""
        tier = TIERS[priority]
        render_id = render_id or f"render-{secrets.token_hex(12)}"
        cost = float(images * steps)
        with Session(self.engine) as s, s.begin():
            if self.engine.dialect.name == "postgresql":
                # Serialise the tenant's enqueues and render admissions across ingress replicas
                # (`RenderLimiter` takes the same row lock): count, then insert.
                s.execute(select(TenantRow.id).where(TenantRow.id == tenant_id).with_for_update())
            # Inserting first takes SQLite's write lock, so the counts below see every
            # committed render of the tenant, and no other enqueue can commit in between.
            s.add(
                RenderTaskRow(
                    id=render_id,
                    tenant_id=tenant_id,
                    status="queued",
                    priority=priority,
                    tier=tier,
                    request=json.dumps(request),
                    webhook_url=webhook_url,
                    images=images,
                    cost=cost,
                    progress_step=0,
                    progress_total=images * steps,
                    sync=sync_owner is not None,
                    lease_owner=sync_owner,
                    lease_expires_at=utcnow() + dt.timedelta(seconds=lease_s)
                    if sync_owner
                    else None,
                )
            )
            s.flush()
            if max_queued is not None and sync_owner is None:
                used = self._unfinished(s, tenant_id)
                if used > max_queued:
                    raise QueueFull(max_queued, used - 1)
            if check is not None:
                check(s, tenant_id, images, render_id)
            vtime = self._virtual_time(s, tier)
            last = s.scalar(
                select(func.max(RenderTaskRow.vfinish)).where(
                    RenderTaskRow.tenant_id == tenant_id,
                    RenderTaskRow.tier == tier,
                    RenderTaskRow.status.in_(UNFINISHED),
                    RenderTaskRow.id != render_id,
                )
            )
            start = max(vtime, last or 0.0)
            s.execute(
                update(RenderTaskRow)
                .where(RenderTaskRow.id == render_id)
                .values(vstart=start, vfinish=start + cost / weight)
            )
        return self.get_any(render_id)

    @staticmethod
    def _unfinished(s: Session, tenant_id: str) -> int:
        return int(
            s.scalar(
                select(func.count()).where(
                    _async_rows(tenant_id), RenderTaskRow.status.in_(UNFINISHED)
                )
            )
            or 0
        )

    @staticmethod
    def _virtual_time(s: Session, tier: int) -> float:
        """The tier's virtual time: the smallest virtual start still queued, else the largest
        one running (0 when the tier is idle: nobody is owed anything then)."""
        queued = s.scalar(
            select(func.min(RenderTaskRow.vstart)).where(
                RenderTaskRow.tier == tier,
                RenderTaskRow.status == "queued",
                RenderTaskRow.vfinish > 0,  # not an enqueue in progress (its tags are unset)
            )
        )
        if queued is not None:
            return float(queued)
        running = s.scalar(
            select(func.max(RenderTaskRow.vstart)).where(
                RenderTaskRow.tier == tier, RenderTaskRow.status == "in_progress"
            )
        )
        return float(running or 0.0)

    # --- reads ---------------------------------------------------------------------------------
    def get_any(self, render_id: str) -> RenderTask:
        with Session(self.engine) as s:
            row = s.get(RenderTaskRow, render_id)
            if row is None:
                raise KeyError(render_id)
            return RenderTask.of(row)

    def get(self, tenant_id: str, render_id: str) -> RenderTask | None:
        with Session(self.engine) as s:
            row = s.get(RenderTaskRow, render_id)
            mine = row is not None and row.tenant_id == tenant_id and not row.sync
            return RenderTask.of(row) if mine else None

    def list(self, tenant_id: str, after: str | None, limit: int) -> tuple[list[RenderTask], bool]:
        """Newest first; `after` is the id of the last render of the previous page."""
        with Session(self.engine) as s:
            q = select(RenderTaskRow).where(_async_rows(tenant_id))
            if after:
                anchor = s.get(RenderTaskRow, after)
                if anchor is None or anchor.tenant_id != tenant_id or anchor.sync:
                    raise KeyError(after)
                q = q.where(
                    (RenderTaskRow.created_at < anchor.created_at)
                    | (
                        (RenderTaskRow.created_at == anchor.created_at)
                        & (RenderTaskRow.id < anchor.id)
                    )
                )
            rows = s.scalars(
                q.order_by(RenderTaskRow.created_at.desc(), RenderTaskRow.id.desc()).limit(
                    limit + 1
                )
            )
            records = [RenderTask.of(r) for r in rows]
        return records[:limit], len(records) > limit

    def queue_position(self, task: RenderTask) -> int | None:
        """How many queued renders (any tenant) are claimed before this one; None unless
        queued. 0 means it is next."""
        if task.status != "queued":
            return None
        tier = TIERS[task.priority]
        c = RenderTaskRow
        with Session(self.engine) as s:
            ahead = s.scalar(
                select(func.count()).where(
                    c.status == "queued",
                    (c.tier < tier)
                    | ((c.tier == tier) & (c.vfinish < task.vfinish))
                    | ((c.tier == tier) & (c.vfinish == task.vfinish) & (c.id < task.id)),
                )
            )
        return int(ahead or 0)

    def counts(self) -> dict[str, int]:
        with Session(self.engine) as s:
            rows = s.execute(
                select(RenderTaskRow.status, func.count()).group_by(RenderTaskRow.status)
            ).all()
        return {status: 0 for status in STATUSES} | {st: int(n) for st, n in rows}

    # --- the dispatcher's side -----------------------------------------------------------------
    def claim(
        self, owner: str, lease_s: float, limit: int, room: RoomCheck | None = None
    ) -> list[RenderTask]:
        """Take up to `limit` queued renders in scheduling order, leased to `owner`: async
        renders, and the sync tickets `owner` holds. `room(session, tenant_id)` says how many
        more renders a tenant may start (its in-flight cap; None: no cap): an async render of
        a tenant with no room stays queued, and the ones after it are taken (sync tickets were
        admitted under the cap already)."""
        if limit <= 0:
            return []
        c = RenderTaskRow
        claimable = (c.status == "queued") & (c.lease_owner.is_(None) | (c.lease_owner == owner))
        locking = room is not None and self.engine.dialect.name == "sqlite"
        if locking:  # a cheap look first, so an empty poll never takes the writer lock
            with Session(self.engine) as s:
                if s.scalar(select(c.id).where(claimable).limit(1)) is None:
                    return []
        with Session(self.engine) as s, s.begin():
            if locking:
                # The room checks read the tenant's in-flight renders before this claim writes;
                # SQLite's writer lock from the first statement keeps a sync admission from
                # committing in between (Postgres: `room` locks the tenant's row).
                s.connection().exec_driver_sql("BEGIN IMMEDIATE")
            candidates = s.execute(
                select(c.id, c.tenant_id, c.sync)
                .where(claimable)
                .order_by(c.tier, c.vfinish, c.id)
                # Room for a few tenants at their cap to be passed over.
                .limit(limit * 4 + 16 if room else limit)
                .with_for_update(skip_locked=True)
            ).all()
            won: list[str] = []
            left: dict[str, int | None] = {}
            now = utcnow()
            for render_id, tenant_id, sync in candidates:
                if len(won) == limit:
                    break
                if room is not None and not sync:
                    if tenant_id not in left:
                        left[tenant_id] = room(s, tenant_id)
                    if left[tenant_id] is not None:
                        if left[tenant_id] <= 0:
                            continue
                        left[tenant_id] -= 1
                done = s.execute(
                    update(c)
                    .where(c.id == render_id, claimable)
                    .values(
                        status="in_progress",
                        lease_owner=owner,
                        claimed_by=owner,
                        lease_expires_at=now + dt.timedelta(seconds=lease_s),
                        attempts=c.attempts + 1,
                        started_at=func.coalesce(c.started_at, now),
                        progress_step=0,
                    )
                )
                if done.rowcount == 1:
                    won.append(render_id)
            rows = s.scalars(select(c).where(c.id.in_(won))).all() if won else []
            order = {render_id: i for i, render_id in enumerate(won)}
            return sorted((RenderTask.of(r) for r in rows), key=lambda t: order[t.id])

    def _held(self, render_id: str, owner: str):  # noqa: ANN202 - a SQL expression
        c = RenderTaskRow
        return (c.id == render_id) & (c.status == "in_progress") & (c.lease_owner == owner)

    def renew(self, owner: str, render_ids: list[str], lease_s: float) -> set[str]:
        """Extend `owner`'s leases (claimed renders, and its queued sync tickets); the ids it
        still holds (the others were cancelled or taken over after an expiry: they must stop)."""
        if not render_ids:
            return set()
        c = RenderTaskRow
        mine = c.id.in_(render_ids) & c.status.in_(UNFINISHED) & (c.lease_owner == owner)
        with Session(self.engine) as s, s.begin():
            s.execute(
                update(c)
                .where(mine)
                .values(lease_expires_at=utcnow() + dt.timedelta(seconds=lease_s))
            )
            held = s.scalars(select(c.id).where(mine)).all()
        return set(held)

    def progress(self, render_id: str, owner: str, step: int) -> bool:
        """Record progress; False when `owner` no longer holds the render."""
        with Session(self.engine) as s, s.begin():
            done = s.execute(
                update(RenderTaskRow).where(self._held(render_id, owner)).values(progress_step=step)
            )
            return done.rowcount == 1

    def succeed(
        self,
        render_id: str,
        owner: str,
        result: dict,
        base_model: str,
        adapter: tuple[str, int] | None = None,
    ) -> bool:
        """Record the result and charge the tenant's usage, in one transaction, if and only
        if `owner` still holds the render; False otherwise (nothing is written then).
        `adapter` is the (brand, version) the render used."""
        with Session(self.engine) as s, s.begin():
            done = s.execute(
                update(RenderTaskRow)
                .where(self._held(render_id, owner))
                .values(
                    status="succeeded",
                    result=json.dumps(result),
                    progress_step=RenderTaskRow.progress_total,
                    finished_at=utcnow(),
                    event_pending=True,
                    lease_owner=None,
                    lease_expires_at=None,
                )
            )
            if done.rowcount != 1:
                return False
            row = s.get(RenderTaskRow, render_id)
            s.add(
                RenderRow(
                    id=render_id,
                    tenant_id=row.tenant_id,
                    images=row.images,
                    base_model=base_model,
                    **adapter_columns(adapter),
                )
            )
            return True

    def fail(self, render_id: str, owner: str, error: str, error_code: str) -> bool:
        """End the render as failed if `owner` still holds it. `error` is for the tenant."""
        with Session(self.engine) as s, s.begin():
            done = s.execute(
                update(RenderTaskRow)
                .where(self._held(render_id, owner))
                .values(
                    status="failed",
                    error=error,
                    error_code=error_code,
                    finished_at=utcnow(),
                    event_pending=True,
                    lease_owner=None,
                    lease_expires_at=None,
                )
            )
            return done.rowcount == 1

    def release(self, render_id: str, owner: str) -> bool:
        """Queue the render again (a retryable failure: the replica was lost, no capacity);
        its fair-queuing tags stay, so it keeps its place."""
        with Session(self.engine) as s, s.begin():
            done = s.execute(
                update(RenderTaskRow)
                .where(self._held(render_id, owner))
                .values(status="queued", lease_owner=None, lease_expires_at=None, progress_step=0)
            )
            return done.rowcount == 1

    def expire_leases(self, max_attempts: int) -> list[RenderTask]:
        """Queue again every async render whose lease expired (its dispatcher died or hung);
        one that has had `max_attempts` attempts fails instead. A sync ticket whose lease
        expired fails (its client was on the replica that died). Returns the async renders
        that failed here (their events are the caller's to emit)."""
        c = RenderTaskRow
        now = utcnow()
        with Session(self.engine) as s:
            expired = s.execute(
                select(c.id, c.lease_owner, c.attempts, c.sync).where(
                    c.status.in_(UNFINISHED), c.lease_expires_at < now
                )
            ).all()
        failed = []
        for render_id, owner, attempts, sync in expired:
            if sync:
                self.finish_sync(render_id, owner, "failed", "render_interrupted")
            elif attempts >= max_attempts:
                if self.fail(
                    render_id,
                    owner,
                    f"the render was interrupted {attempts} times (its renderer was lost)",
                    "render_interrupted",
                ):
                    failed.append(self.get_any(render_id))
            else:
                with Session(self.engine) as s, s.begin():
                    s.execute(
                        update(c)
                        .where(self._held(render_id, owner), c.lease_expires_at < now)
                        .values(
                            status="queued",
                            lease_owner=None,
                            lease_expires_at=None,
                            progress_step=0,
                        )
                    )
        return failed

    def finish_sync(
        self, render_id: str, owner: str, status: str, error_code: str | None = None
    ) -> bool:
        """End a sync ticket `owner` holds, queued or claimed (`succeeded`: the request
        answered; `failed`; `cancelled`: its client went away). No usage row (the request's
        admission commits that) and no event: its client got the answer."""
        if status not in TERMINAL:
            raise ValueError(f"status must be one of {sorted(TERMINAL)}, got {status!r}")
        c = RenderTaskRow
        with Session(self.engine) as s, s.begin():
            done = s.execute(
                update(c)
                .where(
                    c.id == render_id,
                    c.sync.is_(True),
                    c.status.in_(UNFINISHED),
                    c.lease_owner == owner,
                )
                .values(
                    status=status,
                    error_code=error_code,
                    finished_at=utcnow(),
                    lease_owner=None,
                    lease_expires_at=None,
                )
            )
            return done.rowcount == 1

    def event_sent(self, render_id: str) -> bool:
        """The render's terminal event reached the sink; False if that was already recorded
        (a recovery pass took it)."""
        with Session(self.engine) as s, s.begin():
            done = s.execute(
                update(RenderTaskRow)
                .where(RenderTaskRow.id == render_id, RenderTaskRow.event_pending.is_(True))
                .values(event_pending=False)
            )
            return done.rowcount == 1

    def unsent_events(self, older_than_s: float, limit: int = 100) -> list[RenderTask]:
        """Terminal renders whose event a crash kept from the sink (the change committed, the
        process died before the call), each taken by one caller (compare-and-set)."""
        c = RenderTaskRow
        since = utcnow() - dt.timedelta(seconds=older_than_s)
        with Session(self.engine) as s:
            ids = s.scalars(
                select(c.id)
                .where(c.event_pending.is_(True), c.finished_at < since)
                .order_by(c.finished_at)
                .limit(limit)
            ).all()
        return [self.get_any(i) for i in ids if self.event_sent(i)]

    def cancel(self, tenant_id: str, render_id: str) -> tuple[RenderTask | None, bool]:
        """Cancel the render if it is unfinished (compare-and-set); the render as it now is
        (None if the tenant has no such render) and whether this call cancelled it."""
        c = RenderTaskRow
        with Session(self.engine) as s, s.begin():
            done = s.execute(
                update(c)
                .where(
                    c.id == render_id,
                    _async_rows(tenant_id),
                    c.status.in_(UNFINISHED),
                )
                .values(
                    status="cancelled",
                    finished_at=utcnow(),
                    event_pending=True,
                    lease_owner=None,
                    lease_expires_at=None,
                )
            )
        return self.get(tenant_id, render_id), done.rowcount == 1
