"""The webhook outbox in SQL (SQLite and Postgres): secrets and their rotation, enqueueing, leased
claims, the retry schedule, disabling a failing endpoint, tenant scoping, and exactly one event
per job transition."""

from __future__ import annotations

import base64
import datetime as dt
import json

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.jobs import JobStore
from registry.secret_box import SecretBox, new_key
from registry.sql_base import utcnow
from registry.tenants import TenantDirectory
from registry.webhooks import (
    Outcome,
    WebhookDeliveryRow,
    WebhookError,
    WebhookEventRow,
    WebhookStore,
)

URL = "https://hooks.example.com/brandfarm"
FAIL = Outcome(500, "down for maintenance", "HTTP 500", 12.5)
OK = Outcome(204, "", None, 3.0)


@pytest.fixture
def store(sql_engine) -> WebhookStore:
    tenants = TenantDirectory(sql_engine)
    tenants.create_tenant("acme")
    tenants.create_tenant("globex")
    return WebhookStore(sql_engine, SecretBox([new_key()]))


def _row(store: WebhookStore, delivery_id: str) -> WebhookDeliveryRow:
    with Session(store.engine) as s:
        return s.get(WebhookDeliveryRow, delivery_id)


def _aware(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def test_secrets_are_standard_and_rotation_signs_with_both_during_the_grace(store):
    first = store.rotate_secret("acme", grace_s=3600)
    assert first.startswith("whsec_") and len(base64.b64decode(first[6:])) >= 24
    assert store.signing_secrets("acme") == [first]
    second = store.rotate_secret("acme", grace_s=3600)
    assert second != first
    assert store.signing_secrets("acme") == [second, first]  # new first, old until the grace ends
    third = store.rotate_secret("acme", grace_s=0)
    assert store.signing_secrets("acme") == [third]
    assert store.signing_secrets("globex") == []  # another tenant's secrets are not its own
    with pytest.raises(WebhookError, match="no tenant"):
        store.rotate_secret("nobody", grace_s=0)


def test_enqueue_uses_the_given_url_else_the_default_else_records_no_endpoint(store):
    none = store.enqueue("acme", "render.succeeded", {"id": "r1"})
    assert _row(store, none).status == "no_endpoint"
    store.set_url("acme", URL)
    default = store.enqueue("acme", "render.failed", {"id": "r2"})
    own = store.enqueue("acme", "render.cancelled", {"id": "r3"}, "https://own.example.com/x")
    assert (_row(store, default).url, _row(store, default).status) == (URL, "pending")
    assert _row(store, own).url == "https://own.example.com/x"
    body = store.get("acme", own).payload
    assert body["type"] == "render.cancelled" and body["data"] == {"id": "r3"}
    assert body["timestamp"].endswith("Z")
    with pytest.raises(ValueError, match="unknown webhook event type"):
        store.enqueue("acme", "render.exploded", {})
    # An event that had nowhere to go is sent to the default set since, when replayed.
    replayed = store.replay("acme", none, store.config("acme").url)
    assert (replayed.status, replayed.url) == ("pending", URL)


def test_a_claim_is_held_by_one_worker_until_its_lease_runs_out(store):
    store.set_url("acme", URL)
    delivery = store.enqueue("acme", "render.succeeded", {"id": "r1"})
    mine = store.claim("replica-a", lease_s=60, limit=10)
    assert [d.id for d in mine] == [delivery]
    assert store.claim("replica-b", lease_s=60, limit=10) == []  # held by replica-a
    with Session(store.engine) as s, s.begin():  # replica-a died: its lease runs out
        s.get(WebhookDeliveryRow, delivery).lease_until = utcnow() - dt.timedelta(seconds=1)
    assert [d.id for d in store.claim("replica-b", lease_s=60, limit=10)] == [delivery]
    # The old holder's late result is not recorded: the delivery is replica-b's now.
    assert store.record(delivery, "replica-a", OK, [10], 5) is None
    assert store.record(delivery, "replica-b", OK, [10], 5) == "succeeded"


def test_failed_attempts_follow_the_retry_schedule_then_fail(store):
    store.set_url("acme", URL)
    delivery = store.enqueue("acme", "render.succeeded", {"id": "r1"})
    schedule = [10, 30]
    for wait in schedule:
        (due,) = store.claim("w", 60, 10)
        before = utcnow()
        assert store.record(due.id, "w", FAIL, schedule, 5) == "pending"
        gap = (_aware(_row(store, delivery).next_attempt_at) - before).total_seconds()
        assert wait - 1 < gap <= wait + 1
        assert store.claim("w", 60, 10) == []  # not due before its time
        with Session(store.engine) as s, s.begin():
            s.get(WebhookDeliveryRow, delivery).next_attempt_at = utcnow()
    (due,) = store.claim("w", 60, 10)
    assert store.record(due.id, "w", FAIL, schedule, 5) == "failed"
    shown = store.get("acme", delivery)
    assert shown.status == "failed" and shown.last_error == "HTTP 500"
    assert [(a.status_code, a.response_body) for a in shown.attempts] == [
        (500, "down for maintenance")
    ] * 3


def test_an_endpoint_failing_n_deliveries_in_a_row_is_disabled_until_set_again(store):
    store.set_url("acme", URL)
    for _ in range(2):
        store.enqueue("acme", "render.succeeded", {})
        (due,) = store.claim("w", 60, 10)
        store.record(due.id, "w", FAIL, [], disable_after=2)
    config = store.config("acme")
    assert list(config.disabled) == [URL]
    assert "2 deliveries in a row failed" in config.disabled[URL]
    assert "HTTP 500" in config.disabled[URL]
    parked = store.enqueue("acme", "render.succeeded", {})
    assert _row(store, parked).status == "endpoint_disabled"
    with pytest.raises(WebhookError, match="disabled"):
        store.replay("acme", parked)
    store.set_url("acme", URL)  # setting it again re-enables it
    assert store.config("acme").disabled == {}
    assert store.replay("acme", parked).status == "pending"
    assert [d.id for d in store.claim("w", 60, 10)] == [parked]


def test_a_success_resets_the_failure_count(store):
    store.set_url("acme", URL)
    for outcome in (FAIL, OK, FAIL):
        store.enqueue("acme", "render.succeeded", {})
        (due,) = store.claim("w", 60, 10)
        store.record(due.id, "w", outcome, [], disable_after=2)
    assert store.config("acme").disabled == {}


def test_deliveries_are_the_tenants_own_and_page_newest_first(store):
    store.set_url("acme", URL)
    ids = [store.enqueue("acme", "render.succeeded", {"n": i}) for i in range(5)]
    other = store.enqueue("globex", "render.succeeded", {})
    page, more = store.list("acme", None, 2)
    assert [d.id for d in page] == ids[::-1][:2] and more
    rest, more = store.list("acme", page[-1].id, 10)
    assert [d.id for d in rest] == ids[::-1][2:] and not more
    assert store.get("acme", other) is None and store.replay("acme", other) is None
    with pytest.raises(KeyError):
        store.list("acme", other, 10)  # another tenant's id is no anchor
    (first, *_), _ = store.list("acme", None, 10, event_type="render.succeeded")
    assert first.event_type == "render.succeeded"


def test_a_job_transition_writes_its_events_once(sql_engine, store):
    jobs = JobStore(sql_engine)
    spec = {"hyperparameters": {"steps": 4}, "seed": 1, "webhook_url": "https://job.example.com"}
    job, _ = jobs.create("acme", "logo", "file-1", "brandfarm-shapes", spec)
    assert jobs.finish(job.id, "succeeded", adapter_version=3)
    assert not jobs.finish(job.id, "failed", error="late")  # lost the compare-and-set
    with Session(sql_engine) as s:
        events = s.scalars(select(WebhookEventRow).order_by(WebhookEventRow.type)).all()
        deliveries = s.scalars(select(WebhookDeliveryRow)).all()
    assert [e.type for e in events] == ["adapter.version.created", "fine_tuning.job.succeeded"]
    assert {d.url for d in deliveries} == {"https://job.example.com"}
    data = {e.type: json.loads(e.payload)["data"] for e in events}
    assert data["fine_tuning.job.succeeded"]["id"] == job.id
    assert data["fine_tuning.job.succeeded"]["fine_tuned_model"] == "logo:3"
    assert data["adapter.version.created"]["version"] == 3

    store.set_url("acme", URL)  # a job without its own URL goes to the tenant's default
    plain, _ = jobs.create(
        "acme", "logo", "file-1", "brandfarm-shapes", {**spec, "webhook_url": None}
    )
    assert jobs.finish(plain.id, "cancelled")
    (latest,), _ = store.list("acme", None, 1)
    assert (latest.event_type, latest.url) == ("fine_tuning.job.cancelled", URL)
