"""A fine-tune job as it runs on the cluster (the entrypoint of its Ray job).

`python -m finetune.job JOB_ID` is the supervisor: it runs the training in a child process
(`--worker`) and, if that process dies, starts another that resumes from the last checkpoint,
up to `fine_tune_max_attempts`. The worker reads the job record, fetches and verifies the dataset,
trains the LoRA with checkpoints to the object store (safetensors + JSON, the newest
`fine_tune_checkpoints_keep` kept), logs the run to MLflow (one experiment per tenant), and
registers the adapter only once everything else succeeded. A job that ends, however it ends,
deletes its checkpoints: only the registered adapter stays. A failure reaches the tenant as a
short message and a code (`describe_failure`); its detail goes to the log and the MLflow run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from finetune import checkpoints
from finetune.datasets import read_dataset_zip
from registry.db import make_engine
from registry.files import FileCatalog
from registry.jobs import TERMINAL, JobRecord, JobStore
from registry.settings import Settings, load_settings
from registry.storage import ObjectNotFound, ObjectStore, StorageError, tenant_prefix

EVENT_EVERY = 5  # steps between progress events in the job log
#: Seconds between two reads of the cancel flag while training.
STOP_POLL_S = 1.0
log = logging.getLogger("finetune.job")


class TrainingFileError(RuntimeError):
    """The job's dataset is gone or no longer matches its checksum (the message is for tenants)."""


class EvaluationCrashed(RuntimeError):
    """The evaluation of the trained adapter raised: the job fails and registers nothing."""


def experiment_name(tenant_id: str) -> str:
    return f"tenant-{tenant_id}"


def checkpoint_prefix(job: JobRecord) -> str:
    return f"{tenant_prefix(job.tenant_id)}jobs/{job.id}/checkpoints/"


def checkpoint_steps(store: ObjectStore, job: JobRecord) -> list[tuple[int, str]]:
    """(step, key stem) of every complete checkpoint, oldest first. A checkpoint is complete
    once its JSON part exists (written after its tensors); `<stem>.safetensors` and
    `<stem>.json` are its objects."""
    out = []
    for obj in store.list(checkpoint_prefix(job)):
        name = obj.key.rsplit("/", 1)[-1]
        if name.startswith("step-") and name.endswith(checkpoints.META_SUFFIX):
            stem = obj.key.removesuffix(checkpoints.META_SUFFIX)
            out.append((int(name[5 : -len(checkpoints.META_SUFFIX)]), stem))
    return sorted(out)


def discard_job_objects(store: ObjectStore, job: JobRecord) -> int:
    """Delete what a job kept while it ran (checkpoints, the data-parallel adapter hand-off);
    the registered adapter lives in the registry. Returns how many objects went."""
    prefix = f"{tenant_prefix(job.tenant_id)}jobs/{job.id}/"
    objects = store.list(prefix)
    for obj in objects:
        store.delete(obj.key)
    return len(objects)


FAILURE_MESSAGES = {
    "storage_unavailable": "the object store could not be reached; create the job again",
    "registry_unavailable": "the adapter registry could not be reached; create the job again",
    "training_failed": "training failed with an internal error; the operators have the details",
    "evaluation_failed": "the evaluation of the trained adapter failed, so nothing was "
    "registered; the operators have the details",
}


def describe_failure(e: BaseException) -> tuple[str, str]:
    """(code, message) a tenant may see for a failed job: plain words, no internal endpoint,
    path or exception class. The full exception goes to the log and the MLflow run instead."""
    import mlflow.exceptions

    if isinstance(e, TrainingFileError):
        return "invalid_training_file", str(e)
    if isinstance(e, EvaluationCrashed):
        return "evaluation_failed", FAILURE_MESSAGES["evaluation_failed"]
    if isinstance(e, StorageError):
        return "storage_unavailable", FAILURE_MESSAGES["storage_unavailable"]
    if isinstance(e, mlflow.exceptions.MlflowException | ConnectionError | TimeoutError):
        return "registry_unavailable", FAILURE_MESSAGES["registry_unavailable"]
    return "training_failed", FAILURE_MESSAGES["training_failed"]


def record_failure(run_id: str | None, job_id: str, e: BaseException) -> None:
    """The whole story of a failure, for operators: the job's log and its MLflow run."""
    detail = "".join(traceback.format_exception(e))
    log.error("job %s failed:\n%s", job_id, detail)
    if run_id is None:
        return
    import mlflow

    with contextlib.suppress(Exception):  # MLflow may be what failed
        client = mlflow.MlflowClient()
        client.set_tag(run_id, "error_detail", f"{type(e).__name__}: {e}"[:4000])
        client.log_text(run_id, detail, "error/traceback.txt")


# --- supervisor ------------------------------------------------------------------------------
def supervise(settings: Settings, job_id: str) -> int:
    jobs = JobStore(make_engine(settings.resolved_database_url))
    for attempt in range(1, settings.fine_tune_max_attempts + 1):
        code = subprocess.call([sys.executable, "-m", "finetune.job", job_id, "--worker"])
        job = jobs.get_any(job_id)
        if job.status in TERMINAL:
            return 0 if job.status != "failed" else 1
        if jobs.cancel_requested(job_id):
            jobs.finish(job_id, "cancelled")
            _discard_quietly(settings, job)
            return 0
        jobs.add_event(
            job_id,
            f"training process exited with code {code} (attempt {attempt} of "
            f"{settings.fine_tune_max_attempts}); resuming from the last checkpoint",
            level="warning",
        )
    jobs.finish(
        job_id,
        "failed",
        error=f"the training process died {settings.fine_tune_max_attempts} times; see events",
        error_code="training_process_died",
    )
    _discard_quietly(settings, jobs.get_any(job_id))
    return 1


def _discard_quietly(settings: Settings, job: JobRecord) -> None:
    try:
        discard_job_objects(ObjectStore.from_settings(settings), job)
    except StorageError as e:  # the job's outcome stands; the leftovers are only bytes
        log.warning("job %s: could not delete its checkpoints: %s", job.id, e)


# --- worker ----------------------------------------------------------------------------------
class JobReporter:
    """Everything a training process of a job reads and writes: the dataset, checkpoints,
    progress events, MLflow metrics, the cancel flag. Picklable (clients are made lazily), so a
    Ray Train worker gets its own copy."""

    def __init__(self, settings: Settings, job: JobRecord, run_id: str | None = None) -> None:
        self.settings = settings
        self.job = job
        self.run_id = run_id

    def __getstate__(self) -> dict:
        return {"settings": self.settings, "job": self.job, "run_id": self.run_id}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    @functools.cached_property
    def _engine(self):  # noqa: ANN202
        return make_engine(self.settings.resolved_database_url)

    @functools.cached_property
    def jobs(self) -> JobStore:
        return JobStore(self._engine)

    @functools.cached_property
    def files(self) -> FileCatalog:
        return FileCatalog(self._engine)

    @functools.cached_property
    def store(self) -> ObjectStore:
        return ObjectStore.from_settings(self.settings)

    def event(self, message: str, step: int | None = None, loss: float | None = None) -> None:
        self.jobs.add_event(self.job.id, message, step=step, loss=loss)

    def dataset(self) -> list:
        job = self.job
        record = self.files.get(job.tenant_id, job.training_file)
        if record is None:
            raise TrainingFileError(f"training file {job.training_file} no longer exists")
        try:
            data = self.store.get_bytes(record.object_key)
        except StorageError as e:
            # rclone answers a GET of a missing key in a shape minio does not parse, so the
            # error need not be ObjectNotFound: ask whether the object exists.
            if isinstance(e, ObjectNotFound) or not self.store.exists(record.object_key):
                raise TrainingFileError(
                    f"training file {record.id} is no longer in storage; upload it again"
                ) from e
            raise
        if hashlib.sha256(data).hexdigest() != record.sha256:
            raise TrainingFileError(
                f"training file {record.id} does not match its recorded sha256; upload it again"
            )
        return read_dataset_zip(data)

    def training_split(self) -> tuple[list, list]:
        """(training images, held-out images) of the dataset: the held-out ones are for the
        evaluation and never trained on (the same split in every worker and attempt)."""
        from finetune.evaluation import split_heldout

        return split_heldout(
            self.dataset(), self.settings.fine_tune_eval_heldout_images, self.job.spec["seed"]
        )

    def latest_checkpoint(self, announce: bool = True) -> dict | None:
        """The newest complete checkpoint, read as safetensors and JSON (nothing unpickled)."""
        steps = checkpoint_steps(self.store, self.job)
        if not steps:
            return None
        step, stem = steps[-1]
        state = checkpoints.decode(
            self.store.get_bytes(stem + checkpoints.TENSORS_SUFFIX),
            self.store.get_bytes(stem + checkpoints.META_SUFFIX),
        )
        if announce:
            self.event(f"resuming from the checkpoint at step {step}", step=step)
        return state

    def save_checkpoint(self, step: int, state: dict) -> None:
        """Store the checkpoint (tensors first, the JSON that completes it last), then delete
        all but the newest `fine_tune_checkpoints_keep`."""
        tensors, meta = checkpoints.encode(state)
        stem = f"{checkpoint_prefix(self.job)}step-{step:06d}"
        self.store.put_bytes(stem + checkpoints.TENSORS_SUFFIX, tensors)
        self.store.put_bytes(stem + checkpoints.META_SUFFIX, meta)
        self.event(f"checkpoint saved at step {step}", step=step)
        keep = self.settings.fine_tune_checkpoints_keep
        for _, old in checkpoint_steps(self.store, self.job)[:-keep]:
            # The JSON first: a half-deleted checkpoint is never taken for a complete one.
            self.store.delete(old + checkpoints.META_SUFFIX)
            self.store.delete(old + checkpoints.TENSORS_SUFFIX)

    @functools.cached_property
    def _mlflow(self):  # noqa: ANN202 - an MlflowClient, made once (per process) not per step
        import mlflow

        return mlflow.MlflowClient(self.settings.resolved_mlflow_uri)

    def progress(self, step: int, total: int, loss: float) -> None:
        self._mlflow.log_metric(self.run_id, "loss", loss, step=step)
        if step % EVENT_EVERY == 0 or step == total:
            self.event(f"step {step}/{total}", step=step, loss=loss)

    def should_stop(self) -> bool:
        """Cancelled, or ended by someone else (the reconciler failed a job whose Ray job it
        found gone): either way this process must not go on training. Training asks every
        step; the database is asked at most every `STOP_POLL_S` (a GPU step takes milliseconds),
        and a yes is final."""
        now = time.monotonic()
        if not self.__dict__.get("_stop") and now >= self.__dict__.get("_stop_next", 0.0):
            job = self.jobs.get_any(self.job.id)
            self._stop = job.cancel_requested or job.status in TERMINAL
            self._stop_next = now + STOP_POLL_S
        return self._stop

    def adapter_prefix(self) -> str:
        return f"{tenant_prefix(self.job.tenant_id)}jobs/{self.job.id}/adapter/"

    def upload_adapter(self, folder: Path) -> None:
        """Hand the trained adapter to the job's process, wherever training ran."""
        for path in sorted(folder.iterdir()):
            self.store.put_bytes(self.adapter_prefix() + path.name, path.read_bytes())

    def download_adapter(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        for obj in self.store.list(self.adapter_prefix()):
            (folder / obj.key.rsplit("/", 1)[-1]).write_bytes(self.store.get_bytes(obj.key))
        return folder


def train_kwargs(job: JobRecord, settings: Settings) -> dict:
    """`train_lora` arguments of a job, from its hyperparameters."""
    hp = job.spec["hyperparameters"]
    return {
        "steps": hp["steps"],
        "rank": hp["rank"],
        "alpha": hp["alpha"],
        "lr": hp["learning_rate"],
        "batch_size": hp["batch_size"],
        "gradient_accumulation_steps": hp.get("gradient_accumulation_steps", 1),
        "seed": job.spec["seed"],
        "checkpoint_every": settings.fine_tune_checkpoint_every,
    }


class Worker:
    def __init__(self, settings: Settings, job_id: str) -> None:
        self.settings = settings
        self.jobs = JobStore(make_engine(settings.resolved_database_url))
        self.job_id = job_id

    def run(self) -> int:
        job = self.jobs.mark_running(self.job_id, os.getpid())
        if job is None:
            return 0  # already finished (e.g. cancelled while queued)
        import mlflow

        from finetune.train import TrainingStopped

        mlflow.set_tracking_uri(self.settings.resolved_mlflow_uri)
        experiment = mlflow.set_experiment(experiment_name(job.tenant_id))
        client = mlflow.MlflowClient()
        previous = client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.job_id = '{job.id}'", max_results=1
        )
        run = mlflow.start_run(
            run_id=previous[0].info.run_id if previous else None,
            run_name=None if previous else job.id,
            tags={"job_id": job.id, "tenant": job.tenant_id, "brand": job.brand},
        )
        try:
            version = self._train_and_register(job, run.info.run_id)
        except TrainingStopped:
            mlflow.end_run("KILLED")
            self.jobs.finish(job.id, "cancelled")
            self._discard(job)
            return 0
        except Exception as e:  # noqa: BLE001 - any failure ends the job with its reason
            record_failure(run.info.run_id, job.id, e)
            code, message = describe_failure(e)
            with contextlib.suppress(Exception):
                mlflow.end_run("FAILED")
            self.jobs.finish(job.id, "failed", error=message, error_code=code)
            self._discard(job)
            return 0
        mlflow.end_run("FINISHED")
        self.jobs.finish(job.id, "succeeded", adapter_version=version)
        self._discard(job)
        return 0

    def _discard(self, job: JobRecord) -> None:
        _discard_quietly(self.settings, job)

    def _train_and_register(self, job: JobRecord, run_id: str) -> int:
        import mlflow

        from finetune.train import train_lora
        from registry.adapters import AdapterRegistry
        from registry.base_models import ensure_base_model

        spec, hp = job.spec, job.spec["hyperparameters"]
        reporter = JobReporter(self.settings, job, run_id)
        base = ensure_base_model(
            job.base_model, self.settings.state_path / "models", self.settings.max_image_side
        )
        examples, heldout = reporter.training_split()
        reporter.event(
            f"dataset loaded: {len(examples) + len(heldout)} images, {len(heldout)} held out "
            "for evaluation"
        )
        resume = reporter.latest_checkpoint()
        if resume is None:
            mlflow.log_params(
                {
                    **hp,
                    "base_model": base.id,
                    "base_model_revision": base.revision,
                    "trigger_word": spec.get("trigger_word") or "",
                    "seed": spec["seed"],
                    "training_file": job.training_file,
                    "images": len(examples),
                    "heldout_images": len(heldout),
                }
            )
        workers = hp.get("workers", 1)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "adapter"
            if workers > 1:
                from finetune.distributed import train_data_parallel

                reporter.event(f"training data-parallel on {workers} Ray Train workers")
                train_data_parallel(reporter, base.path, workers, resume is not None)
                reporter.download_adapter(out)
            else:
                train_lora(
                    base.path,
                    examples,
                    out,
                    progress=reporter.progress,
                    on_checkpoint=reporter.save_checkpoint,
                    resume=resume,
                    should_stop=reporter.should_stop,
                    **train_kwargs(job, self.settings),
                )
            self._log_validation(base, out, spec)
            record = reporter.files.get(job.tenant_id, job.training_file)
            registry = AdapterRegistry(self.settings.resolved_mlflow_uri)
            # A process that died between registering and recording must not register twice.
            done = (
                [
                    v
                    for v in registry.versions(job.tenant_id, job.brand, include_archived=True)
                    if v.tags.get("job_id") == job.id
                ]
                if job.brand in registry.brands(job.tenant_id)
                else []
            )
            if done:
                return done[0].version
            figures = self._evaluate(job, base, out, examples + heldout, heldout, registry)
            version = registry.register(
                job.tenant_id,
                job.brand,
                out,
                base_model_path=base.path,
                run_id=run_id,
                tags={
                    "base_model": base.id,
                    "base_model_revision": base.revision,
                    "dataset_sha256": record.sha256 if record else "",
                    "job_id": job.id,
                    "trigger_word": spec.get("trigger_word") or "",
                    "rank": str(hp["rank"]),
                    "alpha": str(hp["alpha"]),
                    "steps": str(hp["steps"]),
                    **figures.to_tags(),
                },
            )
        reporter.event(f"registered {job.tenant_id}.{job.brand} v{version.version}")
        try:
            self._auto_promote(reporter, registry, version)
        except Exception as e:  # noqa: BLE001 - the version stands; promotion can be redone
            log.warning("job %s: gate/auto-promotion failed: %s", job.id, e)
            reporter.jobs.add_event(
                job.id, "the promotion gate could not be checked; promote by hand", level="warning"
            )
        return version.version

    def _evaluate(self, job, base, adapter_dir, dataset, heldout, registry):  # noqa: ANN001, ANN202
        """Base vs. production vs. this adapter on the held-out prompts (`finetune.evaluation`):
        metrics and the grid go to the run; the figures become the version's `eval.*` tags.
        Any error is `EvaluationCrashed`: the job fails and registers nothing."""
        import mlflow

        from finetune.evaluation import eval_prompts, evaluate, infer_brand
        from registry.adapters import PRODUCTION, AdapterNotFound, AdapterRef
        from registry.base_models import SHAPES, load_pipeline, select_device

        s = self.settings
        try:
            production = None
            if job.brand in registry.brands(job.tenant_id):
                with contextlib.suppress(AdapterNotFound):
                    production = registry.resolve(job.tenant_id, AdapterRef(job.brand, PRODUCTION))
            prompts = eval_prompts(
                job.spec.get("eval_prompts"), heldout, s.fine_tune_eval_max_prompts
            )
            if not prompts:
                prompts = [caption for _, caption in dataset[: s.fine_tune_eval_max_prompts]]
            pipe = load_pipeline(base, select_device(s.device))
            with tempfile.TemporaryDirectory() as tmp:
                production_dir = None
                if production is not None:
                    production_dir = Path(tmp)
                    registry.download(production, production_dir)
                result = evaluate(
                    pipe,
                    adapter_dir,
                    production_dir,
                    prompts,
                    heldout,
                    steps=s.fine_tune_eval_steps,
                    size=s.fine_tune_eval_size or base.native_size,
                    guidance_scale=base.default_guidance_scale,
                    loss_draws=s.fine_tune_eval_loss_draws,
                    brand=infer_brand(job.brand, dataset) if base.id == SHAPES else None,
                    production_version=production.version if production else None,
                )
            figures = result.figures
            mlflow.log_metrics(
                {
                    f"eval.{variant}.{name}": value
                    for variant, scores in figures.scores.items()
                    for name, value in scores.items()
                }
            )
            mlflow.log_image(result.grid, "eval/grid-base-production-candidate.png")
            mlflow.log_dict({"prompts": list(prompts)}, "eval/prompts.json")
        except Exception as e:
            raise EvaluationCrashed(f"evaluation failed: {type(e).__name__}: {e}") from e
        against = f"production v{production.version}" if production else "the base model"
        shown = ", ".join(
            f"{variant} {name} {value:.3f}"
            for variant in ("candidate", figures.reference)
            for name, value in figures.scores[variant].items()
        )
        JobReporter(s, job).event(f"evaluated against {against}: {shown}")
        return figures

    def _auto_promote(self, reporter: JobReporter, registry, version) -> None:  # noqa: ANN001
        """Tag the gate decision; with the brand's `auto_promote`, a passing version becomes
        production (`registry.promotion.after_registration`, the alias route's own path)."""
        from registry.promotion import after_registration, default_policy, read_policy

        default = default_policy(self.settings)
        decision, promoted = after_registration(registry, version, default)
        if promoted:
            reporter.event(f"promoted v{version.version} to production (auto_promote)")
        elif read_policy(registry, version.tenant, version.brand, default).auto_promote:
            reporter.event(f"not promoted automatically: {decision.summary()}")

    def _log_validation(self, base, adapter_dir: Path, spec: dict) -> None:  # noqa: ANN001
        """Base vs. adapter, side by side, at fixed seeds, for each validation prompt."""
        import mlflow
        import torch
        from PIL import Image

        from registry.base_models import load_pipeline

        prompts = spec.get("validation_prompts") or []
        if not prompts:
            return
        pipe = load_pipeline(base, "cpu")

        def render(prompt: str, seed: int) -> Image.Image:
            return pipe(
                prompt,
                num_inference_steps=base.default_steps,
                guidance_scale=base.default_guidance_scale,
                generator=torch.Generator("cpu").manual_seed(seed),
            ).images[0]

        before = [render(p, 1000 + i) for i, p in enumerate(prompts)]
        pipe.load_lora_weights(str(adapter_dir))
        after = [render(p, 1000 + i) for i, p in enumerate(prompts)]
        for i, (a, b) in enumerate(zip(before, after, strict=True)):
            pair = Image.new("RGB", (a.width * 2, a.height))
            pair.paste(a, (0, 0))
            pair.paste(b, (a.width, 0))
            mlflow.log_image(pair, f"validation/{i:02d}-base-vs-adapter.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one brandfarm fine-tune job.")
    parser.add_argument("job_id", help="The job's id (ftjob-...), created by the API.")
    parser.add_argument(
        "--worker", action="store_true", help="Run the training itself (the supervisor's child)."
    )
    args = parser.parse_args(argv)
    settings = load_settings()
    try:
        if args.worker:
            return Worker(settings, args.job_id).run()
        return supervise(settings, args.job_id)
    except StorageError as e:
        print(f"object store error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Run the module's own copy, not __main__'s: Ray pickles objects of __main__ classes by value,
    # and JobReporter must travel to Ray Train workers by reference.
    from finetune.job import main as module_main

    sys.exit(module_main())
