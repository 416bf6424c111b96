"""up → render → down → up: every object, tenant and MLflow run is found again; up is idempotent."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import mlflow
import pytest
from typer.testing import CliRunner

from cluster.cli import app
from registry.storage import ObjectStore

pytestmark = pytest.mark.e2e


def test_credentials_file_is_private(farm):
    creds = farm.stack.credentials_file
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    # The embedded store's keys and the farm key that seals tenants' webhook secrets.
    assert set(json.loads(creds.read_text())) == {
        "s3_access_key",
        "s3_secret_key",
        "encryption_keys",
    }
    # The alias webhook's signing secret and the key MLflow seals stored webhook secrets with.
    webhook_keys = farm.stack.webhook_keys_file
    assert stat.S_IMODE(webhook_keys.stat().st_mode) == 0o600
    assert set(json.loads(webhook_keys.read_text())) == {"mlflow_webhook_secret", "encryption_key"}
    # What fine-tune jobs read instead of getting secrets in their Ray runtime env.
    secrets = farm.settings.resolved_secrets_file
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o600
    assert set(json.loads(secrets.read_text())) == {
        "s3_access_key",
        "s3_secret_key",
        "encryption_keys",
        "mlflow_webhook_secret",
    }


def test_cli_status_and_second_up_is_idempotent(farm):
    runner = CliRunner()
    env = farm.cli_env()
    result = runner.invoke(app, ["status"], env=env)
    assert result.exit_code == 0, result.output
    for name in ("s3", "mlflow", "ray", "api"):
        assert name in result.output
    pids = {c.name: c.pid for c in farm.stack.status()}
    again = runner.invoke(app, ["up"], env=env)
    assert again.exit_code == 0, again.output
    assert again.output.count("already running") == 3
    assert {c.name: c.pid for c in farm.stack.status()} == pids


def test_mlflow_runs_without_its_server_job_workers(farm):
    """MLflow 3 starts a job runner and Huey consumers for its GenAI server jobs unless told not
    to: seconds of CPU at every start and ~1.4 GB of memory the farm never uses."""
    import psutil

    pid = farm.stack.component("mlflow").recorded_pid()
    assert pid is not None
    tree = [" ".join(p.cmdline()) for p in psutil.Process(pid).children(recursive=True)]
    assert tree, "the MLflow server's own workers"
    assert not [c for c in tree if "huey" in c or "_job_runner" in c], tree


def test_down_then_up_finds_objects_tenants_and_runs(farm, tmp_path):
    key = farm.new_tenant("persist-co")
    with farm.http(key) as c:
        r = c.post("/images/generations", json={"prompt": "a red circle", "seed": 3})
    assert r.status_code == 200, r.text
    render_id = r.json()["id"]
    obj = f"tenants/persist-co/renders/{render_id}/0.png"
    before = farm.store.get_bytes(obj)

    # An MLflow run with an artifact proxied through the server into the object store.
    mlflow.set_tracking_uri(farm.settings.resolved_mlflow_uri)
    exp = mlflow.set_experiment("persist-co")
    (tmp_path / "note.txt").write_text("kept")
    with mlflow.start_run(experiment_id=exp.experiment_id) as run:
        mlflow.log_metric("loss", 0.5)
        mlflow.log_artifact(str(tmp_path / "note.txt"))

    stopped = farm.stack.down()
    assert set(stopped) == {"s3", "mlflow", "ray"}
    assert not any(c.answers for c in farm.stack.status())
    farm.settings = farm.stack.up()

    assert farm.store.get_bytes(obj) == before
    with farm.http(key) as c:  # the tenant and its key survived
        assert c.get("/models").status_code == 200
    client = mlflow.MlflowClient(farm.settings.resolved_mlflow_uri)
    again = client.get_run(run.info.run_id)
    assert again.data.metrics["loss"] == 0.5
    local = client.download_artifacts(run.info.run_id, "note.txt", str(tmp_path / "dl"))
    assert Path(local).read_text() == "kept"
    # The artifact lives in the farm's own object store (the MLflow bucket), not on local disk.
    mlflow_bucket = ObjectStore(
        farm.settings.resolved_s3_endpoint,
        farm.settings.s3_access_key.get_secret_value(),
        farm.settings.s3_secret_key.get_secret_value(),
        farm.settings.mlflow_artifacts_bucket,
        farm.settings.s3_region,
    )
    assert any(
        o.key.endswith(f"{run.info.run_id}/artifacts/note.txt") for o in mlflow_bucket.list("")
    )
