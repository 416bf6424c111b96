"""Submitting fine-tune jobs to the Ray cluster as Ray jobs (visible in `ray job list`)."""

from __future__ import annotations

import contextlib
import sys

from registry.settings import Settings


class LaunchError(RuntimeError):
    """The cluster did not accept the job."""


class JobLauncher:
    """Runs `python -m finetune.job <id>` as a Ray job with the farm's settings in its env."""

    def __init__(self, settings: Settings, python: str = sys.executable) -> None:
        self.settings = settings
        self.python = python  # the cluster's interpreter: ours, when launched from a replica

    def _client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.settings.ray_dashboard_url)

    def _num_gpus(self) -> float:
        if self.settings.fine_tune_num_gpus is not None:
            return self.settings.fine_tune_num_gpus
        import ray

        # Inside the farm (a Serve replica) Ray is connected; ask the cluster what it has.
        return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0

    def submit(self, job_id: str, tenant_id: str, data_parallel: bool = False) -> str:
        """Submit the job; a data-parallel job's GPUs go to its Ray Train workers instead."""
        try:
            return self._client().submit_job(
                entrypoint=f"{self.python} -m finetune.job {job_id}",
                submission_id=job_id,
                runtime_env={"env_vars": self.settings.to_env()},
                entrypoint_num_cpus=self.settings.fine_tune_num_cpus,
                entrypoint_num_gpus=0.0 if data_parallel else self._num_gpus(),
                metadata={"tenant": tenant_id, "brandfarm_job": job_id},
            )
        except Exception as e:  # noqa: BLE001 - the SDK raises plain RuntimeError/HTTP errors
            raise LaunchError(f"the Ray cluster did not accept job {job_id}: {e}") from e

    def stop(self, job_id: str) -> None:
        # Stopping a job that already ended is not an error.
        with contextlib.suppress(Exception):
            self._client().stop_job(job_id)
