"""The one settings model: every knob of the farm, read from `BRANDFARM_*` env and a config file.

No other module reads the environment. Components receive a `Settings` object (pickled to Ray
actors as-is), never a bare env lookup.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CONFIG_FILE_ENV = "BRANDFARM_CONFIG_FILE"


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

    # --- model and replicas -------------------------------------------------------------------
    base_model: str = Field(
        "brandfarm-shapes",
        description="Base model: a catalog id, a local diffusers folder, or a hub id.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where replicas render: auto picks CUDA when available."
    )
    num_replicas: int = Field(1, ge=1, le=256, description="Diffusion replicas to run.")
    replica_num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves per replica.")
    replica_num_gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves per replica.")
    max_ongoing_requests: int = Field(
        4, ge=1, le=1024, description="Requests a replica accepts at once (queued inside)."
    )

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
    startup_timeout_s: float = Field(
        180.0, gt=0, description="How long `up` waits for each component to answer."
    )

    @model_validator(mode="after")
    def _external_s3_needs_credentials(self) -> Settings:
        if self.s3_endpoint and (self.s3_access_key is None or self.s3_secret_key is None):
            raise ValueError(
                "s3_endpoint is set, so s3_access_key and s3_secret_key are required "
                "(BRANDFARM_S3_ACCESS_KEY, BRANDFARM_S3_SECRET_KEY)"
            )
        return self

    @model_validator(mode="after")
    def _ports_distinct(self) -> Settings:
        ports = {
            name: getattr(self, name)
            for name in type(self).model_fields
            if name.endswith("_port") and "worker_port" not in name
        }
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

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_FILE_ENV)
        if config_file:
            path = Path(config_file)
            if not path.is_file():
                raise FileNotFoundError(f"{CONFIG_FILE_ENV}={config_file}: no such file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    # --- derived locations (pure functions of the fields above) ------------------------------
    def to_env(self) -> dict[str, str]:
        """These settings as `BRANDFARM_*` variables (secrets included), for a process started
        elsewhere on the cluster (a Ray job) that must run with exactly this farm's settings."""
        env = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            env[f"BRANDFARM_{name.upper()}"] = str(value)
        return env

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
        return f"http://{self.host}:{self.ray_dashboard_port}"


def load_settings(**overrides: object) -> Settings:
    """Read settings from env and config file; keyword overrides win (the CLI's flags)."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


# No process of the farm phones home (MLflow 3 telemetry); Ray workers inherit this from the head.
QUIET_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment for a child process this farm starts: ours plus `extra`."""
    return {**os.environ, **QUIET_ENV, **extra}
