"""The render queue's SQL side, on SQLite and Postgres: fair-queuing order, tiers, claims that
race, leases that expire, and terminal changes that happen once (no Ray, no HTTP)."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from registry.render_queue import QueueFull, RenderQueueStore, RenderTaskRow
from registry.tenants import TenantDirectory


@pytest.fixture
def queue(sql_engine) -> RenderQueueStore:
    tenants = TenantDirectory(sql_engine)
    for name in ("aa", "bb", "cc"):
        tenants.create_tenant(name)
    return RenderQueueStore(sql_engine)


def put(
    q: RenderQueueStore,
    tenant: str,
    priority: str = "fast",
    *,
    weight: float = 1.0,
    steps: int = 4,
    max_queued: int | None = None,
):
    return q.enqueue(tenant, priority, {"job": {}}, 1, steps, weight, max_queued)


def drain(q: RenderQueueStore, owner: str = "d1") -> list[str]:
    """Tenants in the order a one-at-a-time dispatcher would run them."""
    order = []
    while claimed := q.claim(owner, 60, 1):
        order.append(claimed[0].tenant_id)
        assert q.succeed(claimed[0].id, owner, {"images": []}, "m")
    return order


def test_a_late_tenant_is_interleaved_not_queued_behind_a_burst(queue) -> None:
    for _ in range(20):
        put(queue, "aa")
    for _ in range(3):
        put(queue, "bb")
    order = drain(queue)
    # B's three renders run among A's first few, not after A's twenty.
    assert max(i for i, t in enumerate(order) if t == "bb") <= 6
    assert order.count("aa") == 20


def test_weights_share_capacity_in_proportion(queue) -> None:
    queue.set_plan("aa", "fast", weight=3.0)
    for _ in range(12):
        put(queue, "aa", weight=3.0)
        put(queue, "bb", weight=1.0)
    first = drain(queue)[:8]
    assert first.count("aa") == 6 and first.count("bb") == 2


def test_relax_runs_only_when_no_fast_render_waits(queue) -> None:
    relaxed = put(queue, "aa", "relax")
    fast = [put(queue, "bb", "fast") for _ in range(3)]
    assert queue.queue_position(queue.get_any(relaxed.id)) == 3
    claimed = queue.claim("d1", 60, 3)
    assert {t.id for t in claimed} == {t.id for t in fast}
    assert [t.id for t in queue.claim("d1", 60, 5)] == [relaxed.id]


def test_a_fast_render_queued_later_still_goes_before_waiting_relax_work(queue) -> None:
    for _ in range(3):
        put(queue, "aa", "relax")
    late = put(queue, "bb", "fast")
    assert queue.queue_position(queue.get_any(late.id)) == 0
    assert queue.claim("d1", 60, 1)[0].id == late.id


def test_two_dispatchers_never_claim_the_same_render(queue) -> None:
    ids = {put(queue, "aa").id for _ in range(30)}
    got: dict[str, list[str]] = {"d1": [], "d2": []}

    def run(owner: str) -> None:
        while claimed := queue.claim(owner, 60, 2):
            got[owner] += [t.id for t in claimed]

    threads = [threading.Thread(target=run, args=(o,)) for o in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got["d1"] + got["d2"]) == sorted(ids)  # each exactly once


def test_a_result_is_recorded_and_charged_once(queue) -> None:
    task = put(queue, "aa")
    [claimed] = queue.claim("d1", 60, 1)
    assert queue.succeed(claimed.id, "d1", {"images": [{"key": "k", "seed": 1}]}, "m")
    assert not queue.succeed(claimed.id, "d1", {"images": []}, "m")
    assert not queue.fail(claimed.id, "d1", "late", "x")
    done = queue.get("aa", task.id)
    assert done.status == "succeeded" and done.result["images"][0]["key"] == "k"
    assert TenantDirectory(queue.engine).count_renders("aa") == 1


def test_an_expired_lease_is_queued_again_and_its_old_owner_records_nothing(queue) -> None:
    task = put(queue, "aa")
    queue.claim("dead", 60, 1)
    with Session(queue.engine) as s, s.begin():  # the lease ran out (its dispatcher died)
        s.execute(update(RenderTaskRow).values(lease_expires_at=RenderTaskRow.created_at))
    assert queue.expire_leases(max_attempts=3) == []
    assert queue.get_any(task.id).status == "queued"
    [again] = queue.claim("alive", 60, 1)
    assert again.id == task.id and again.attempts == 2
    assert not queue.succeed(task.id, "dead", {"images": []}, "m")  # the old owner lost it
    assert not queue.progress(task.id, "dead", 1)
    assert queue.renew("dead", [task.id], 60) == set()
    assert queue.renew("alive", [task.id], 60) == {task.id}
    assert queue.succeed(task.id, "alive", {"images": []}, "m")
    assert TenantDirectory(queue.engine).count_renders("aa") == 1


def test_a_render_that_keeps_losing_its_lease_fails(queue) -> None:
    task = put(queue, "aa")
    queue.claim("d1", 60, 1)
    with Session(queue.engine) as s, s.begin():
        s.execute(update(RenderTaskRow).values(lease_expires_at=RenderTaskRow.created_at))
    [failed] = queue.expire_leases(max_attempts=1)
    assert failed.id == task.id and failed.status == "failed"
    assert failed.error_code == "render_interrupted"


def test_a_cancelled_render_is_never_charged_or_recorded(queue) -> None:
    task = put(queue, "aa")
    queue.claim("d1", 60, 1)
    cancelled, won = queue.cancel("aa", task.id)
    assert won and cancelled.status == "cancelled"
    assert not queue.succeed(task.id, "d1", {"images": []}, "m")
    assert queue.get_any(task.id).status == "cancelled"
    assert TenantDirectory(queue.engine).count_renders("aa") == 0
    again, won = queue.cancel("aa", task.id)
    assert not won and again.status == "cancelled"


def test_another_tenants_render_is_invisible(queue) -> None:
    task = put(queue, "aa")
    assert queue.get("bb", task.id) is None
    assert queue.cancel("bb", task.id) == (None, False)
    assert queue.get_any(task.id).status == "queued"
    with pytest.raises(KeyError):
        queue.list("bb", task.id, 10)


def test_queue_length_cap_holds_under_concurrent_enqueues(queue) -> None:
    refused = []

    def one() -> None:
        try:
            put(queue, "aa", max_queued=5)
        except QueueFull as e:
            refused.append(e)

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(refused) == 7 and all(e.cap == 5 for e in refused)
    assert queue.counts()["queued"] == 5


def test_list_pages_newest_first(queue) -> None:
    ids = []
    for _ in range(5):
        ids.append(put(queue, "aa").id)
        time.sleep(0.002)  # distinct creation times order the pages
    page, more = queue.list("aa", None, 3)
    assert more and [t.id for t in page] == ids[::-1][:3]
    page, more = queue.list("aa", page[-1].id, 3)
    assert not more and [t.id for t in page] == ids[::-1][3:]


def test_plans(queue) -> None:
    assert queue.plan("aa", "fast").tiers == ("fast", "relax")
    queue.set_plan("aa", "relax", weight=2.0, max_queued=7)
    plan = queue.plan("aa", "fast")
    assert plan.tiers == ("relax",) and plan.weight == 2.0 and plan.max_queued == 7
    with pytest.raises(ValueError, match="plan must be one of"):
        queue.set_plan("aa", "turbo")
    with pytest.raises(KeyError):
        queue.set_plan("nobody", "fast")


def test_an_event_a_crash_kept_from_the_sink_is_found_once(queue) -> None:
    sent, lost = put(queue, "aa"), put(queue, "aa")
    for task in queue.claim("d1", 60, 2):
        assert queue.succeed(task.id, "d1", {"images": []}, "m")
    assert queue.event_sent(sent.id)  # handed to the sink; `lost`'s process died before that
    assert not queue.event_sent(sent.id)
    assert queue.unsent_events(older_than_s=3600) == []  # too recent: its dispatcher may live
    taken = queue.unsent_events(older_than_s=0)
    assert [t.id for t in taken] == [lost.id] and taken[0].status == "succeeded"
    assert queue.unsent_events(older_than_s=0) == []  # taken once


def ticket(q: RenderQueueStore, tenant: str, owner: str, lease_s: float = 60):
    """A synchronous request's ticket, held by `owner`'s dispatcher."""
    return q.enqueue(
        tenant, "fast", {"job": {}}, 1, 4, 1.0, None, sync_owner=owner, lease_s=lease_s
    )


def test_sync_tickets_share_the_fair_order_but_only_their_ingress_claims_them(queue) -> None:
    for _ in range(10):
        put(queue, "aa")
    mine = ticket(queue, "bb", "d1")
    # Another ingress's dispatcher passes it over; its own takes it among A's first.
    assert mine.id not in {t.id for t in queue.claim("d2", 60, 3)}
    claimed = queue.claim("d1", 60, 2)
    assert mine.id in {t.id for t in claimed} and all(t.tenant_id for t in claimed)
    assert queue.get_any(mine.id).sync and queue.get_any(mine.id).status == "in_progress"
    # It is no async render: not listed, not readable or cancellable through the API's reads.
    assert queue.get("bb", mine.id) is None and queue.list("bb", None, 10) == ([], False)
    assert queue.cancel("bb", mine.id) == (None, False)
    assert not queue.finish_sync(mine.id, "d2", "succeeded")
    assert queue.finish_sync(mine.id, "d1", "succeeded")
    assert not queue.finish_sync(mine.id, "d1", "cancelled")  # once
    assert TenantDirectory(queue.engine).count_renders("bb") == 0  # the request charges


def test_a_sync_ticket_whose_ingress_died_fails_and_is_never_queued_again(queue) -> None:
    waiting, running = ticket(queue, "aa", "dead"), ticket(queue, "aa", "dead")
    assert [t.id for t in queue.claim("dead", 60, 1)] == [waiting.id]
    assert queue.renew("dead", [waiting.id, running.id], 60) == {waiting.id, running.id}
    with Session(queue.engine) as s, s.begin():  # the leases ran out (its ingress died)
        s.execute(update(RenderTaskRow).values(lease_expires_at=RenderTaskRow.created_at))
    assert queue.expire_leases(max_attempts=3) == []  # no event: its client was gone
    for t in (waiting, running):
        done = queue.get_any(t.id)
        assert done.status == "failed" and done.error_code == "render_interrupted"
    assert queue.claim("alive", 60, 5) == []


def test_a_tenant_with_no_room_is_passed_over_not_waited_for(queue) -> None:
    for _ in range(3):
        put(queue, "aa")
    late = put(queue, "bb")
    room = {"aa": 1, "bb": None}
    claimed = queue.claim("d1", 60, 3, room=lambda s, tenant: room[tenant])
    assert [t.tenant_id for t in claimed].count("aa") == 1 and late.id in {t.id for t in claimed}
