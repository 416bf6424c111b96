"""Retention of finished render tasks and webhook deliveries (SQLite and Postgres): old finished
rows go in batches, with their attempts and events; unfinished ones (queued, running, an event
still pending, a delivery being attempted or replayed) stay however old; two sweepers at once
delete each row once; the ingress's retention sweeper runs it."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from registry.queue_retention import PruneReport, prune_queue_rows
from registry.render_queue import RenderQueueStore, RenderTaskRow
from registry.retention import RetentionSweeper
from registry.settings import Settings
from registry.sql_base import utcnow
from registry.tenants import TenantDirectory
from registry.webhooks import (
    Outcome,
    WebhookAttemptRow,
    WebhookDeliveryRow,
    WebhookEventRow,
    WebhookStore,
)

URL = "https://hooks.example.com/brandfarm"
OK = Outcome(204, "", None, 3.0)
FAIL = Outcome(500, "no", "HTTP 500", 3.0)
LATER = utcnow() + dt.timedelta(days=31)  # "now" for the sweeps: every row is 31 days old


@pytest.fixture
def tenants(sql_engine) -> TenantDirectory:
    tenants = TenantDirectory(sql_engine)
    tenants.create_tenant("acme")
    return tenants


def render(q: RenderQueueStore, end: str | None, event_sent: bool = True) -> str:
    """A render left `queued`, `in_progress`, or ended (`succeeded`, `failed`, `cancelled`)."""
    task = q.enqueue("acme", "fast", {"job": {}}, 1, 2, 1.0, None)
    if end is None:
        return task.id
    (claimed,) = q.claim("d1", 60, 1)
    assert claimed.id == task.id
    if end == "succeeded":
        assert q.succeed(task.id, "d1", {"images": []}, "m")
    elif end == "failed":
        assert q.fail(task.id, "d1", "boom", "render_failed")
    elif end == "cancelled":
        assert q.cancel("acme", task.id)[1]
    if end != "in_progress" and event_sent:
        assert q.event_sent(task.id)
    return task.id


def count(engine, table) -> int:  # noqa: ANN001
    with Session(engine) as s:
        return int(s.scalar(select(func.count()).select_from(table)))


def ids(engine, column) -> set[str]:  # noqa: ANN001
    with Session(engine) as s:
        return set(s.scalars(select(column)))


def test_old_finished_render_tasks_go_in_batches_and_unfinished_stay(tenants) -> None:
    q = RenderQueueStore(tenants.engine)
    gone = [render(q, end) for end in ["succeeded", "failed", "cancelled"] * 3]
    kept = {
        render(q, "in_progress"),
        render(q, "succeeded", event_sent=False),  # its event has not reached the sink yet
    }
    recent = render(q, "succeeded")
    kept.add(render(q, None))  # queued for a month: still owed a render (created last: unclaimed)
    with Session(tenants.engine) as s, s.begin():
        s.execute(
            update(RenderTaskRow)
            .where(RenderTaskRow.id == recent)
            .values(finished_at=LATER - dt.timedelta(days=29))
        )
    kept.add(recent)

    report = prune_queue_rows(tenants.engine, 30, None, batch=2, now=LATER)

    assert report.render_tasks == len(gone) == 9
    assert ids(tenants.engine, RenderTaskRow.id) == kept
    with pytest.raises(KeyError):
        q.get_any(gone[0])
    again = prune_queue_rows(tenants.engine, 30, None, batch=2, now=LATER)
    assert again.render_tasks == 0
    # No retention set: nothing is deleted.
    assert prune_queue_rows(tenants.engine, None, None, 2, now=LATER) == PruneReport()


def test_old_finished_deliveries_go_with_attempts_and_events_pending_ones_stay(tenants) -> None:
    store = WebhookStore(tenants.engine)
    store.set_url("acme", URL)

    def delivery(outcome: Outcome | None, tries: int = 1) -> str:
        delivery_id = store.enqueue("acme", "render.succeeded", {"id": "r"})
        for _ in range(tries if outcome else 0):
            with Session(tenants.engine) as s, s.begin():  # due at once, whatever the backoff
                s.execute(
                    update(WebhookDeliveryRow)
                    .where(WebhookDeliveryRow.id == delivery_id)
                    .values(next_attempt_at=utcnow() - dt.timedelta(seconds=1))
                )
            (due,) = store.claim("w1", 60, 10)
            store.record(due.id, "w1", outcome, [3600.0], disable_after=100)
        return delivery_id

    succeeded = delivery(OK)
    failed = delivery(FAIL, tries=2)  # one retry, then failed for good
    pending = delivery(FAIL)  # between attempts: still being delivered
    replayed = delivery(OK)
    assert store.replay("acme", replayed) is not None  # pending again, with its history
    never = delivery(None)  # never claimed yet: pending too
    store.set_url("acme", None)
    no_endpoint = store.enqueue("acme", "render.failed", {"id": "r2"})
    assert count(tenants.engine, WebhookAttemptRow) == 5

    report = prune_queue_rows(tenants.engine, None, 30, batch=1, now=LATER)

    assert (report.deliveries, report.attempts, report.events) == (3, 3, 3)
    assert ids(tenants.engine, WebhookDeliveryRow.id) == {pending, never, replayed}
    assert {succeeded, failed, no_endpoint}.isdisjoint(ids(tenants.engine, WebhookDeliveryRow.id))
    assert count(tenants.engine, WebhookEventRow) == 3  # the kept deliveries' events
    assert count(tenants.engine, WebhookAttemptRow) == 2  # the pending one's and the replayed's
    assert store.get("acme", replayed).attempts  # its history is intact
    assert store.get("acme", succeeded) is None


def test_two_sweepers_at_once_delete_each_row_once(tenants) -> None:
    q = RenderQueueStore(tenants.engine)
    store = WebhookStore(tenants.engine)
    for _ in range(12):
        render(q, "succeeded")
        store.enqueue("acme", "render.succeeded", {"id": "r"})  # no endpoint: finished at once
    reports: list[PruneReport] = []
    errors: list[BaseException] = []

    def sweep() -> None:
        try:
            reports.append(prune_queue_rows(tenants.engine, 30, 30, batch=3, now=LATER))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=sweep) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(r.render_tasks for r in reports) == 12
    assert sum(r.deliveries for r in reports) == sum(r.events for r in reports) == 12
    assert count(tenants.engine, RenderTaskRow) == count(tenants.engine, WebhookDeliveryRow) == 0


def test_the_ingress_retention_sweeper_prunes_the_queue(tenants, tmp_path) -> None:
    q = RenderQueueStore(tenants.engine)
    done, queued = render(q, "succeeded"), render(q, None)
    settings = Settings(
        state_dir=tmp_path,
        render_task_retention_days=0.5 / 86400,  # half a second
        render_retention_sweep_interval_s=1,
    )
    with Session(tenants.engine) as s, s.begin():
        s.execute(
            update(RenderTaskRow)
            .where(RenderTaskRow.id == done)
            .values(finished_at=utcnow() - dt.timedelta(seconds=5))
        )
    # Render retention is unset, so the sweep never reaches the object store.
    sweeper = RetentionSweeper(settings, tenants, store=None).start()
    try:
        assert sweeper.swept.wait(30)
        assert sweeper.last_pruned is not None and sweeper.last_pruned.render_tasks == 1
    finally:
        sweeper.stop()
    assert ids(tenants.engine, RenderTaskRow.id) == {queued}
