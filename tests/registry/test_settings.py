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
