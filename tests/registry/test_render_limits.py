"""The cluster-wide limits on SQLite and Postgres: render reservations never overshoot the
hourly quota under concurrency, failures give capacity back, expired leases stop counting; job
admission is exclusive across ingress replicas."""

from __future__ import annotations

import datetime as dt
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.jobs import JobStore
from registry.limits import LimitExceeded, TenantLimits
from registry.render_limits import (
    AdmissionRefused,
    QuotaReservationRow,
    RenderLimiter,
    RenderSlotRow,
)
from registry.render_queue import RenderQueueStore
from registry.settings import Settings
from registry.tenants import RenderRow, TenantDirectory

T0 = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)
LEASE_S = 60.0


class Clock:
    """A settable clock, so that lease expiry is tested without waiting."""

    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@pytest.fixture
def tenants(sql_engine) -> TenantDirectory:  # noqa: ANN001
    return TenantDirectory(sql_engine)


def limiter_for(tenants: TenantDirectory, clock: Clock | None = None) -> RenderLimiter:
    return RenderLimiter(tenants.engine, LEASE_S, clock or Clock(dt.datetime.now(dt.UTC)))


def admit_concurrently(limiter: RenderLimiter, tenant: str, requests: int, **kw: object) -> list:
    """`requests` threads admit at once (released together by a barrier): each gives its
    Admission or the AdmissionRefused it got."""
    start = threading.Barrier(requests)

    def one(_: int):  # noqa: ANN202
        start.wait()
        try:
            return limiter.admit(tenant, 1, **kw)
        except AdmissionRefused as e:
            return e

    with ThreadPoolExecutor(max_workers=requests) as pool:
        return list(pool.map(one, range(requests)))


def test_twenty_concurrent_reservations_against_a_quota_of_ten_grant_exactly_ten(tenants):
    tenants.create_tenant("acme", images_per_hour=10)
    limiter = limiter_for(tenants)
    outcomes = admit_concurrently(limiter, "acme", 20, max_inflight=None)
    granted = [o for o in outcomes if not isinstance(o, AdmissionRefused)]
    refused = [o for o in outcomes if isinstance(o, AdmissionRefused)]
    assert len(granted) == 10 and len(refused) == 10
    assert {e.limit for e in refused} == {"images_per_hour"}
    assert all(e.cap == 10 and e.used == 10 and e.asked == 1 for e in refused)
    assert limiter.quota_used("acme") == 10
    # Committed, the reservations become exactly ten usage rows; nothing more fits this hour.
    for a in granted:
        limiter.commit(a, secrets.token_hex(12), 1, "m")
        limiter.release(a)
    assert tenants.images_in_last_hour("acme") == 10 and limiter.quota_used("acme") == 10
    with Session(tenants.engine) as s:
        assert s.scalars(select(QuotaReservationRow)).all() == []
    with pytest.raises(AdmissionRefused):
        limiter.admit("acme", 1, max_inflight=None)


def test_concurrent_admissions_never_exceed_the_inflight_cap(tenants):
    tenants.create_tenant("acme")  # no quota: only slots count
    limiter = limiter_for(tenants)
    outcomes = admit_concurrently(limiter, "acme", 12, max_inflight=3)
    granted = [o for o in outcomes if not isinstance(o, AdmissionRefused)]
    assert len(granted) == 3 and limiter.inflight("acme") == 3
    assert all(a.reservation_id is None for a in granted)  # no quota: nothing reserved
    refused = [o for o in outcomes if isinstance(o, AdmissionRefused)]
    assert {(e.limit, e.cap, e.used) for e in refused} == {("max_inflight_renders", 3, 3)}
    limiter.release(granted[0])
    assert limiter.inflight("acme") == 2
    limiter.admit("acme", 1, max_inflight=3)  # the freed slot is taken again


def test_a_tenant_override_of_the_inflight_cap_wins_over_the_farms(tenants):
    tenants.create_tenant("acme")
    tenants.set_limits("acme", max_inflight_renders=1)
    limiter = limiter_for(tenants)
    limiter.admit("acme", 1, max_inflight=8)
    with pytest.raises(AdmissionRefused) as refused:
        limiter.admit("acme", 1, max_inflight=8)
    assert (refused.value.limit, refused.value.cap) == ("max_inflight_renders", 1)


def test_release_on_failure_gives_the_capacity_back(tenants):
    tenants.create_tenant("acme", images_per_hour=4)
    limiter = limiter_for(tenants)
    failed = limiter.admit("acme", 3, max_inflight=None)
    with pytest.raises(AdmissionRefused) as refused:
        limiter.admit("acme", 2, max_inflight=None)
    assert (refused.value.used, refused.value.asked) == (3, 2)
    limiter.release(failed)  # the render failed: nothing is charged
    assert limiter.quota_used("acme") == 0 and tenants.images_in_last_hour("acme") == 0
    limiter.admit("acme", 4, max_inflight=None)


def test_a_refused_admission_takes_neither_slot_nor_reservation(tenants):
    tenants.create_tenant("acme", images_per_hour=2)
    limiter = limiter_for(tenants)
    with pytest.raises(AdmissionRefused):
        limiter.admit("acme", 3, max_inflight=5)  # over the quota, under the slot cap
    with Session(tenants.engine) as s:
        assert s.scalars(select(RenderSlotRow)).all() == []
        assert s.scalars(select(QuotaReservationRow)).all() == []


def test_an_expired_lease_stops_counting_and_renewal_keeps_it(tenants):
    """A crashed ingress never releases: its slot and reservation count for one lease, then
    they stop counting (and the next admission drops the rows). A holder that renews keeps
    its rows past the first lease."""
    tenants.create_tenant("acme", images_per_hour=2)
    clock = Clock(T0)
    limiter = limiter_for(tenants, clock)
    crashed = limiter.admit("acme", 1, max_inflight=2)
    alive = limiter.admit("acme", 1, max_inflight=2)
    with pytest.raises(AdmissionRefused):
        limiter.admit("acme", 1, max_inflight=2)
    clock.advance(LEASE_S / 2)
    assert limiter.renew(alive)
    clock.advance(LEASE_S / 2)  # the crashed one's lease is over, the renewed one's is not
    assert limiter.inflight("acme") == 1 and limiter.quota_used("acme") == 1
    replacement = limiter.admit("acme", 1, max_inflight=2)
    with Session(tenants.engine) as s:
        slots = set(s.scalars(select(RenderSlotRow.id)))
    assert slots == {alive.slot_id, replacement.slot_id}  # the expired row was dropped
    assert not limiter.renew(crashed)  # too late: what it held is gone


def test_commit_records_usage_once_with_the_images_rendered(tenants):
    tenants.create_tenant("acme", images_per_hour=10)
    limiter = limiter_for(tenants)
    admission = limiter.admit("acme", 4, max_inflight=1)
    limiter.commit(admission, "render-1", 4, "brandfarm-shapes")
    limiter.release(admission)
    with Session(tenants.engine) as s:
        rows = s.scalars(select(RenderRow)).all()
    assert [(r.id, r.tenant_id, r.images, r.base_model) for r in rows] == [
        ("render-1", "acme", 4, "brandfarm-shapes")
    ]
    assert limiter.quota_used("acme") == 4 and limiter.inflight("acme") == 0


def test_usage_older_than_an_hour_leaves_the_quota(tenants):
    tenants.create_tenant("acme", images_per_hour=1)
    clock = Clock(T0)
    limiter = limiter_for(tenants, clock)
    first = limiter.admit("acme", 1, max_inflight=None)
    limiter.commit(first, "old", 1, "m")
    limiter.release(first)
    with pytest.raises(AdmissionRefused):
        limiter.admit("acme", 1, max_inflight=None)
    clock.advance(3601)
    limiter.admit("acme", 1, max_inflight=None)


def test_limits_are_per_tenant_and_unknown_tenants_are_refused(tenants):
    tenants.create_tenant("acme", images_per_hour=1)
    tenants.create_tenant("globex", images_per_hour=1)
    limiter = limiter_for(tenants)
    limiter.admit("acme", 1, max_inflight=1)
    limiter.admit("globex", 1, max_inflight=1)  # acme's use is not globex's
    with pytest.raises(KeyError):
        limiter.admit("nobody", 1, max_inflight=1)
    with pytest.raises(ValueError, match="images must be >= 1"):
        limiter.admit("acme", 0, max_inflight=1)


def test_job_admission_holds_across_ingress_replicas(tenants):
    """Two ingress replicas (two TenantLimits over one database) admit concurrent fine-tune
    creates of one tenant: the job cap is never passed (registry.tenant_lock)."""
    tenants.create_tenant("acme")
    tenants.set_limits("acme", max_concurrent_fine_tunes=2)
    jobs = JobStore(tenants.engine)
    replicas = [TenantLimits(Settings(), tenants, store=None) for _ in range(2)]  # no S3 cap
    start = threading.Barrier(8)

    def create(i: int) -> bool:
        limits = replicas[i % 2]
        start.wait()
        with limits.admission("acme"):
            try:
                limits.check_new_job("acme", None)
            except LimitExceeded:
                return False
            jobs.create("acme", "brand", "file-1", "m", {})
            return True

    with ThreadPoolExecutor(max_workers=8) as pool:
        created = list(pool.map(create, range(8)))
    assert created.count(True) == 2
    assert replicas[0].job_counts("acme") == {"queued": 2, "running": 0}


def test_a_reservation_without_a_slot_counts_against_the_quota_only(tenants):
    """What a queued render needs before it runs: its images set aside, no slot taken."""
    tenants.create_tenant("acme", images_per_hour=3)
    limiter = limiter_for(tenants)
    queued = limiter.admit("acme", 2, max_inflight=0, slot=False)  # a cap of 0 is not asked
    assert queued.slot_id is None and queued.reservation_id is not None
    assert limiter.inflight("acme") == 0 and limiter.quota_used("acme") == 2
    with pytest.raises(AdmissionRefused):
        limiter.admit("acme", 2, max_inflight=None, slot=False)


def test_usage_rows_count_renders_per_adapter_version_from_both_paths(tenants):
    """Synchronous renders (`commit`) and queued ones (`RenderQueueStore.succeed`) both record
    the adapter version they used; `adapter_usage` counts them per version, per tenant."""
    from registry.render_queue import RenderQueueStore

    clock = Clock(T0)
    for name in ("acme", "globex"):
        tenants.create_tenant(name)
    limiter = limiter_for(tenants, clock)
    for i, adapter in enumerate([("logo", 1), ("logo", 2), ("logo", 1), None]):
        admission = limiter.admit("acme", 2, max_inflight=4)
        limiter.commit(admission, f"sync-{i}", 2, "m", adapter=adapter)
    admission = limiter.admit("globex", 1, max_inflight=4)
    limiter.commit(admission, "other", 1, "m", adapter=("logo", 1))
    queue = RenderQueueStore(tenants.engine)
    queue.enqueue("acme", "fast", {"job": {}}, 3, 4, 1.0, None, render_id="render-q1")
    [claimed] = queue.claim("d1", 60, 1)
    assert claimed.id == "render-q1"  # the id the caller drew (a canary assigned by it)
    assert queue.succeed(claimed.id, "d1", {"images": []}, "m", ("logo", 2))
    usage = tenants.adapter_usage("acme")
    assert {k: (u.renders, u.images) for k, u in usage.items()} == {
        ("logo", 1): (2, 4),
        ("logo", 2): (2, 5),
    }
    assert {k: u.renders for k, u in tenants.adapter_usage("globex").items()} == {("logo", 1): 1}
    later = tenants.adapter_usage("acme", since=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    assert later == {}


def test_async_renders_reserve_quota_from_enqueue_and_count_in_flight_while_running(tenants):
    """A queued async render is its own quota reservation (checked with the insert), one in
    progress holds an in-flight render; a success becomes usage, a cancel gives it back."""
    tenants.create_tenant("acme", images_per_hour=5)
    limiter = limiter_for(tenants)
    queue = RenderQueueStore(tenants.engine)

    def enqueue(images: int):
        return queue.enqueue(
            "acme", "fast", {"job": {}}, images, 2, 1.0, None, check=limiter.check_quota
        )

    kept, cancelled = enqueue(2), enqueue(2)
    with pytest.raises(AdmissionRefused) as e:
        enqueue(2)
    assert e.value.limit == "images_per_hour" and e.value.used == 4
    assert limiter.quota_used("acme") == 4 and queue.counts()["queued"] == 2
    with pytest.raises(AdmissionRefused):  # the synchronous path sees the same reservations
        limiter.admit("acme", 2, max_inflight=None)
    [claimed] = queue.claim("d1", 60, 1, room=lambda s, t: limiter.room(s, t, 1))
    assert claimed.id == kept.id and limiter.inflight("acme") == 1
    assert queue.claim("d1", 60, 1, room=lambda s, t: limiter.room(s, t, 1)) == []  # capped
    queue.cancel("acme", cancelled.id)
    assert limiter.quota_used("acme") == 2
    assert queue.succeed(kept.id, "d1", {"images": []}, "m")
    assert limiter.quota_used("acme") == 2 and limiter.inflight("acme") == 0
    assert tenants.images_in_last_hour("acme") == 2


def test_a_claim_racing_a_sync_admission_never_exceeds_the_in_flight_cap(tenants):
    """The claim counts the tenant's in-flight renders, then takes one; a synchronous admission
    of the same tenant trying to commit in between must wait for the claim (SQLite: the claim
    holds the writer lock; Postgres: the tenant's row lock). Cap 1: one of them wins."""
    tenants.create_tenant("acme")
    tenants.set_limits("acme", max_inflight_renders=1)
    limiter = limiter_for(tenants)
    queue = RenderQueueStore(tenants.engine)
    queue.enqueue("acme", "fast", {"job": {}}, 1, 2, 1.0, None)
    outcome: dict = {}

    def admit() -> None:
        try:
            outcome["admitted"] = limiter.admit("acme", 1, max_inflight=None)
        except AdmissionRefused as e:
            outcome["refused"] = e

    racer = threading.Thread(target=admit)

    def room(s, tenant_id):  # noqa: ANN001, ANN202
        left = limiter.room(s, tenant_id, None)
        racer.start()
        racer.join(timeout=1.0)  # an admission not kept out commits here
        return left

    claimed = queue.claim("d1", 60, 1, room=room)
    racer.join(timeout=60)
    assert not racer.is_alive()
    assert len(claimed) + ("admitted" in outcome) == 1, outcome
    assert limiter.inflight("acme") == 1
