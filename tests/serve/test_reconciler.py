"""The job reconciler over a real job store (SQLite) and a cluster stand-in that keeps Ray's
answers in a dict: the outbox gets submitted, jobs whose Ray job ended or vanished fail."""

from __future__ import annotations

import threading

import pytest

from finetune.launcher import LaunchError
from registry.db import make_engine
from registry.jobs import JobStore
from registry.tenants import TenantDirectory
from serve.reconciler import LOST_CODE, JobReconciler


class Cluster:
    """Ray's job table as a dict (submission id → status), with Ray's idempotent submit."""

    def __init__(self) -> None:
        self.status: dict[str, str] = {}
        self.submits: list[tuple[str, bool]] = []
        self.down = False
        self.before_list = lambda: None

    def submit(self, job_id: str, tenant_id: str, data_parallel: bool = False) -> str:
        if self.down:
            raise LaunchError("the cluster did not accept the job")
        self.submits.append((job_id, data_parallel))
        self.status.setdefault(job_id, "PENDING")
        return job_id

    def statuses(self) -> dict[str, str]:
        if self.down:
            raise LaunchError("the cluster's job list could not be read")
        self.before_list()
        return dict(self.status)


@pytest.fixture
def jobs(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    TenantDirectory(engine).create_tenant("acme")
    return JobStore(engine)


def _job(jobs, workers=1, submitted=True):
    job, _ = jobs.create("acme", "b", "f", "m", {"hyperparameters": {"workers": workers}})
    if submitted:
        jobs.mark_submitted(job.id)
    return job


def test_a_job_recorded_but_never_submitted_is_submitted_once(jobs):
    cluster = Cluster()
    ended = []
    reconciler = JobReconciler(jobs, cluster, 1.0, on_ended=ended.append)
    # The ingress wrote the record and died before submitting it.
    single, dp = _job(jobs, submitted=False), _job(jobs, workers=2, submitted=False)
    cluster.down = True
    report = reconciler.reconcile_once()
    assert report.submitted == [] and not jobs.get_any(single.id).submitted  # retried later
    cluster.down = False
    report = reconciler.reconcile_once()
    assert sorted(report.submitted) == sorted([single.id, dp.id])
    assert sorted(cluster.submits) == sorted([(single.id, False), (dp.id, True)])
    assert jobs.get_any(single.id).submitted and jobs.get_any(single.id).status == "queued"
    reconciler.reconcile_once()
    assert len(cluster.submits) == 2 and ended == []  # submitted once; PENDING is fine


@pytest.mark.parametrize(
    ("ray_status", "running", "words"),
    [
        ("FAILED", True, "failed"),
        ("STOPPED", True, "was stopped"),
        (None, True, "no longer knows it"),
        ("SUCCEEDED", True, "without recording a result"),
        ("FAILED", False, "failed"),  # died before mark_running
        (None, False, "no longer knows it"),
    ],
)
def test_a_job_whose_ray_job_ended_or_vanished_fails(jobs, ray_status, running, words):
    cluster = Cluster()
    ended = []
    job, alive = _job(jobs), _job(jobs)
    if running:
        jobs.mark_running(job.id, 1)
    if ray_status is not None:
        cluster.status[job.id] = ray_status
    cluster.status[alive.id] = "RUNNING"
    report = JobReconciler(jobs, cluster, 1.0, on_ended=ended.append).reconcile_once()
    failed = jobs.get_any(job.id)
    assert failed.status == "failed" and failed.error_code == LOST_CODE
    assert words in failed.error and "Ray" not in failed.error
    assert list(report.failed) == [job.id] and [j.id for j in ended] == [job.id]
    assert jobs.get_any(alive.id).status == "queued"


def test_an_unreachable_cluster_fails_nothing(jobs):
    cluster = Cluster()
    job = _job(jobs)
    cluster.down = True
    report = JobReconciler(jobs, cluster, 1.0).reconcile_once()
    assert report.cluster_unreachable and jobs.get_any(job.id).status == "queued"


def test_a_job_that_finished_meanwhile_keeps_its_outcome(jobs):
    cluster = Cluster()
    job = _job(jobs)
    jobs.mark_running(job.id, 1)
    cluster.status[job.id] = "SUCCEEDED"
    # The worker records success after the reconciler read the records, before it acts.
    cluster.before_list = lambda: jobs.finish(job.id, "succeeded", adapter_version=3)
    report = JobReconciler(jobs, cluster, 1.0).reconcile_once()
    assert report.failed == {}
    assert jobs.get_any(job.id).status == "succeeded"
    assert [e.message for e in jobs.events(job.id)][-1] == "job succeeded"


def test_the_loop_fails_a_lost_job_within_two_intervals(jobs):
    cluster = Cluster()
    job = _job(jobs)
    jobs.mark_running(job.id, 1)
    cluster.status[job.id] = "RUNNING"
    reconciler = JobReconciler(jobs, cluster, 0.2)
    passes = threading.Semaphore(0)
    once = reconciler.reconcile_once

    def counted():
        report = once()
        passes.release()
        return report

    reconciler.reconcile_once = counted
    stop = reconciler.start()
    try:
        assert passes.acquire(timeout=30)  # a pass ran while the Ray job was alive
        assert jobs.get_any(job.id).status == "running"
        cluster.status[job.id] = "FAILED"  # the supervisor is killed
        # Two passes after the death at most: the first may have read the old status.
        for _ in range(2):
            assert passes.acquire(timeout=30)
        assert jobs.get_any(job.id).status == "failed"
    finally:
        stop.set()
