"""The webhook commands: the operator's on the farm database (`brandfarm tenants webhook ...`)
and the tenant's over HTTP (`brandfarm webhooks ...`, against the API under uvicorn)."""

from __future__ import annotations

import threading

import pytest
import uvicorn
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from cluster.cli import app
from cluster.processes import free_ports
from cluster.stack import LocalStack
from registry.db import make_engine
from registry.secret_box import SecretBox, SecretKeyError, new_key
from registry.settings import Settings
from registry.webhooks import WebhookStore, WebhookTenantRow
from serve.api import create_api
from tests.polling import wait_for
from tests.serve.webhook_receiver import webhook_services


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

    # Sealed with the key the CLI made in the state's credentials file, where `up` finds it.
    key = LocalStack(Settings(state_dir=tmp_path / "state")).encryption_keys(create=False)
    engine = make_engine(f"sqlite:///{tmp_path / 'state' / 'brandfarm.db'}")
    assert WebhookStore(engine).config("acme").has_secret
    with pytest.raises(SecretKeyError, match="encryption_keys setting is not set"):
        WebhookStore(engine).signing_secrets("acme")  # no key: a clear error, not ciphertext
    store = WebhookStore(engine, SecretBox([key]))
    assert store.signing_secrets("acme") == [second, first]
    assert store.config("acme").url == "https://93.184.215.14/h"
    missing = run(app, ["tenants", "webhook", "rotate-secret", "nobody"], env=env)
    assert missing.exit_code == 1 and "no tenant" in missing.output


def _secret(output: str) -> str:
    return output.split("store it now):\n")[1].split()[0]


def test_tenant_manages_its_webhooks_over_http(tmp_path):
    port = free_ports(1)[0]
    engine = make_engine(f"sqlite:///{tmp_path / 'farm.db'}")
    # An allowed name: checked without a DNS lookup; nothing is ever sent to it here.
    settings = Settings(
        state_dir=tmp_path / "api", webhook_allow_hosts=["hooks.test"], encryption_keys=new_key()
    )
    services = webhook_services(engine, settings)
    key = services.tenants.create_tenant("acme").key
    server = uvicorn.Server(
        uvicorn.Config(create_api(services), host="127.0.0.1", port=port, log_level="warning")
    )
    threading.Thread(target=server.run, daemon=True).start()
    wait_for(lambda: server.started, 30, "the API under uvicorn")
    env = {"BRANDFARM_API_PORT": str(port), "BRANDFARM_API_KEY": key}
    run = CliRunner().invoke
    try:
        refused = run(app, ["webhooks", "set-url", "https://127.0.0.1/x"], env=env)
        assert refused.exit_code == 1 and "loopback" in refused.output
        set_ = run(app, ["webhooks", "set-url", "https://hooks.test/in"], env=env)
        assert set_.exit_code == 0, set_.output
        first = _secret(set_.output)
        rotated = run(app, ["webhooks", "rotate-secret"], env=env)
        assert rotated.exit_code == 0, rotated.output
        store = services.webhooks.store
        assert store.signing_secrets("acme") == [_secret(rotated.output), first]
        shown = run(app, ["webhooks", "show"], env=env)
        assert "https://hooks.test/in" in shown.output
        delivery = store.enqueue("acme", "render.succeeded", {"id": "r1"})
        listed = run(app, ["webhooks", "deliveries"], env=env)
        assert delivery in listed.output and "pending" in listed.output
        busy = run(app, ["webhooks", "replay", delivery], env=env)
        assert busy.exit_code == 1 and "still being attempted" in busy.output
    finally:
        server.should_exit = True


def test_operator_reseals_plain_secrets_and_makes_a_new_key(tmp_path):
    env = {"BRANDFARM_STATE_DIR": str(tmp_path / "state")}
    run = CliRunner().invoke
    assert run(app, ["tenants", "create", "acme"], env=env).exit_code == 0
    engine = make_engine(f"sqlite:///{tmp_path / 'state' / 'brandfarm.db'}")
    plain = "whsec_" + "A" * 43 + "="
    with Session(engine) as s, s.begin():  # a row written before encryption
        s.add(WebhookTenantRow(tenant_id="acme", secret=plain))
    sealed = run(app, ["tenants", "webhook", "reseal-secrets"], env=env)
    assert sealed.exit_code == 0 and "resealed 1 webhook secrets" in sealed.output, sealed.output
    with Session(engine) as s:
        assert s.get(WebhookTenantRow, "acme").secret.startswith("fernet:")
    key = LocalStack(Settings(state_dir=tmp_path / "state")).encryption_keys(create=False)
    assert WebhookStore(engine, SecretBox([key])).signing_secrets("acme") == [plain]
    made = run(app, ["tenants", "webhook", "new-key"], env=env)
    assert made.exit_code == 0
    SecretBox([made.output.strip()])  # a valid Fernet key
    # Against a database that is not the embedded farm's and no key: a clear refusal.
    other = {"BRANDFARM_DATABASE_URL": f"sqlite:///{tmp_path / 'other.db'}", **env}
    refused = run(app, ["tenants", "webhook", "reseal-secrets"], env=other)
    assert refused.exit_code == 1 and "encryption_keys" in refused.output
