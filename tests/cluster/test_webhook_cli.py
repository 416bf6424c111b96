"""The operator's webhook commands on the farm database: `brandfarm tenants webhook ...`."""

from __future__ import annotations

from typer.testing import CliRunner

from cluster.cli import app
from registry.db import make_engine
from registry.webhooks import WebhookStore


def test_operator_sets_a_url_and_rotates_a_tenants_secret(tmp_path):
    env = {"BRANDFARM_STATE_DIR": str(tmp_path / "state")}
    run = CliRunner().invoke
    assert run(app, ["tenants", "create", "acme"], env=env).exit_code == 0

    refused = run(app, ["tenants", "webhook", "set-url", "acme", "https://10.0.0.8/h"], env=env)
    assert refused.exit_code == 1 and "private address" in refused.output
    # An IP literal: checked without any lookup, and nothing is sent to it here.
    set_ = run(app, ["tenants", "webhook", "set-url", "acme", "https://93.184.215.14/h"], env=env)
    assert set_.exit_code == 0, set_.output
    first = set_.output.split("store it now):\n")[1].split()[0]
    rotated = run(app, ["tenants", "webhook", "rotate-secret", "acme", "--grace-s", "60"], env=env)
    assert rotated.exit_code == 0, rotated.output
    second = rotated.output.split("store it now):\n")[1].split()[0]

    store = WebhookStore(make_engine(f"sqlite:///{tmp_path / 'state' / 'brandfarm.db'}"))
    assert store.signing_secrets("acme") == [second, first]
    assert store.config("acme").url == "https://93.184.215.14/h"
    missing = run(app, ["tenants", "webhook", "rotate-secret", "nobody"], env=env)
    assert missing.exit_code == 1 and "no tenant" in missing.output
