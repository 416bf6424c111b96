"""The one settings model: env prefix, config file, Ray address, checks that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from registry.settings import CONFIG_FILE_ENV, Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("RAY_ADDRESS", CONFIG_FILE_ENV):
        monkeypatch.delenv(name, raising=False)


def test_defaults_keep_off_redis_port():
    s = Settings()
    assert s.ray_gcs_port != 6379
    assert s.state_dir == Path(".brandfarm")
    assert s.resolved_database_url.startswith("sqlite:///") and s.resolved_database_url.endswith(
        "brandfarm.db"
    )


def test_env_prefix_and_ray_address_alias(monkeypatch):
    monkeypatch.setenv("BRANDFARM_API_PORT", "28123")
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6380")
    s = Settings()
    assert s.api_port == 28123 and s.api_url.endswith(":28123")
    assert s.ray_address == "10.1.2.3:6380"


def test_config_file_and_env_precedence(monkeypatch, tmp_path):
    cfg = tmp_path / "farm.toml"
    cfg.write_text('num_replicas = 3\nbase_model = "/models/sd15"\nmax_steps = 40\n')
    monkeypatch.setenv(CONFIG_FILE_ENV, str(cfg))
    monkeypatch.setenv("BRANDFARM_MAX_STEPS", "60")
    s = Settings()
    assert s.num_replicas == 3 and s.base_model == "/models/sd15"
    assert s.max_steps == 60  # env wins over the file


def test_missing_config_file_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv(CONFIG_FILE_ENV, str(tmp_path / "nope.toml"))
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        Settings()


def test_bad_values_name_the_field():
    with pytest.raises(ValidationError, match="num_replicas"):
        Settings(num_replicas=0)
    with pytest.raises(ValidationError, match="no_such_knob"):
        Settings(no_such_knob=1)
    with pytest.raises(ValidationError, match="s3_access_key"):
        Settings(s3_endpoint="http://minio:9000")


def test_ports_must_be_distinct_and_outside_rays_worker_range():
    with pytest.raises(ValidationError, match="mlflow_port and api_port are both 28000"):
        Settings(api_port=28000, mlflow_port=28000)
    with pytest.raises(ValidationError, match="worker port range"):
        Settings(api_port=12000)
    assert Settings(api_port=12000, ray_min_worker_port=30000, ray_max_worker_port=39999)


def test_placement_settings_from_env(monkeypatch):
    monkeypatch.setenv("BRANDFARM_GPUS_PER_REPLICA", "2")
    monkeypatch.setenv("BRANDFARM_CPUS_PER_REPLICA", "6")
    monkeypatch.setenv("BRANDFARM_MEMORY_PER_REPLICA_MB", "16384")
    monkeypatch.setenv("BRANDFARM_AUTOSCALE", "true")
    monkeypatch.setenv("BRANDFARM_MAX_REPLICAS", "8")
    s = Settings()
    assert (s.gpus_per_replica, s.cpus_per_replica, s.memory_per_replica_mb) == (2, 6, 16384)
    assert s.autoscale and (s.min_replicas, s.max_replicas) == (1, 8)


@pytest.mark.parametrize("gpus", [0, 0.25, 0.5, 1, 2, 3.0, 8])
def test_gpus_per_replica_is_a_share_of_one_or_whole_gpus(gpus):
    assert Settings(gpus_per_replica=gpus).gpus_per_replica == gpus


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(gpus_per_replica=1.5), "gpus_per_replica=1.5: above 1 a replica takes whole GPUs"),
        (dict(gpus_per_replica=-1), "gpus_per_replica"),
        (
            dict(gpus_per_replica=2, max_replicas_per_node=1),
            "max_replicas_per_node cannot be combined with gpus_per_replica=2",
        ),
        (dict(max_replicas_per_node=0), "max_replicas_per_node"),
        (dict(memory_per_replica_mb=0), "memory_per_replica_mb"),
        (
            dict(autoscale=True, min_replicas=5, max_replicas=2),
            "min_replicas=5 is above max_replicas=2",
        ),
        (
            dict(autoscale=True, target_ongoing_requests=8, max_ongoing_requests=4),
            "target_ongoing_requests=8 is above max_ongoing_requests=4",
        ),
        (
            dict(autoscale=True, autoscale_look_back_s=5, autoscale_metrics_interval_s=5),
            "autoscale_look_back_s=5 must be longer than autoscale_metrics_interval_s=5",
        ),
        (dict(autoscale=True, max_replicas=0), "max_replicas"),
    ],
)
def test_placement_checks_name_the_fields(overrides, message):
    with pytest.raises(ValidationError, match=message):
        Settings(**overrides)


def test_autoscaling_checks_apply_only_when_autoscaling():
    # A fixed-count farm may carry autoscaling values it does not use.
    s = Settings(min_replicas=5, max_replicas=2, max_ongoing_requests=1)
    assert not s.autoscale and s.num_replicas == 1


def test_the_old_replica_resource_names_are_gone():
    with pytest.raises(ValidationError, match="replica_num_gpus"):
        Settings(replica_num_gpus=1)


@pytest.mark.parametrize(
    ("address", "dashboard"),
    [
        (None, "http://127.0.0.1:8265"),
        ("10.1.2.3:6380", "http://10.1.2.3:8265"),
        ("ray://head.internal:10001", "http://head.internal:8265"),
        ("auto", "http://127.0.0.1:8265"),
    ],
)
def test_jobs_and_state_go_to_the_dashboard_of_the_configured_cluster(address, dashboard):
    assert Settings(ray_address=address).ray_dashboard_url == dashboard


def test_placement_settings_survive_the_job_environment(monkeypatch):
    """A fine-tune job rebuilds Settings from `to_env()`, with Ray's RAY_ADDRESS set as well."""
    s = Settings(
        ray_worker_nodes=2,
        ray_worker_gpus=2,
        autoscale=True,
        max_replicas=6,
        gpus_per_replica=2,
        memory_per_replica_mb=4096,
        autoscale_metrics_interval_s=0.5,
        autoscale_look_back_s=2,
    )
    for name, value in s.to_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6380")
    again = Settings()
    assert again.ray_address == "127.0.0.1:6380"
    assert again.model_dump(exclude={"ray_address"}) == s.model_dump(exclude={"ray_address"})
