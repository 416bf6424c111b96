"""`up` refuses an unreachable external service or database before starting anything, naming the
setting to fix (and never echoing a credential)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from cluster.processes import StackError, free_ports
from cluster.stack import LocalStack, database_problem
from registry.settings import Settings


def _settings(tmp_path: Path, **kw: object) -> Settings:
    ports = dict(
        zip(
            Settings.service_port_fields(),
            free_ports(len(Settings.service_port_fields())),
            strict=True,
        )
    )
    return Settings(state_dir=tmp_path / "state", **{**ports, **kw})


def _closed_port() -> int:
    return free_ports(1)[0]  # nothing listens there once the probe socket is closed


def _up_fails(settings: Settings) -> str:
    stack = LocalStack(settings)
    with pytest.raises(StackError) as info:
        stack.up()
    # Nothing was started: no component recorded a process.
    assert not list((settings.state_path / "run").glob("*.json"))
    return str(info.value)


def test_unreachable_external_s3_names_the_setting(tmp_path: Path) -> None:
    message = _up_fails(
        _settings(
            tmp_path,
            s3_endpoint=f"http://127.0.0.1:{_closed_port()}",
            s3_access_key=SecretStr("AKIDEXAMPLE"),
            s3_secret_key=SecretStr("super-secret-value-123"),
        )
    )
    assert "s3_endpoint" in message and "BRANDFARM_S3_ENDPOINT" in message
    assert "super-secret-value-123" not in message


def test_unreachable_external_mlflow_names_the_setting(tmp_path: Path) -> None:
    message = _up_fails(
        _settings(tmp_path, mlflow_tracking_uri=f"http://127.0.0.1:{_closed_port()}")
    )
    assert "mlflow_tracking_uri" in message and "BRANDFARM_MLFLOW_TRACKING_URI" in message


def test_unreachable_ray_cluster_names_the_setting(tmp_path: Path) -> None:
    message = _up_fails(_settings(tmp_path, ray_address=f"127.0.0.1:{_closed_port()}"))
    assert "ray_address" in message and "ray_dashboard_port" in message


def test_unreachable_database_names_the_setting_not_the_password(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://farm:hunter2-secret@127.0.0.1:{_closed_port()}/farm"
    message = _up_fails(_settings(tmp_path, database_url=url))
    assert "database_url" in message and "BRANDFARM_DATABASE_URL" in message
    assert "hunter2-secret" not in message


def test_database_problem_tells_bad_url_from_unreachable(tmp_path: Path) -> None:
    assert database_problem("not a url") == "is not a valid SQLAlchemy URL"
    assert database_problem(f"sqlite:///{tmp_path / 'ok.db'}") is None
    assert database_problem("postgresql+psycopg://root@127.0.0.1:5432/test") is None
    assert "cannot be reached" in database_problem(
        f"postgresql+psycopg://root@127.0.0.1:{_closed_port()}/test"
    )
