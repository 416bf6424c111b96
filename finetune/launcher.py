"""Submitting fine-tune jobs to the Ray cluster as Ray jobs (visible in `ray job list`), and reading
their status back for the reconciler. Every call to Ray's job API has a timeout.

A submission carries no secret: its runtime env holds only `Settings.public_env()` (the secrets
file's path, never its content); the job's processes read the credentials on their node.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import sys
from collections.abc import Callable
from typing import TypeVar

from registry.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

# Ray's answer to a second submit with the same submission_id (dashboard/modules/job).
_ALREADY_EXISTS = "already exists"


class LaunchError(RuntimeError):
    """The cluster did not accept the job, or did not answer in time. The message is plain and
    safe to show a tenant; the cause (with internal addresses) is chained for the logs."""


class JobLauncher:
    """Runs `python -m finetune.job <id>` as a Ray job whose submission id is the job id."""

    def __init__(self, settings: Settings, python: str = sys.executable) -> None:
        self.settings = settings
        self.python = python  # the cluster's interpreter: ours, when launched from a replica
        # Ray's SDK (requests) has no timeout of its own: calls run here and are waited on with
        # one. A hung call keeps its thread, so the pool is small and bounded.
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="ray-jobs")

    def _call(self, what: str, fn: Callable[..., T]) -> T:
        def with_client() -> T:
            from ray.job_submission import JobSubmissionClient

            return fn(JobSubmissionClient(self.settings.ray_dashboard_url))

        future = self._pool.submit(with_client)
        try:
            return future.result(timeout=self.settings.ray_request_timeout_s)
        except concurrent.futures.TimeoutError as e:
            raise LaunchError(
                f"the cluster did not answer ({what}) within "
                f"{self.settings.ray_request_timeout_s:g} s"
            ) from e

    def _num_gpus(self) -> float:
        if self.settings.fine_tune_num_gpus is not None:
            return self.settings.fine_tune_num_gpus
        import ray

        # Inside the farm (a Serve replica) Ray is connected; ask the cluster what it has.
        return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0

    def submission(self, job_id: str, tenant_id: str, data_parallel: bool = False) -> dict:
        """The `submit_job` arguments of a job: what Ray stores and shows on its dashboard."""
        return {
            "entrypoint": f"{self.python} -m finetune.job {job_id}",
            "submission_id": job_id,
            "runtime_env": {"env_vars": self.settings.public_env()},
            "entrypoint_num_cpus": self.settings.fine_tune_num_cpus,
            "entrypoint_num_gpus": 0.0 if data_parallel else self._num_gpus(),
            "metadata": {"tenant": tenant_id, "brandfarm_job": job_id},
        }

    def submit(self, job_id: str, tenant_id: str, data_parallel: bool = False) -> str:
        """Submit the job, idempotently: a Ray job with this submission id already there counts
        as submitted (the reconciler and the ingress may both try). A data-parallel job's GPUs
        go to its Ray Train workers instead."""
        kwargs = self.submission(job_id, tenant_id, data_parallel)
        try:
            return self._call("submit", lambda c: c.submit_job(**kwargs))
        except LaunchError:
            raise
        except Exception as e:  # noqa: BLE001 - the SDK raises plain RuntimeError/HTTP errors
            if _ALREADY_EXISTS in str(e):
                return job_id
            log.warning("submitting job %s to Ray failed: %r", job_id, e)
            raise LaunchError("the cluster did not accept the job") from e

    def statuses(self) -> dict[str, str]:
        """Ray's status (PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED) of every fine-tune job
        it knows, by submission id. Raises `LaunchError` when the cluster cannot be asked."""
        try:
            details = self._call("list jobs", lambda c: c.list_jobs())
        except LaunchError:
            raise
        except Exception as e:  # noqa: BLE001
            log.warning("listing Ray jobs failed: %r", e)
            raise LaunchError("the cluster's job list could not be read") from e
        return {
            d.submission_id: str(getattr(d.status, "value", d.status))
            for d in details
            if d.submission_id and (d.metadata or {}).get("brandfarm_job") == d.submission_id
        }

    def stop(self, job_id: str) -> None:
        # Stopping a job that already ended (or a cluster that does not answer) is not an error.
        with contextlib.suppress(Exception):
            self._call("stop", lambda c: c.stop_job(job_id))
