"""Fine-tuning jobs over HTTP, shaped like OpenAI's: create, list, get, events, checkpoints, cancel.

Creation checks every field against its limit, records the job (an outbox entry), then submits
it to the Ray cluster (`finetune.launcher`); if the ingress dies in between, the reconciler
(`serve.reconciler`) submits it. Everything is tenant-scoped: another tenant's ids are 404.
"""

from __future__ import annotations

import contextlib
import re
import secrets

from pydantic import BaseModel, Field

from finetune.job import checkpoint_steps, discard_job_objects
from finetune.launcher import JobLauncher, LaunchError
from registry.base_models import BaseModelInfo
from registry.files import FileCatalog
from registry.jobs import TERMINAL, JobRecord, JobStore, job_object, timestamp
from registry.settings import Settings
from registry.storage import ObjectStore, StorageError
from serve.errors import APIError, InvalidField, ServiceUnavailable, StorageUnavailable
from serve.limits import LimitGuard
from serve.protocol import MAX_SEED, STRICT_BODY, Text
from serve.request_context import request_logger
from serve.webhook_urls import check_webhook_url

BRAND = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
TRIGGER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _-]{0,63}$")
MAX_VALIDATION_PROMPTS = 8
log = request_logger(__name__)


class Hyperparameters(BaseModel):
    model_config = STRICT_BODY
    steps: int = Field(200, description="Optimizer steps.")
    rank: int = Field(8, description="LoRA rank (1..128).")
    alpha: float = Field(8.0, description="LoRA alpha (0..1024]; scale is alpha/rank.")
    learning_rate: float = Field(1e-3, description="AdamW learning rate (0..1].")
    batch_size: int = Field(4, description="Images per step (1..64).")
    resolution: int | None = Field(None, description="Training side; the model's native size.")
    gradient_accumulation_steps: int = Field(1, description="Micro-batches per step (1..64).")
    workers: int = Field(1, description="Ray Train workers; > 1 trains data-parallel.")


class FineTuneJobRequest(BaseModel):
    model_config = STRICT_BODY
    training_file: Text = Field(description="A file id from POST /v1/files (purpose fine-tune).")
    brand: Text = Field(description="Adapter name: [a-z0-9][a-z0-9-]{1,62}.")
    trigger_word: Text | None = Field(None, description="Word captions use for the brand.")
    base_model: Text | None = Field(None, description="Base model id; default: the farm's.")
    model: Text | None = Field(None, description="OpenAI's name for base_model.")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    seed: int | None = Field(None, description="Training seed; drawn when omitted.")
    validation_prompts: list[Text] | None = Field(None, description="Rendered base vs adapter.")
    eval_prompts: list[Text] | None = Field(
        None,
        description="Held-out prompts the evaluation renders (base, production, new version); "
        "default: captions of images held out of training. 1..fine_tune_eval_max_prompts.",
    )
    webhook_url: Text | None = Field(
        None, description="Where this job's events go (default: the tenant's webhook URL)."
    )


class JobService:
    def __init__(
        self,
        settings: Settings,
        model: BaseModelInfo,
        jobs: JobStore,
        files: FileCatalog,
        store: ObjectStore,
        launcher: JobLauncher,
        tenant_limits: LimitGuard | None = None,
    ) -> None:
        self.tenant_limits = tenant_limits
        self.settings = settings
        self.model = model
        self.jobs = jobs
        self.files = files
        self.store = store
        self.launcher = launcher

    def _check(self, tenant_id: str, req: FineTuneJobRequest) -> dict:
        s, hp = self.settings, req.hyperparameters
        if not BRAND.match(req.brand):
            raise InvalidField(
                "brand", f"brand must match [a-z0-9][a-z0-9-]{{1,62}}, got {req.brand!r}"
            )
        if req.trigger_word is not None and not TRIGGER.match(req.trigger_word):
            raise InvalidField(
                "trigger_word",
                "trigger_word must be 1-64 letters, digits, spaces, '_' or '-', "
                f"starting with a letter or digit, got {req.trigger_word!r}",
            )
        base = req.base_model or req.model
        if base is not None and base != self.model.id:
            raise InvalidField(
                "base_model",
                f"base model {base!r} is not served here; available: {self.model.id!r}",
                status=404,
                code="model_not_found",
            )
        bounds = {
            "steps": (hp.steps, 1, s.fine_tune_max_steps),
            "rank": (hp.rank, 1, 128),
            "batch_size": (hp.batch_size, 1, 64),
            "gradient_accumulation_steps": (hp.gradient_accumulation_steps, 1, 64),
            "workers": (hp.workers, 1, s.fine_tune_max_workers),
        }
        for name, (value, lo, hi) in bounds.items():
            if not lo <= value <= hi:
                raise InvalidField(
                    f"hyperparameters.{name}", f"{name} must be between {lo} and {hi}, got {value}"
                )
        if not 0 < hp.alpha <= 1024:
            raise InvalidField(
                "hyperparameters.alpha", f"alpha must be in (0, 1024], got {hp.alpha}"
            )
        if not 0 < hp.learning_rate <= 1:
            raise InvalidField(
                "hyperparameters.learning_rate",
                f"learning_rate must be in (0, 1], got {hp.learning_rate}",
            )
        if hp.resolution is not None and hp.resolution != self.model.native_size:
            raise InvalidField(
                "hyperparameters.resolution",
                f"resolution must be {self.model.native_size} (the native size of "
                f"{self.model.id!r}), got {hp.resolution}",
            )
        if req.seed is not None and not 0 <= req.seed <= MAX_SEED:
            raise InvalidField("seed", f"seed must be between 0 and {MAX_SEED}, got {req.seed}")
        prompts = req.validation_prompts or []
        if len(prompts) > MAX_VALIDATION_PROMPTS:
            raise InvalidField(
                "validation_prompts",
                f"at most {MAX_VALIDATION_PROMPTS} validation_prompts, got {len(prompts)}",
            )
        for p in prompts:
            if not p.strip() or len(p) > s.max_prompt_chars:
                raise InvalidField(
                    "validation_prompts",
                    f"each validation prompt must be 1..{s.max_prompt_chars} characters",
                )
        eval_prompts = req.eval_prompts
        if eval_prompts is not None:
            if not 1 <= len(eval_prompts) <= s.fine_tune_eval_max_prompts:
                raise InvalidField(
                    "eval_prompts",
                    f"eval_prompts must hold 1..{s.fine_tune_eval_max_prompts} prompts, "
                    f"got {len(eval_prompts)}",
                )
            for p in eval_prompts:
                if not p.strip() or len(p) > s.max_prompt_chars:
                    raise InvalidField(
                        "eval_prompts",
                        f"each eval prompt must be 1..{s.max_prompt_chars} characters",
                    )
        webhook_url = check_webhook_url(req.webhook_url, s) if req.webhook_url else None
        training = self.files.get(tenant_id, req.training_file)
        if training is None:
            raise InvalidField(
                "training_file",
                f"no file {req.training_file!r}; upload one with POST /v1/files",
                status=404,
                code="file_not_found",
            )
        if training.purpose != "fine-tune":
            raise InvalidField(
                "training_file",
                f"file {req.training_file!r} has purpose {training.purpose!r}; a training file "
                "must be uploaded with purpose fine-tune",
            )
        return {
            "trigger_word": req.trigger_word,
            "hyperparameters": {**hp.model_dump(), "resolution": self.model.native_size},
            "seed": req.seed if req.seed is not None else secrets.randbelow(MAX_SEED + 1),
            "validation_prompts": prompts,
            "eval_prompts": eval_prompts,
            "webhook_url": webhook_url,
        }

    def create(self, tenant_id: str, req: FineTuneJobRequest, idempotency_key: str | None) -> dict:
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= 255:
            raise InvalidField("Idempotency-Key", "Idempotency-Key must be 1..255 characters")
        spec = self._check(tenant_id, req)
        admit = (
            self.tenant_limits.admit_job(tenant_id, idempotency_key)
            if self.tenant_limits is not None
            else contextlib.nullcontext()
        )
        with admit:  # the job caps (429) and the storage cap (403), then the record
            job, created = self.jobs.create(
                tenant_id, req.brand, req.training_file, self.model.id, spec, idempotency_key
            )
        if created:
            try:
                self.launcher.submit(
                    job.id, tenant_id, data_parallel=req.hyperparameters.workers > 1
                )
            except LaunchError as e:  # its message is plain; the cause was logged
                log.error("submitting job %s failed: %s", job.id, e)
                self.jobs.finish(
                    job.id,
                    "failed",
                    error="the training cluster was unavailable",
                    error_code="cluster_unavailable",
                )
                raise ServiceUnavailable(
                    "the training cluster is unavailable; retry shortly", "cluster_unavailable"
                ) from None
            self.jobs.mark_submitted(job.id)
        return job_object(self.jobs.get_any(job.id))

    def _job(self, tenant_id: str, job_id: str) -> JobRecord:
        job = self.jobs.get(tenant_id, job_id)
        if job is None:
            raise APIError(
                404, f"no fine-tuning job {job_id!r}", param="job_id", code="job_not_found"
            )
        return job

    def get(self, tenant_id: str, job_id: str) -> dict:
        return job_object(self._job(tenant_id, job_id))

    def list(self, tenant_id: str, after: str | None, limit: int) -> dict:
        if not 1 <= limit <= 100:
            raise InvalidField("limit", f"limit must be between 1 and 100, got {limit}")
        try:
            jobs, more = self.jobs.list(tenant_id, after, limit)
        except KeyError as e:
            raise InvalidField("after", f"no fine-tuning job {after!r} to page after") from e
        return {"object": "list", "data": [job_object(j) for j in jobs], "has_more": more}

    def events(self, tenant_id: str, job_id: str, after: int, limit: int) -> dict:
        self._job(tenant_id, job_id)
        if not 1 <= limit <= 1000:
            raise InvalidField("limit", f"limit must be between 1 and 1000, got {limit}")
        events = self.jobs.events(job_id, after, limit + 1)
        return {
            "object": "list",
            "data": [
                {
                    "object": "fine_tuning.job.event",
                    "id": str(e.id),
                    "created_at": timestamp(e.created_at),
                    "level": e.level,
                    "message": e.message,
                    "data": {"step": e.step, "loss": e.loss},
                }
                for e in events[:limit]
            ],
            "has_more": len(events) > limit,
        }

    def checkpoints(self, tenant_id: str, job_id: str) -> dict:
        job = self._job(tenant_id, job_id)
        try:
            steps = checkpoint_steps(self.store, job)
        except StorageError as e:
            raise StorageUnavailable() from e
        return {
            "object": "list",
            "data": [
                {
                    "object": "fine_tuning.job.checkpoint",
                    "id": f"{job.id}:step-{step}",
                    "step_number": step,
                    "fine_tuning_job_id": job.id,
                }
                for step, _ in reversed(steps)
            ],
            "has_more": False,
        }

    def cancel(self, tenant_id: str, job_id: str) -> dict:
        job = self._job(tenant_id, job_id)
        if job.status in TERMINAL:
            raise APIError(
                409, f"job {job_id} already {job.status}; nothing to cancel", code="job_finished"
            )
        self.jobs.request_cancel(tenant_id, job_id)
        if job.status == "queued":  # no training process yet: stop the Ray job and end it here
            self.launcher.stop(job_id)
            # Nothing was trained yet; leftovers would only be bytes.
            if self.jobs.finish(job_id, "cancelled"):
                with contextlib.suppress(StorageError):
                    discard_job_objects(self.store, job)
        return job_object(self.jobs.get_any(job_id))
