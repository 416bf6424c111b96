"""The embedded MLflow server on a Postgres backend store (where Postgres answers)."""

from __future__ import annotations

import secrets

import mlflow
import pytest
import sqlalchemy as sa

from cluster.stack import LocalStack
from tests.conftest import farm_settings
from tests.registry.conftest import PG_URL

# Starts its own MLflow server on Postgres: tens of seconds, not the fast tier.
pytestmark = pytest.mark.slow


@pytest.fixture
def pg_database():
    name = f"bf_mlflow_{secrets.token_hex(4)}"
    try:
        admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(sa.text(f"CREATE DATABASE {name}"))
    except Exception as e:  # noqa: BLE001 - any connection failure means: skip
        pytest.skip(f"Postgres at {PG_URL} does not answer: {type(e).__name__}")
    yield PG_URL.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as c:
        c.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()


def test_mlflow_server_keeps_runs_and_registry_in_postgres(pg_database, tmp_path):
    stack = LocalStack(farm_settings(tmp_path / "state", mlflow_backend_uri=pg_database))
    try:
        assert stack.start("s3") and stack.start("mlflow")
        uri = stack.resolved_settings().resolved_mlflow_uri
        client = mlflow.MlflowClient(uri)
        exp = client.create_experiment("tenant-pg")
        run = client.create_run(exp)
        client.log_metric(run.info.run_id, "loss", 0.25)
        client.create_registered_model("pg.brand")
        client.set_registered_model_tag("pg.brand", "tenant", "pg")
    finally:
        stack.down()
    # The rows are in Postgres itself, not in a local file.
    engine = sa.create_engine(pg_database)
    with engine.connect() as c:
        assert c.scalar(sa.text("SELECT count(*) FROM runs")) == 1
        assert c.scalar(sa.text("SELECT value FROM metrics WHERE key = 'loss'")) == 0.25
        assert c.scalar(sa.text("SELECT name FROM registered_models")) == "pg.brand"
    engine.dispose()
    assert not (tmp_path / "state" / "mlflow.db").exists()
