"""Keeps fine-tune job records true to the cluster: submits the jobs the outbox still holds, and
fails a queued or running job whose Ray job failed, was stopped or vanished.

`JobReconciler.reconcile_once` is one pass, plain Python over a `JobStore` and anything with the
launcher's `submit` / `statuses` (no Ray needed to test it); `run` repeats it every
`job_reconcile_interval_s` until told to stop. The ingress runs it in a thread of its own. Every
change goes through the store's compare-and-set, so a reconciler racing a worker (or another
ingress replica's reconciler) never overwrites an outcome.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from finetune.launcher import LaunchError
from registry.jobs import JobRecord, JobStore

log = logging.getLogger(__name__)

#: Why a job failed, by the status Ray reports for its Ray job (None: Ray does not know it).
#: A Ray job that succeeded while its record is unfinished ended without recording a result.
RAY_JOB_ENDED = {
    "FAILED": "its process on the cluster failed",
    "STOPPED": "its process on the cluster was stopped",
    "SUCCEEDED": "its process on the cluster ended without recording a result",
    None: "the cluster no longer knows it (lost with its node or a cluster restart)",
}
LOST_CODE = "cluster_job_lost"


class ClusterJobs(Protocol):
    """What the reconciler needs of `finetune.launcher.JobLauncher`."""

    def submit(self, job_id: str, tenant_id: str, data_parallel: bool = False) -> str: ...

    def statuses(self) -> dict[str, str]: ...


@dataclass
class PassReport:
    """What one pass did (for logs and tests)."""

    submitted: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # job id → reason
    cluster_unreachable: bool = False


class JobReconciler:
    def __init__(
        self,
        jobs: JobStore,
        cluster: ClusterJobs,
        interval_s: float,
        on_ended: Callable[[JobRecord], None] | None = None,
    ) -> None:
        self.jobs = jobs
        self.cluster = cluster
        self.interval_s = interval_s
        self.on_ended = on_ended  # cleanup of a job this pass ended (its checkpoints)

    def reconcile_once(self) -> PassReport:
        report = PassReport()
        unfinished = self.jobs.unfinished()
        for job in unfinished:
            if not job.submitted:
                self._submit(job, report)
        watched = [j for j in unfinished if j.submitted]
        if not watched:
            return report
        try:
            statuses = self.cluster.statuses()
        except LaunchError as e:
            # A cluster that does not answer has not lost the jobs: ask again next pass.
            log.warning("job reconciler: %s", e)
            report.cluster_unreachable = True
            return report
        for job in watched:
            status = statuses.get(job.id)
            if status is not None and status not in RAY_JOB_ENDED:
                continue  # PENDING or RUNNING: the job's own processes report
            reason = RAY_JOB_ENDED[status]
            # Compare-and-set: a job that finished meanwhile keeps its outcome.
            if self.jobs.finish(
                job.id, "failed", error=f"the job stopped: {reason}", error_code=LOST_CODE
            ):
                log.warning("job %s failed: Ray reports %s for its Ray job", job.id, status)
                report.failed[job.id] = reason
                if self.on_ended is not None:
                    self._ended(job)
        return report

    def _submit(self, job: JobRecord, report: PassReport) -> None:
        """Submit an outbox entry; idempotent, the submission id being the job id."""
        workers = job.spec.get("hyperparameters", {}).get("workers", 1)
        try:
            self.cluster.submit(job.id, job.tenant_id, data_parallel=workers > 1)
        except LaunchError as e:
            log.warning("job reconciler: job %s stays in the outbox: %s", job.id, e)
            return
        self.jobs.mark_submitted(job.id)
        report.submitted.append(job.id)
        log.info("job reconciler: submitted job %s from the outbox", job.id)

    def _ended(self, job: JobRecord) -> None:
        try:
            self.on_ended(job)
        except Exception as e:  # noqa: BLE001 - leftovers are bytes, the outcome stands
            log.warning("job %s: cleanup after failing it did not finish: %r", job.id, e)

    def run(self, stop: threading.Event) -> None:
        """Reconcile every `interval_s` until `stop` is set; a failed pass is logged, not fatal."""
        while not stop.is_set():
            try:
                self.reconcile_once()
            except Exception:  # noqa: BLE001 - e.g. the database briefly down: try next pass
                log.exception("job reconciler pass failed")
            stop.wait(self.interval_s)

    def start(self) -> threading.Event:
        """Run in a daemon thread (its calls block, with timeouts); set the event to stop it."""
        stop = threading.Event()
        threading.Thread(target=self.run, args=(stop,), name="job-reconciler", daemon=True).start()
        return stop
