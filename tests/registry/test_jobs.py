"""Fine-tune job records: idempotent creation, tenant scope, pages, events, terminal states."""

from __future__ import annotations

import pytest

from registry.jobs import JobStore
from registry.tenants import TenantDirectory


@pytest.fixture
def jobs(sql_engine):
    tenants = TenantDirectory(sql_engine)
    tenants.create_tenant("acme")
    tenants.create_tenant("globex")
    return JobStore(sql_engine)


def test_idempotency_key_returns_the_first_job(jobs):
    a, created = jobs.create("acme", "brand", "file-1", "m", {"seed": 1}, "key-1")
    b, again = jobs.create("acme", "brand", "file-2", "m", {"seed": 2}, "key-1")
    assert created and not again and a.id == b.id and b.spec == {"seed": 1}
    c, created_c = jobs.create("globex", "brand", "file-1", "m", {}, "key-1")  # other tenant
    assert created_c and c.id != a.id
    assert jobs.count() == 2


def test_tenant_scope_and_pages(jobs):
    ids = [jobs.create("acme", "b", "f", "m", {})[0].id for _ in range(5)]
    assert jobs.get("globex", ids[0]) is None and jobs.get("acme", ids[0]).id == ids[0]
    first, more = jobs.list("acme", None, 2)
    second, more2 = jobs.list("acme", first[-1].id, 2)
    third, more3 = jobs.list("acme", second[-1].id, 2)
    seen = [j.id for j in first + second + third]
    assert more and more2 and not more3
    assert sorted(seen) == sorted(ids) and len(set(seen)) == 5
    assert jobs.list("globex", None, 10) == ([], False)
    with pytest.raises(KeyError):
        jobs.list("globex", ids[0], 2)  # another tenant's id is no anchor


def test_lifecycle_events_and_terminal_states(jobs):
    job, _ = jobs.create("acme", "b", "f", "m", {})
    running = jobs.mark_running(job.id, worker_pid=123)
    assert running.status == "running" and running.attempts == 1 and running.worker_pid == 123
    assert jobs.mark_running(job.id, 456).attempts == 2  # a retry is a new attempt
    jobs.add_event(job.id, "step 5/10", step=5, loss=0.25)
    assert jobs.finish(job.id, "succeeded", adapter_version=3)
    assert not jobs.finish(job.id, "failed", error="late")  # terminal stays terminal
    done = jobs.get_any(job.id)
    assert (done.status, done.adapter_version, done.error, done.worker_pid) == (
        "succeeded",
        3,
        None,
        None,
    )
    assert jobs.mark_running(job.id, 1) is None
    messages = [e.message for e in jobs.events(job.id)]
    assert messages == ["job queued", "step 5/10", "job succeeded"]
    assert jobs.events(job.id)[1].loss == 0.25
    with pytest.raises(ValueError, match="terminal"):
        jobs.finish(job.id, "running")


def test_cancel_request_is_scoped_and_recorded(jobs):
    job, _ = jobs.create("acme", "b", "f", "m", {})
    assert jobs.request_cancel("globex", job.id) is None
    assert not jobs.cancel_requested(job.id)
    assert jobs.request_cancel("acme", job.id).cancel_requested
    assert jobs.cancel_requested(job.id)
    assert jobs.finish(job.id, "cancelled")
    assert jobs.events(job.id)[-1].message == "job cancelled"
