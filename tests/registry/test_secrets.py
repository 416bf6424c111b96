"""Secret settings: one list, a 0600 file for the cluster's processes, none of them in Ray jobs."""

from __future__ import annotations

import json
import os

import pytest
from pydantic import SecretStr

from finetune.launcher import JobLauncher
from registry.settings import SECRET_FIELDS, SECRETS_FILE_ENV, Settings

SECRETS = {
    "s3_access_key": "AKIA-distinctive-access-4711",
    "s3_secret_key": "s3-secret-distinctive-8c1f9e",
    "api_key": "bf-apikey-distinctive-77aa",
    "database_url": "postgresql+psycopg://bf:db-password-distinctive-5d2@db.internal/bf",
    "mlflow_tracking_uri": "http://ml:mlflow-password-distinctive-91@mlflow.internal:5000",
    "mlflow_backend_uri": "postgresql://ml:backend-password-distinctive-3e@db.internal/ml",
    "encryption_keys": "Zm9vLWRpc3RpbmN0aXZlLWZhcm0ta2V5LTYzYTEtMDA=",
    "mlflow_webhook_secret": "webhook-secret-distinctive-0b7",
}
SECRET_VALUES = [
    "AKIA-distinctive-access-4711",
    "s3-secret-distinctive-8c1f9e",
    "bf-apikey-distinctive-77aa",
    "db-password-distinctive-5d2",
    "mlflow-password-distinctive-91",
    "backend-password-distinctive-3e",
    "Zm9vLWRpc3RpbmN0aXZlLWZhcm0ta2V5LTYzYTEtMDA=",
    "webhook-secret-distinctive-0b7",
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("BRANDFARM_") or name == "RAY_ADDRESS":
            monkeypatch.delenv(name)


def farm(tmp_path, **kw) -> Settings:
    return Settings(
        state_dir=tmp_path / "state", s3_endpoint="http://s3.internal:9000", **SECRETS, **kw
    )


def test_every_secret_typed_field_is_listed():
    typed = {
        name
        for name, field in Settings.model_fields.items()
        if SecretStr in getattr(field.annotation, "__args__", (field.annotation,))
    }
    assert typed <= SECRET_FIELDS and set(SECRETS) == SECRET_FIELDS


def test_a_job_rebuilds_the_farm_settings_from_public_env_and_the_file(tmp_path, monkeypatch):
    s = farm(tmp_path, fine_tune_checkpoints_keep=3)
    path = s.write_secrets_file()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    on_disk = json.loads(path.read_text())
    assert "api_key" not in on_disk  # the CLI's tenant key has no business on the cluster
    env = s.public_env()
    assert env[SECRETS_FILE_ENV] == str(path)
    text = json.dumps(env)
    assert not [v for v in SECRET_VALUES if v in text]
    for name, value in env.items():  # what a Ray job's process gets
        monkeypatch.setenv(name, value)
    again = Settings()
    exclude = {"api_key", "secrets_file"}
    assert again.model_dump(exclude=exclude) == s.model_dump(exclude=exclude)
    assert again.s3_secret_key.get_secret_value() == SECRETS["s3_secret_key"]
    # The node's environment wins over the file (KubeRay: secretKeyRef).
    monkeypatch.setenv("BRANDFARM_S3_SECRET_KEY", "from-the-node")
    assert Settings().s3_secret_key.get_secret_value() == "from-the-node"


def test_a_readable_or_foreign_secrets_file_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "secrets.json"
    path.write_text(json.dumps({"s3_secret_key": "x"}))
    path.chmod(0o644)
    monkeypatch.setenv(SECRETS_FILE_ENV, str(path))
    with pytest.raises(PermissionError, match="chmod 600"):
        Settings()
    path.chmod(0o600)
    assert Settings().s3_secret_key.get_secret_value() == "x"
    path.write_text(json.dumps({"api_port": 1234}))
    with pytest.raises(ValueError, match="not secret settings"):
        Settings()
    monkeypatch.setenv(SECRETS_FILE_ENV, str(tmp_path / "absent.json"))
    assert Settings().s3_secret_key is None  # a node that has the secrets in its env instead


def test_a_ray_job_submission_carries_no_secret(tmp_path):
    s = farm(tmp_path, fine_tune_num_gpus=0)
    s.write_secrets_file()
    submission = JobLauncher(s).submission("ftjob-abc", "acme", data_parallel=False)
    text = json.dumps(submission)
    assert not [v for v in SECRET_VALUES if v in text], text
    assert submission["submission_id"] == "ftjob-abc"
    env = submission["runtime_env"]["env_vars"]
    assert not {k.removeprefix("BRANDFARM_").lower() for k in env} & SECRET_FIELDS
