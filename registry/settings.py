"""The one settings model: every knob of the farm, read from `BRANDFARM_*` env, a 0600 secrets file
and a config file.

No other module reads the environment or the secrets file. Components receive a `Settings` object
(pickled to Ray actors as-is), never a bare env lookup. `SECRET_FIELDS` names the settings that
hold credentials: they never travel in a Ray job's submission (see `public_env`).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CONFIG_FILE_ENV = "BRANDFARM_CONFIG_FILE"
SECRETS_FILE_ENV = "BRANDFARM_SECRETS_FILE"

#: The settings that hold credentials (keys, and URLs that may carry a password). They are never
#: put in a Ray job's runtime env, entrypoint or metadata, nor in a Serve config's `args`: a
#: process on the cluster reads them from its node's environment (KubeRay: `secretKeyRef`) or
#: from the 0600 secrets file that `brandfarm up` writes (`secrets_file`).
SECRET_FIELDS = frozenset(
    {
        "s3_access_key",
        "s3_secret_key",
        "api_key",
        "database_url",
        "mlflow_tracking_uri",
        "mlflow_backend_uri",
        "encryption_keys",
        "mlflow_webhook_secret",
    }
)
#: Secrets no process on the cluster needs: the CLI's own tenant key stays off the secrets file.
CLIENT_ONLY_SECRETS = frozenset({"api_key"})


def _port(default: int, doc: str) -> int:
    return Field(default, ge=1, le=65535, description=doc)


class Settings(BaseSettings):
    """Everything configurable about a farm. Env: `BRANDFARM_<FIELD>`; file: TOML at
    `BRANDFARM_CONFIG_FILE` (keys are the field names); env wins over the file."""

    model_config = SettingsConfigDict(
        env_prefix="BRANDFARM_", extra="forbid", validate_default=True, populate_by_name=True
    )

    # --- where state lives -------------------------------------------------------------------
    state_dir: Path = Field(
        Path(".brandfarm"), description="Folder of the embedded stack's data, logs and PIDs."
    )
    host: str = Field("127.0.0.1", description="Interface the embedded services listen on.")

    # --- ports of the embedded stack ---------------------------------------------------------
    api_port: int = _port(8000, "Port of the HTTP API (Ray Serve's proxy).")
    s3_port: int = _port(9000, "Port of the embedded S3 server (rclone serve s3).")
    mlflow_port: int = _port(5000, "Port of the embedded MLflow tracking/registry server.")
    ray_gcs_port: int = _port(6380, "Ray head's GCS port (not 6379: Redis lives there).")
    ray_dashboard_port: int = _port(8265, "Port of the Ray dashboard.")
    ray_client_port: int = _port(10001, "Port of the Ray client server on the head node.")
    ray_dashboard_agent_port: int = _port(52365, "Port of the Ray dashboard agent's HTTP server.")
    ray_metrics_export_port: int = _port(
        8090, "Port where the Ray head exports Prometheus metrics (Ray's and the farm's)."
    )
    ray_min_worker_port: int = _port(10002, "Lowest port Ray gives to worker processes.")
    ray_max_worker_port: int = _port(19999, "Highest port Ray gives to worker processes.")
    ray_num_cpus: int | None = Field(
        None, ge=1, description="CPUs the embedded Ray head declares (default: all)."
    )
    ray_object_store_mb: int = Field(
        256, ge=80, description="Object store memory of the embedded Ray head, in MiB."
    )
    ray_address: str | None = Field(
        None,
        validation_alias=AliasChoices("BRANDFARM_RAY_ADDRESS", "RAY_ADDRESS", "ray_address"),
        description="Address of an existing Ray cluster; unset starts a local head node.",
    )

    # --- object storage ----------------------------------------------------------------------
    s3_endpoint: str | None = Field(
        None, description="External S3/MinIO endpoint URL; unset runs the embedded server."
    )
    s3_public_endpoint: str | None = Field(
        None, description="Endpoint URL put into presigned URLs (default: s3_endpoint)."
    )
    s3_access_key: SecretStr | None = Field(None, description="S3 access key (external S3).")
    s3_secret_key: SecretStr | None = Field(None, description="S3 secret key (external S3).")
    s3_region: str = Field("us-east-1", description="S3 region used for request signing.")
    s3_bucket: str = Field(
        "brandfarm", min_length=3, max_length=63, description="Bucket of tenant objects."
    )
    mlflow_artifacts_bucket: str = Field(
        "mlflow", min_length=3, max_length=63, description="Bucket MLflow proxies artifacts to."
    )
    presign_expiry_s: int = Field(
        3600, ge=60, le=7 * 24 * 3600, description="Lifetime of presigned render URLs, seconds."
    )

    # --- MLflow and SQL -----------------------------------------------------------------------
    mlflow_tracking_uri: str | None = Field(
        None, description="External MLflow server URI; unset runs the embedded server."
    )
    mlflow_backend_uri: str | None = Field(
        None, description="Backend store of the embedded MLflow server (default: SQLite in state)."
    )
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of tenants/keys/usage (default: SQLite in state)."
    )
    encryption_keys: SecretStr | None = Field(
        None,
        description="Comma-separated Fernet keys that encrypt tenants' webhook signing secrets "
        "in the farm database, newest first: the first encrypts, each decrypts. Rotate: put a "
        "new key first, restart, run `brandfarm tenants webhook reseal-secrets`, drop the old "
        "key. Unset on an embedded farm: `brandfarm up` creates one (credentials.json).",
    )

    # --- model and replicas -------------------------------------------------------------------
    base_model: str = Field(
        "brandfarm-shapes",
        description="Base model: a catalog id, a local diffusers folder, or a hub id.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where replicas render: auto picks CUDA when available."
    )
    num_replicas: int = Field(
        1, ge=1, le=256, description="Diffusion replicas to run (a fixed count; see autoscale)."
    )
    autoscale: bool = Field(
        False,
        description="Let Serve vary the replica count with load, between min_replicas and "
        "max_replicas (num_replicas is then unused).",
    )
    min_replicas: int = Field(
        1, ge=0, le=256, description="Fewest replicas when autoscaling (0 allows scale to zero)."
    )
    max_replicas: int = Field(4, ge=1, le=256, description="Most replicas when autoscaling.")
    target_ongoing_requests: float = Field(
        2.0, gt=0, description="Requests per replica (running + queued) autoscaling aims at."
    )
    autoscale_upscale_delay_s: float = Field(
        30.0, ge=0, description="How long load must stay above target before replicas are added."
    )
    autoscale_downscale_delay_s: float = Field(
        600.0, ge=0, description="How long load must stay below target before replicas go."
    )
    autoscale_look_back_s: float = Field(
        30.0, gt=0, description="Window over which replica load is averaged for autoscaling."
    )
    autoscale_metrics_interval_s: float = Field(
        10.0, gt=0, description="How often handles and replicas report load to the autoscaler."
    )
    cpus_per_replica: float = Field(1.0, ge=0, description="CPUs Ray reserves per replica.")
    gpus_per_replica: float = Field(
        0.0,
        ge=0,
        le=64,
        description="GPUs per replica: 0 (CPU), a fraction to share one GPU, or k whole GPUs on "
        "one node (k > 1: placement group, STRICT_PACK).",
    )
    memory_per_replica_mb: int | None = Field(
        None, ge=1, description="Host memory Ray reserves per replica, MiB (unset: none)."
    )
    max_replicas_per_node: int | None = Field(
        None,
        ge=1,
        le=100,
        description="Hard cap of replicas on one node (1: every replica on its own node). "
        "Unset: Serve still spreads replicas over nodes, as a preference.",
    )
    max_ongoing_requests: int = Field(
        16,
        ge=1,
        le=1024,
        description="Requests a replica accepts at once: its in-replica queue, from which it "
        "batches (beyond it, requests wait at the ingress).",
    )
    max_queued_requests: int | None = Field(
        None,
        ge=1,
        description="Requests that may wait at the ingress for a replica with room; past it the "
        "API answers 503 `overloaded` with Retry-After (unset: no limit).",
    )
    # Local worker nodes: `up` can start Ray worker nodes beside the embedded head, each with its
    # own declared resources, to run (and test) multi-node placement on one machine. Unused with
    # ray_address: that cluster has its own nodes (`up` refuses --workers with --address).
    ray_worker_nodes: int = Field(
        0, ge=0, le=16, description="Ray worker nodes `up` starts beside the embedded head."
    )
    ray_worker_gpus: int = Field(
        0, ge=0, le=64, description="GPUs each local worker node declares to Ray."
    )
    ray_worker_cpus: int = Field(2, ge=1, description="CPUs each local worker node declares.")

    # --- request limits -----------------------------------------------------------------------
    max_prompt_chars: int = Field(1000, ge=1, description="Longest prompt, in characters.")
    max_images_per_request: int = Field(4, ge=1, le=16, description="Upper bound of `n`.")
    max_steps: int = Field(100, ge=1, le=1000, description="Upper bound of `steps`.")
    max_guidance_scale: float = Field(30.0, gt=0, description="Upper bound of `guidance_scale`.")
    max_image_side: int = Field(
        1024, ge=8, description="Largest width or height, before the model's own limit."
    )
    max_request_bytes: int = Field(
        64 * 1024, ge=1024, description="Largest JSON request body, in bytes (413 above)."
    )
    max_inflight_per_tenant: int = Field(
        8, ge=1, description="Renders one tenant may have in flight at once (429 above)."
    )
    ingress_max_ongoing_requests: int = Field(
        256,
        ge=2,
        le=100_000,
        description="Requests the API ingress admits at once (Serve's max_ongoing_requests); "
        "must exceed max_inflight_per_tenant, or bursts queue at the proxy instead of getting 429.",
    )

    # --- timeouts and isolation ---------------------------------------------------------------
    request_timeout_s: float = Field(
        300.0, gt=0, le=3600, description="Serve's end-to-end HTTP request timeout, seconds."
    )
    mlflow_request_timeout_s: int = Field(
        5, ge=1, le=600, description="Timeout of each MLflow HTTP call the API makes, seconds."
    )
    mlflow_max_retries: int = Field(
        1, ge=0, le=10, description="Retries of a failed MLflow call on the request path."
    )
    s3_connect_timeout_s: float = Field(
        5.0, gt=0, le=300, description="Timeout to connect to the S3 endpoint, seconds."
    )
    s3_read_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="Timeout of each S3 read (between bytes), seconds."
    )
    s3_max_retries: int = Field(
        2, ge=0, le=10, description="Retries of an S3 call on connection errors and 500/502-504."
    )
    registry_io_threads: int = Field(
        8, ge=1, le=256, description="Ingress threads for MLflow registry calls (own pool)."
    )
    storage_io_threads: int = Field(
        16, ge=1, le=256, description="Ingress threads for object-store calls (own pool)."
    )
    db_io_threads: int = Field(
        8, ge=1, le=256, description="Ingress threads for database calls (own pool)."
    )
    # --- brand adapters at render time (hot-swap) ---------------------------------------------
    adapter_resolve_ttl_s: float = Field(
        2.0,
        ge=0,
        le=300,
        description="How long the ingress reuses an alias→version lookup (0: ask MLflow always).",
    )
    adapter_stale_serve_s: float = Field(
        600.0,
        ge=0,
        le=86400,
        description="While MLflow is unreachable, how long after its lookup an alias's last "
        "answer may still serve renders (0: never; the render gets 503).",
    )
    alias_webhook: bool = Field(
        True,
        description="Register an MLflow registry webhook for alias events at `up`, so a "
        "promotion or rollback reaches every ingress at once; off (or where MLflow refuses it) "
        "alias answers last adapter_resolve_ttl_s.",
    )
    alias_webhook_url: str | None = Field(
        None,
        description="URL MLflow posts alias events to (default: <api_url>"
        "/internal/mlflow/alias-events; it must reach an ingress).",
    )
    mlflow_webhook_secret: SecretStr | None = Field(
        None,
        description="HMAC secret MLflow signs alias-event webhooks with (generated by `up`).",
    )
    alias_event_poll_s: float = Field(
        0.1,
        ge=0.01,
        le=5,
        description="How often each ingress reads the farm database for alias changes another "
        "ingress learned of (the webhook reaches only one).",
    )
    max_adapters_per_replica: int = Field(
        4, ge=1, le=256, description="Adapters a replica keeps loaded in its pipeline at once."
    )
    adapter_host_cache_mb: int = Field(
        512, ge=1, description="Host-RAM budget per replica for parsed adapter weights, in MiB."
    )
    max_adapter_scale: float = Field(
        2.0, gt=0, le=100, description="Upper bound of `adapter_scale` (0 renders the base model)."
    )
    max_adapters_per_request: int = Field(
        3,
        ge=1,
        le=256,
        description="Adapters one render may combine (`adapters` list); at most "
        "max_adapters_per_replica, since every one of them takes a pipeline slot (left unset, "
        "it is lowered to max_adapters_per_replica when that is below 3).",
    )
    # --- batched rendering (continuous batching in each replica) ------------------------------
    max_batch_images: int = Field(
        8,
        ge=1,
        le=64,
        description="Images one replica denoises together, from any requests and brands; new "
        "ones join at the next step (1: one image at a time).",
    )
    batch_wait_ms: float = Field(
        5.0,
        ge=0,
        le=1000,
        description="How long an idle replica waits for more images before starting a batch.",
    )
    exact_batch_pixels: bool = Field(
        True,
        description="Compute every batched denoising step batch-invariantly, so an image's "
        "pixels never depend on its batch-mates (CPU kernels round by shape; "
        "serve/engine/invariant.py). Off: plain products, whose last bits may depend on the "
        "batch.",
    )
    render_timeout_s: float | None = Field(
        None,
        gt=0,
        description="Longest a render may spend in a replica, queue included; past it its "
        "images leave the batch and the API answers 503 `render_timeout` (unset: no limit).",
    )
    # --- fine-tune dataset limits (uploads are zips of images + captions) --------------------
    dataset_max_upload_bytes: int = Field(
        200 * 1024 * 1024, ge=1024, description="Largest dataset upload, in bytes (413 above)."
    )
    dataset_max_uncompressed_bytes: int = Field(
        1024 * 1024 * 1024, ge=1024, description="Largest total uncompressed size of a dataset zip."
    )
    dataset_max_entries: int = Field(10_000, ge=2, description="Most entries in a dataset zip.")
    dataset_min_images: int = Field(4, ge=1, description="Fewest images a dataset may hold.")
    dataset_max_images: int = Field(2_000, ge=1, description="Most images a dataset may hold.")
    dataset_min_image_side: int = Field(32, ge=1, description="Smallest image width/height.")
    dataset_max_image_side: int = Field(4096, ge=1, description="Largest image width/height.")
    dataset_max_caption_chars: int = Field(1000, ge=1, description="Longest caption.")
    api_key: SecretStr | None = Field(
        None, description="A tenant's API key, for the CLI's tenant commands (finetune, adapters)."
    )

    # --- fine-tune jobs ----------------------------------------------------------------------
    fine_tune_max_steps: int = Field(5000, ge=1, description="Upper bound of a job's `steps`.")
    fine_tune_checkpoint_every: int = Field(
        50, ge=1, description="Steps between checkpoints (LoRA, optimizer, RNG) in the store."
    )
    fine_tune_max_attempts: int = Field(
        3, ge=1, le=20, description="Training processes a job may start (retries after a death)."
    )
    fine_tune_num_cpus: float = Field(1.0, ge=0, description="CPUs a fine-tune job reserves.")
    fine_tune_max_workers: int = Field(
        8, ge=1, le=256, description="Most Ray Train workers one job may ask for (data parallel)."
    )
    fine_tune_cpus_per_worker: float = Field(
        1.0, gt=0, description="CPUs each Ray Train worker of a data-parallel job reserves."
    )
    fine_tune_num_gpus: float | None = Field(
        None, ge=0, description="GPUs a job reserves; unset: 1 when the cluster has GPUs, else 0."
    )
    fine_tune_checkpoints_keep: int = Field(
        2, ge=1, le=100, description="Newest checkpoints a running job keeps (older are deleted)."
    )
    # Evaluation after every fine-tune (`finetune.evaluation`): every job pays for it, so the
    # defaults are small. Held-out images are never trained on.
    fine_tune_eval_heldout_images: int = Field(
        4,
        ge=0,
        le=64,
        description="Images held out of training for evaluation (at most a quarter of the "
        "dataset); their captions are the prompts when the job gives no eval_prompts.",
    )
    fine_tune_eval_max_prompts: int = Field(
        8, ge=1, le=64, description="Most prompts an evaluation renders (and a job's eval_prompts)."
    )
    fine_tune_eval_steps: int = Field(
        20, ge=1, le=200, description="Denoising steps of each evaluation render."
    )
    fine_tune_eval_size: int | None = Field(
        None, ge=8, le=2048, description="Side of evaluation renders; unset: the model's native."
    )
    fine_tune_eval_loss_draws: int = Field(
        8,
        ge=1,
        le=256,
        description="Fixed (timestep, noise) draws per held-out image of heldout_denoise_loss.",
    )
    # The promotion gate's defaults, for brands without a policy (`registry/promotion.py`).
    promotion_min_improvement: float = Field(
        0.10,
        ge=-1.0,
        le=1.0,
        description="Default least improvement over production (or the base model) a version "
        "needs to become production: brand_score gain on the built-in model, else the relative "
        "drop of heldout_denoise_loss.",
    )
    promotion_max_adherence_drop: float = Field(
        0.10, ge=0.0, le=1.0, description="Default largest allowed drop in prompt adherence."
    )
    job_reconcile_interval_s: float = Field(
        15.0, gt=0, le=3600, description="Seconds between the ingress's job-vs-Ray-job checks."
    )
    ray_request_timeout_s: float = Field(
        10.0, gt=0, le=300, description="Timeout of one call to Ray's job API (submit, list, stop)."
    )
    secrets_file: Path | None = Field(
        None,
        description="0600 JSON file of the secret settings that Ray jobs read "
        "(default: <state_dir>/secrets.json, written by `up`).",
    )
    startup_timeout_s: float = Field(
        180.0, gt=0, description="How long `up` waits for each component to answer."
    )

    # --- tenant limits and retention ----------------------------------------------------------
    # Farm-wide defaults; `brandfarm tenants set-limits` stores per-tenant overrides in SQL.
    # Job caps answer 429 (they clear as jobs end); the storage cap answers 403 (a plan limit:
    # it clears only when the tenant deletes files or renders expire).
    max_concurrent_fine_tunes_per_tenant: int | None = Field(
        None,
        ge=0,
        description="Unfinished fine-tune jobs (queued or running) one tenant may have; a new "
        "job above it gets 429. Unset: no cap.",
    )
    max_queued_jobs_per_tenant: int | None = Field(
        None,
        ge=0,
        description="Fine-tune jobs one tenant may have waiting to start (queued); a new job "
        "above it gets 429. Unset: no cap.",
    )
    max_stored_bytes_per_tenant: int | None = Field(
        None,
        ge=0,
        description="Bytes one tenant may keep in the object store under tenants/<tenant>/ "
        "(uploads, checkpoints, renders); uploads, jobs and renders above it get 403. Unset: "
        "no cap.",
    )
    stored_bytes_cache_ttl_s: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="How long the ingress reuses a tenant's stored-bytes total (a listing of "
        "its prefix) before listing again; its own writes are added in between.",
    )
    render_retention_days: float | None = Field(
        None,
        gt=0,
        description="Renders older than this many days are deleted from the object store (the "
        "usage row stays, marked expired). Unset: renders are kept forever.",
    )
    render_retention_sweep_interval_s: float = Field(
        3600.0,
        ge=1,
        description="How often the ingress deletes expired renders, finished render tasks and "
        "finished webhook deliveries.",
    )
    render_task_retention_days: float | None = Field(
        30.0,
        gt=0,
        description="Finished async renders (succeeded, failed, cancelled, their event sent) "
        "older than this many days are deleted from the render queue's table (GET "
        "/v1/renders/{id} then answers 404; the usage row and the images stay, see "
        "render_retention_days). Unset: kept forever. Swept with the render retention.",
    )
    webhook_delivery_retention_days: float | None = Field(
        30.0,
        gt=0,
        description="Webhook deliveries no longer pending (succeeded, failed for good, never "
        "sent) older than this many days are deleted with their attempts and event (they can "
        "no longer be listed or replayed). Unset: kept forever. Swept with the render "
        "retention.",
    )
    retention_batch_rows: int = Field(
        500,
        ge=1,
        le=100_000,
        description="Rows one retention transaction deletes (short transactions: the queue's "
        "dispatchers write the same tables).",
    )
    # --- async renders: the durable render queue (POST /v1/renders) ------------------------
    render_queue_concurrency: int = Field(
        16,
        ge=1,
        le=1024,
        description="Renders each ingress replica's dispatcher keeps in flight on the render "
        "replicas, synchronous and async together (at least the replicas' batch capacity, "
        "max_batch_images x replicas, or batches run below it).",
    )
    render_queue_lease_s: float = Field(
        30.0,
        ge=1,
        description="How long a dispatcher holds a render without renewing its lease; a render "
        "whose ingress replica died is queued again this long after.",
    )
    render_max_attempts: int = Field(
        3, ge=1, le=100, description="Attempts of a render (lost replicas) before it fails."
    )
    render_queue_poll_s: float = Field(
        0.2, gt=0, le=10, description="How often an idle dispatcher looks for queued renders."
    )
    max_queued_renders_per_tenant: int = Field(
        200,
        ge=0,
        description="Unfinished async renders a tenant may have; more answer 429. A tenant's "
        "render plan (`brandfarm renders plan`) can override it.",
    )
    render_default_plan: Literal["fast", "relax"] = Field(
        "fast",
        description="Render plan of tenants without one: `fast` allows the fast and relax "
        "tiers, `relax` only relax.",
    )

    # --- content policy -----------------------------------------------------------------------
    # Tenants set their own (`PUT /v1/moderation/policy`); the farm's applies on top of every
    # tenant's. A malformed file stops the settings from loading, naming the file and the rule.
    content_policy_file: Path | None = Field(
        None,
        description="The farm-wide content policy (JSON: blocked_terms, blocked_patterns, "
        "protected_marks, sensitive_terms); unset: none beyond the tenants' own.",
    )
    content_policy_cache_ttl_s: float = Field(
        2.0,
        ge=0,
        le=300,
        description="How long an ingress reuses a tenant's policy before reading it again "
        "(another ingress replica's change shows within it).",
    )

    @model_validator(mode="after")
    def _content_policy_file_is_valid(self) -> Settings:
        if self.content_policy_file is not None:
            from registry.content_policy import load_policy_file

            load_policy_file(self.content_policy_file)  # PolicyError names the file and rule
        return self

    # --- webhooks (signed event deliveries to tenants' endpoints) -----------------------------
    webhook_allow_hosts: list[str] = Field(
        [],
        description="Hosts a webhook_url may name although they resolve to a loopback, private "
        "or link-local address, or use plain http (e.g. an in-cluster receiver; tests).",
    )
    webhook_retry_schedule_s: list[Annotated[float, Field(ge=0, le=7 * 86400)]] = Field(
        [10, 30, 90, 270, 810, 2430],
        min_length=1,
        max_length=50,
        description="Waits before each retry of a failed delivery, seconds (exponential by "
        "default: 6 retries over about an hour); after the last, the delivery is failed.",
    )
    webhook_timeout_s: float = Field(
        10.0, gt=0, le=120, description="Timeout of one delivery attempt (connect and read)."
    )
    webhook_disable_after_failures: int = Field(
        5,
        ge=1,
        le=10_000,
        description="Consecutive failed deliveries (every retry spent) after which an endpoint "
        "is disabled; setting the URL again re-enables it.",
    )
    webhook_secret_grace_s: float = Field(
        86400.0,
        ge=0,
        le=30 * 86400,
        description="After a secret rotation, how long deliveries are also signed with the "
        "previous secret (Standard Webhooks allows several signatures).",
    )
    webhook_poll_interval_s: float = Field(
        1.0, gt=0, le=60, description="How often the ingress looks for due deliveries."
    )
    webhook_lease_s: float = Field(
        120.0,
        gt=0,
        le=3600,
        description="How long an ingress replica holds a claimed delivery before another may "
        "take it over (must exceed webhook_timeout_s).",
    )

    @model_validator(mode="after")
    def _webhook_lease_outlasts_an_attempt(self) -> Settings:
        if self.webhook_lease_s <= self.webhook_timeout_s:
            raise ValueError(
                f"webhook_lease_s={self.webhook_lease_s:g} must exceed webhook_timeout_s="
                f"{self.webhook_timeout_s:g}: otherwise another replica may take over a delivery "
                "still being attempted and send it twice"
            )
        return self

    # --- cluster-wide limits (several ingress replicas) -------------------------------------
    # In-flight renders and hourly quotas are leased rows in the farm database
    # (registry.render_limits), so they hold however many ingress replicas serve the API.
    ingress_replicas: int = Field(
        1,
        ge=1,
        le=64,
        description="API ingress replicas (Serve deployment `Ingress`); limits hold across them.",
    )
    render_lease_s: float = Field(
        60.0,
        ge=3,
        le=3600,
        description="Lease of a render's in-flight slot and quota reservation; the ingress "
        "renews it every third of it, so a crashed ingress's hold lapses within one lease.",
    )

    # --- provenance: C2PA signing and the invisible watermark (serve/provenance.py) ----------
    provenance_signing_cert: Path | None = Field(
        None,
        description="PEM certificate chain (signer first) that signs every output's C2PA "
        "manifest. Unset: the farm CA and signer that `brandfarm up` creates in "
        "<state_dir>/provenance/.",
    )
    provenance_signing_key: Path | None = Field(
        None,
        description="PEM private key (EC P-256, ES256) of provenance_signing_cert. A file path, "
        "never the key itself: the ingress reads it on its node.",
    )
    provenance_signer_factory: str | None = Field(
        None,
        description="`module:function` returning a `serve.signing.SigningIdentity` (a "
        "certificate chain and a sign callback, e.g. a KMS call); replaces the key file.",
    )
    provenance_trust_anchors: Path | None = Field(
        None,
        description="PEM CA certificates that verification trusts. Unset: the farm CA, or the "
        "last certificate of provenance_signing_cert.",
    )
    provenance_hide_adapter_tenants: str = Field(
        "",
        description="Comma-separated tenant ids whose manifests leave out the adapter "
        "(brand:version) they used.",
    )

    # --- adapter version housekeeping (archive, retention of archived weights) -----------------
    adapter_archive_retention_days: float | None = Field(
        30.0,
        gt=0,
        description="Archived adapter versions (DELETE /v1/adapters/{brand}/versions/{v}) keep "
        "their weights in the object store this many days; `brandfarm adapters expire-archived` "
        "deletes them after that (the version and its lineage stay). Unset: kept forever.",
    )

    # --- image edits (edits, variations, operations on stored renders, interpolations) -------
    edit_max_image_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        description="Largest image or mask an edit may upload, in bytes (OpenAI's is 4 MB).",
    )
    edit_max_image_pixels: int = Field(
        4 * 1024 * 1024,
        ge=64,
        le=64 * 1024 * 1024,
        description="Largest image or mask an edit may upload, in pixels (width x height), "
        "checked on the header before decoding (a decompression bomb is refused unread).",
    )

    @model_validator(mode="after")
    def _external_s3_needs_credentials(self) -> Settings:
        if self.s3_endpoint and (self.s3_access_key is None or self.s3_secret_key is None):
            raise ValueError(
                "s3_endpoint is set, so s3_access_key and s3_secret_key are required "
                "(BRANDFARM_S3_ACCESS_KEY, BRANDFARM_S3_SECRET_KEY)"
            )
        return self

    @classmethod
    def service_port_fields(cls) -> tuple[str, ...]:
        """The fields naming a port a service listens on (not Ray's worker port range)."""
        names = cls.model_fields
        return tuple(n for n in names if n.endswith("_port") and "worker_port" not in n)

    @model_validator(mode="after")
    def _ports_distinct(self) -> Settings:
        ports = {name: getattr(self, name) for name in self.service_port_fields()}
        seen: dict[int, str] = {}
        for name, port in ports.items():
            if port in seen:
                raise ValueError(f"{name} and {seen[port]} are both {port}; give each its own port")
            seen[port] = name
            if self.ray_min_worker_port <= port <= self.ray_max_worker_port:
                raise ValueError(
                    f"{name}={port} lies in Ray's worker port range "
                    f"{self.ray_min_worker_port}-{self.ray_max_worker_port} "
                    "(ray_min_worker_port / ray_max_worker_port); move one of them"
                )
        return self

    @model_validator(mode="after")
    def _request_adapters_fit_a_replica(self) -> Settings:
        if self.max_adapters_per_request <= self.max_adapters_per_replica:
            return self
        if "max_adapters_per_request" not in self.model_fields_set:  # the default: fit it
            self.max_adapters_per_request = self.max_adapters_per_replica
        else:
            raise ValueError(
                f"max_adapters_per_request={self.max_adapters_per_request} is above "
                f"max_adapters_per_replica={self.max_adapters_per_replica}: a render's adapters "
                "must all fit in one replica's pipeline slots; lower the first or raise the second"
            )
        return self

    @model_validator(mode="after")
    def _ingress_admits_more_than_a_tenant(self) -> Settings:
        if self.ingress_max_ongoing_requests <= self.max_inflight_per_tenant:
            raise ValueError(
                f"ingress_max_ongoing_requests={self.ingress_max_ongoing_requests} must be above "
                f"max_inflight_per_tenant={self.max_inflight_per_tenant}: otherwise a tenant's "
                "burst queues at the proxy and never gets its 429; raise it"
            )
        return self

    @model_validator(mode="after")
    def _replica_placement_consistent(self) -> Settings:
        if self.autoscale:
            self._check_autoscaling()
        gpus = self.gpus_per_replica
        if gpus > 1 and not gpus.is_integer():
            raise ValueError(
                f"gpus_per_replica={gpus}: above 1 a replica takes whole GPUs (2, 3, ...); "
                "a fraction below 1 shares one GPU between replicas"
            )
        if gpus > 1 and self.max_replicas_per_node is not None:
            raise ValueError(
                f"max_replicas_per_node cannot be combined with gpus_per_replica={gpus:g}: a "
                "multi-GPU replica is placed by its own placement group, which Ray Serve does "
                "not let max_replicas_per_node constrain; unset one of them"
            )
        return self

    def _check_autoscaling(self) -> None:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas={self.min_replicas} is above max_replicas={self.max_replicas}; "
                "raise max_replicas or lower min_replicas"
            )
        if self.target_ongoing_requests > self.max_ongoing_requests:
            raise ValueError(
                f"target_ongoing_requests={self.target_ongoing_requests:g} is above "
                f"max_ongoing_requests={self.max_ongoing_requests}: a replica never holds that "
                "many, so autoscaling would never add one; lower it or raise max_ongoing_requests"
            )
        if self.autoscale_look_back_s <= self.autoscale_metrics_interval_s:
            raise ValueError(
                f"autoscale_look_back_s={self.autoscale_look_back_s:g} must be longer than "
                f"autoscale_metrics_interval_s={self.autoscale_metrics_interval_s:g} "
                "(the window must hold more than one load report)"
            )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [
            init_settings,
            env_settings,
            SecretsFileSource(settings_cls, init_settings),
        ]
        config_file = os.environ.get(CONFIG_FILE_ENV)
        if config_file:
            path = Path(config_file)
            if not path.is_file():
                raise FileNotFoundError(f"{CONFIG_FILE_ENV}={config_file}: no such file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    # --- derived locations (pure functions of the fields above) ------------------------------
    def to_env(self) -> dict[str, str]:
        """These settings as `BRANDFARM_*` variables, secrets included: for a child process
        this machine starts itself (the CLI, tests). Never for Ray: see `public_env`."""
        env = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, list):
                value = json.dumps(value)  # what pydantic-settings parses a list from
            env[f"BRANDFARM_{name.upper()}"] = str(value)
        return env

    def public_env(self) -> dict[str, str]:
        """`to_env()` without `SECRET_FIELDS`, plus where the secrets file is when it exists: what
        a Ray job's runtime env may carry (Ray shows it on its dashboard and in `ray job list`)."""
        env = {
            k: v
            for k, v in self.to_env().items()
            if k.removeprefix("BRANDFARM_").lower() not in SECRET_FIELDS
        }
        if self.resolved_secrets_file.is_file():
            env[SECRETS_FILE_ENV] = str(self.resolved_secrets_file)
        return env

    def secret_values(self) -> dict[str, str]:
        """The set `SECRET_FIELDS`, as plain strings (what must never show up in Ray)."""
        out = {}
        for name in sorted(SECRET_FIELDS):
            value = getattr(self, name)
            if value is not None:
                out[name] = value.get_secret_value() if isinstance(value, SecretStr) else value
        return out

    def write_secrets_file(self) -> Path:
        """Write the secrets the cluster's processes need to `resolved_secrets_file`, mode 0600
        from the first byte (replaced atomically), and return its path."""
        path = self.resolved_secrets_file
        path.parent.mkdir(parents=True, exist_ok=True)
        values = {k: v for k, v in self.secret_values().items() if k not in CLIENT_ONLY_SECRETS}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(values, f)
        os.replace(tmp, path)
        return path

    @property
    def resolved_secrets_file(self) -> Path:
        return (self.secrets_file or self.state_path / "secrets.json").expanduser().resolve()

    def mlflow_client_env(self) -> dict[str, str]:
        """MLflow's client reads its HTTP timeout and retries from the environment only."""
        return {
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(self.mlflow_request_timeout_s),
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(self.mlflow_max_retries),
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        }

    @property
    def state_path(self) -> Path:
        return self.state_dir.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.state_path / 'brandfarm.db'}"

    @property
    def resolved_mlflow_backend_uri(self) -> str:
        return self.mlflow_backend_uri or f"sqlite:///{self.state_path / 'mlflow.db'}"

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.api_port}"

    @property
    def resolved_mlflow_uri(self) -> str:
        return self.mlflow_tracking_uri or f"http://{self.host}:{self.mlflow_port}"

    @property
    def resolved_s3_endpoint(self) -> str:
        return self.s3_endpoint or f"http://{self.host}:{self.s3_port}"

    @property
    def ray_dashboard_url(self) -> str:
        """The Ray dashboard (jobs, state API): on the host of `ray_address` when one is set."""
        host = self.host
        if self.ray_address and self.ray_address not in ("auto", "local"):
            address = self.ray_address if "://" in self.ray_address else f"//{self.ray_address}"
            host = urlsplit(address).hostname or host
        return f"http://{host}:{self.ray_dashboard_port}"


class SecretsFileSource(PydanticBaseSettingsSource):
    """The secret settings from the 0600 JSON file named by `secrets_file` (a keyword argument)
    or `BRANDFARM_SECRETS_FILE`; below env, above the config file. A missing file gives nothing
    (on a node whose environment holds the secrets); a file others can read is refused."""

    def __init__(
        self, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource
    ) -> None:
        super().__init__(settings_cls)
        self._init = init_settings

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads the whole file at once

    def __call__(self) -> dict[str, Any]:
        named = self._init().get("secrets_file") or os.environ.get(SECRETS_FILE_ENV)
        if not named:
            return {}
        path = Path(named).expanduser()
        if not path.is_file():
            return {}
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise PermissionError(
                f"secrets file {path} has mode {mode:o}; it holds credentials: chmod 600 it"
            )
        values = json.loads(path.read_text())
        unknown = set(values) - SECRET_FIELDS
        if unknown:
            raise ValueError(
                f"secrets file {path} holds {sorted(unknown)}, which are not secret settings "
                f"({sorted(SECRET_FIELDS)}); put other settings in env or the config file"
            )
        return values


def load_settings(**overrides: object) -> Settings:
    """Read settings from env and config file; keyword overrides win (the CLI's flags)."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


# No process of the farm phones home (MLflow 3 telemetry); Ray workers inherit this from the head.
QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


def apply_mlflow_client_limits(settings: Settings) -> None:
    """Bound this process's MLflow calls (`mlflow_request_timeout_s`, `mlflow_max_retries`).
    For the API's process: MLflow's defaults retry a failing call for minutes. Fine-tune jobs
    keep MLflow's patient defaults for their long uploads."""
    os.environ.update(settings.mlflow_client_env())


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment for a child process this farm starts: ours plus `extra`."""
    return {**os.environ, **QUIET_ENV, **extra}
