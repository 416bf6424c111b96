"""`brandfarm adapters register-webhook` where it cannot register: it says why, names the TTL
fallback, and exits 1. Registration on a real server is tests/e2e (at `up`)."""

from __future__ import annotations

from typer.testing import CliRunner

from cluster.cli import app


def test_register_webhook_without_a_secret_or_a_webhook_api_fails_naming_the_ttl(tmp_path):
    env = {
        "BRANDFARM_STATE_DIR": str(tmp_path / "state"),
        "BRANDFARM_MLFLOW_TRACKING_URI": f"file://{tmp_path / 'mlruns'}",
        "BRANDFARM_ADAPTER_RESOLVE_TTL_S": "7",
    }
    run = CliRunner().invoke
    no_secret = run(app, ["adapters", "register-webhook"], env=env)
    assert no_secret.exit_code == 1 and "no mlflow_webhook_secret" in no_secret.output

    env["BRANDFARM_MLFLOW_WEBHOOK_SECRET"] = "from-the-operator"
    file_store = run(app, ["adapters", "register-webhook"], env=env)
    assert file_store.exit_code == 1, file_store.output
    assert "lists no webhooks" in file_store.output
    assert "adapter_resolve_ttl_s=7s" in file_store.output.replace("\n", "")
