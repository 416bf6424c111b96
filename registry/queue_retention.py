"""Retention of the render queue's and the webhook outbox's rows: finished render tasks and
finished webhook deliveries (with their attempts and events) older than their retention are
deleted, in batches, so neither table grows forever.

Only rows nothing needs any more go: a render task that is `succeeded`, `failed` or `cancelled`
and whose event was handed to the sink (`event_pending` false), and a delivery that is no longer
`pending` (succeeded, failed for good, never sent). Queued and running renders, and deliveries
still being attempted, are never touched, however old. Each batch re-checks these conditions in
the deleting statements themselves, inside one transaction (Postgres locks the batch's rows
`FOR UPDATE SKIP LOCKED`, SQLite holds its one writer lock from the first delete), so a replay
that makes a delivery pending again while a sweep runs keeps it. Deleting is idempotent: any
number of ingress replicas may sweep at once. The images of a render are not rows of these
tables: they follow render retention (`registry.retention`), like a synchronous render's.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import and_, delete, exists, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from registry.render_queue import TERMINAL, RenderTaskRow
from registry.sql_base import utcnow
from registry.webhooks import WebhookAttemptRow, WebhookDeliveryRow, WebhookEventRow


@dataclass
class PruneReport:
    render_tasks: int = 0
    deliveries: int = 0
    attempts: int = 0
    events: int = 0


def _finished_task(cutoff: dt.datetime):  # noqa: ANN202 - a SQL condition
    c = RenderTaskRow
    return and_(c.status.in_(TERMINAL), c.finished_at < cutoff, c.event_pending.is_(False))


def _finished_delivery(cutoff: dt.datetime):  # noqa: ANN202 - a SQL condition
    d = WebhookDeliveryRow
    return and_(d.status != "pending", d.finished_at < cutoff)


def _batch_ids(s: Session, column, condition, batch: int) -> list[str]:  # noqa: ANN001
    q = select(column).where(condition).order_by(column).limit(batch)
    if s.get_bind().dialect.name == "postgresql":
        q = q.with_for_update(skip_locked=True)  # another replica's batch is left to it
    return list(s.scalars(q))


def prune_render_tasks(engine: Engine, cutoff: dt.datetime, batch: int) -> int:
    """Delete finished render tasks that ended before `cutoff`; how many went."""
    total = 0
    while True:
        with Session(engine) as s, s.begin():
            ids = _batch_ids(s, RenderTaskRow.id, _finished_task(cutoff), batch)
            if not ids:
                return total
            gone = s.execute(
                delete(RenderTaskRow).where(RenderTaskRow.id.in_(ids), _finished_task(cutoff))
            )
            total += gone.rowcount
        if len(ids) < batch:
            return total


def prune_deliveries(engine: Engine, cutoff: dt.datetime, batch: int) -> PruneReport:
    """Delete finished webhook deliveries that ended before `cutoff`, their attempts, and
    their events once no delivery refers to them."""
    report = PruneReport()
    d, a, e = WebhookDeliveryRow, WebhookAttemptRow, WebhookEventRow
    while True:
        with Session(engine) as s, s.begin():
            ids = _batch_ids(s, d.id, _finished_delivery(cutoff), batch)
            if not ids:
                return report
            # Each statement checks the delivery is still finished: a replay in between keeps
            # it (SQLite: the first delete takes the writer lock, so nothing changes after).
            still = select(d.id).where(d.id.in_(ids), _finished_delivery(cutoff))
            report.attempts += s.execute(delete(a).where(a.delivery_id.in_(still))).rowcount
            events = list(s.scalars(select(d.event_id).where(d.id.in_(still))))
            report.deliveries += s.execute(
                delete(d).where(d.id.in_(ids), _finished_delivery(cutoff))
            ).rowcount
            orphan = ~exists().where(d.event_id == e.id)
            report.events += s.execute(delete(e).where(e.id.in_(events), orphan)).rowcount
        if len(ids) < batch:
            return report


def prune_queue_rows(
    engine: Engine,
    render_task_days: float | None,
    delivery_days: float | None,
    batch: int,
    now: dt.datetime | None = None,
) -> PruneReport:
    """One retention pass over both tables (a retention of None keeps that table's rows)."""
    now = now or utcnow()
    report = PruneReport()
    if render_task_days is not None:
        cutoff = now - dt.timedelta(days=render_task_days)
        report.render_tasks = prune_render_tasks(engine, cutoff, batch)
    if delivery_days is not None:
        webhooks = prune_deliveries(engine, now - dt.timedelta(days=delivery_days), batch)
        report.deliveries, report.attempts, report.events = (
            webhooks.deliveries,
            webhooks.attempts,
            webhooks.events,
        )
    return report
