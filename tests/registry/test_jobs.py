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


def test_outbox_marker_and_worklist(jobs):
    job, _ = jobs.create("acme", "b", "f", "m", {})
    assert not job.submitted and [j.id for j in jobs.unfinished()] == [job.id]
    jobs.mark_submitted(job.id)
    assert jobs.get_any(job.id).submitted
    assert jobs.finish(job.id, "failed", error="the training process died")
    done = jobs.get_any(job.id)
    assert done.error_code == "training_failed" and jobs.unfinished() == []


# --- compare-and-set under real concurrency ---------------------------------------------------
ROUNDS = 40


@pytest.fixture(params=["sqlite", "postgres"])
def race_engine(request, tmp_path):
    """A fresh database of its own for racing writers: a SQLite file, or a new Postgres database
    (created and dropped here; skipped where Postgres does not answer)."""
    import secrets

    import sqlalchemy as sa

    from registry.db import make_engine

    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'race.db'}")
        yield engine
        engine.dispose()
        return
    server = "postgresql+psycopg://postgres@127.0.0.1:5432"
    name = f"bf_jobs_{secrets.token_hex(6)}"
    try:
        admin = sa.create_engine(f"{server}/test", isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(sa.text(f"CREATE DATABASE {name}"))
    except Exception as e:  # noqa: BLE001 - any connection failure means: skip
        pytest.skip(f"Postgres at {server} does not answer: {type(e).__name__}")
    engine = make_engine(f"{server}/{name}")
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.connect() as c:
            c.execute(sa.text(f"DROP DATABASE {name} WITH (FORCE)"))
        admin.dispose()


def _race(*calls):
    """Run the calls in threads released together by a barrier; their results, in order."""
    import threading

    barrier = threading.Barrier(len(calls))
    results: list[object] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(i, call):
        try:
            barrier.wait()
            results[i] = call()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def _terminal_events(jobs, job_id):
    return [
        e.message
        for e in jobs.events(job_id)
        if e.message.startswith("job ") and e.message != "job queued"
    ]


@pytest.mark.parametrize("running", [False, True], ids=["queued", "running"])
def test_cancel_against_finish_has_one_winner(race_engine, running):
    tenants = TenantDirectory(race_engine)
    tenants.create_tenant("acme")
    jobs = JobStore(race_engine)
    winners = {"succeeded": 0, "cancelled": 0}
    for _ in range(ROUNDS):
        job, _ = jobs.create("acme", "b", "f", "m", {})
        if running:
            jobs.mark_running(job.id, 1)
        # The ingress's cancel of a job (flag, then end it) against the worker's success.
        cancel = lambda j=job.id: (  # noqa: E731
            jobs.request_cancel("acme", j),
            jobs.finish(j, "cancelled"),
        )[1]
        succeed = lambda j=job.id: jobs.finish(j, "succeeded", adapter_version=7)  # noqa: E731
        cancelled, succeeded = _race(cancel, succeed)
        assert cancelled != succeeded, "exactly one of them wins"
        final = jobs.get_any(job.id)
        winner = "cancelled" if cancelled else "succeeded"
        winners[winner] += 1
        assert final.status == winner
        assert final.adapter_version == (7 if succeeded else None)
        assert _terminal_events(jobs, job.id) == [f"job {winner}"]
    assert sum(winners.values()) == ROUNDS


def test_finish_against_retried_finish_has_one_winner(race_engine):
    tenants = TenantDirectory(race_engine)
    tenants.create_tenant("acme")
    jobs = JobStore(race_engine)
    for i in range(ROUNDS):
        job, _ = jobs.create("acme", "b", "f", "m", {})
        jobs.mark_running(job.id, 1)
        # A worker's finish and its retry (or the reconciler's), with different outcomes.
        first = lambda j=job.id, v=i: jobs.finish(j, "succeeded", adapter_version=v)  # noqa: E731
        retry = lambda j=job.id: jobs.finish(j, "failed", error="its Ray job failed")  # noqa: E731
        results = _race(first, retry, first)
        assert results.count(True) == 1, results
        final = jobs.get_any(job.id)
        events = _terminal_events(jobs, job.id)
        assert len(events) == 1 and events[0].startswith(f"job {final.status}")
        if final.status == "succeeded":
            assert final.adapter_version == i and final.error is None
        else:
            assert final.adapter_version is None and final.error_code == "training_failed"


def test_cancel_request_after_finish_changes_nothing(race_engine):
    tenants = TenantDirectory(race_engine)
    tenants.create_tenant("acme")
    jobs = JobStore(race_engine)
    for _ in range(ROUNDS // 2):
        job, _ = jobs.create("acme", "b", "f", "m", {})
        jobs.mark_running(job.id, 1)
        _race(
            lambda j=job.id: jobs.request_cancel("acme", j),
            lambda j=job.id: jobs.finish(j, "succeeded", adapter_version=1),
        )
        final = jobs.get_any(job.id)
        messages = [e.message for e in jobs.events(job.id)]
        assert final.status == "succeeded"
        # The flag and its event exist only if the request came while the job was unfinished.
        assert ("cancellation requested" in messages) == final.cancel_requested
        assert messages[-1] == "job succeeded" and messages.count("job succeeded") == 1
