"""Webhook secrets encrypted at rest (SQLite and Postgres): nothing readable in the database,
plain rows from before encryption sealed by the ingress's start, keys rotated without losing a
secret, a clear error without the key, and the embedded farm's key made once and kept with the
farm's other secrets."""

from __future__ import annotations

import json
import threading

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from cluster.stack import LocalStack
from registry.secret_box import SecretBox, SecretKeyError, new_key
from registry.settings import Settings
from registry.sql_base import utcnow
from registry.tenants import TenantDirectory
from registry.webhooks import WebhookStore, WebhookTenantRow, new_secret
from serve.services import _seal_webhook_secrets


@pytest.fixture
def engine(sql_engine):
    tenants = TenantDirectory(sql_engine)
    for name in ("acme", "globex", "initech"):
        tenants.create_tenant(name)
    return sql_engine


def stored(engine, tenant: str) -> tuple[str | None, str | None]:  # noqa: ANN001
    with Session(engine) as s:
        row = s.get(WebhookTenantRow, tenant)
        return row.secret, row.previous_secret


def test_a_secret_is_stored_sealed_and_signs_as_itself(engine) -> None:
    store = WebhookStore(engine, SecretBox([new_key()]))
    secret = store.rotate_secret("acme", grace_s=0)
    on_disk, _ = stored(engine, "acme")
    assert on_disk.startswith("fernet:") and secret not in on_disk
    assert secret.removeprefix("whsec_") not in on_disk
    assert store.signing_secrets("acme") == [secret]
    # Whoever reads the database without the key gets an error that names the fix.
    with pytest.raises(SecretKeyError, match="encryption_keys setting is not set"):
        WebhookStore(engine).signing_secrets("acme")
    with pytest.raises(SecretKeyError, match="cannot store a webhook secret"):
        WebhookStore(engine).rotate_secret("globex", grace_s=0)
    with pytest.raises(SecretKeyError, match="not in encryption_keys"):
        WebhookStore(engine, SecretBox([new_key()])).signing_secrets("acme")


def test_plain_rows_from_before_encryption_are_sealed_at_ingress_start(engine) -> None:
    plain = {t: new_secret() for t in ("acme", "globex")}
    old = new_secret()
    with Session(engine) as s, s.begin():  # as the 0006 schema's code wrote them
        for tenant, secret in plain.items():
            s.add(WebhookTenantRow(tenant_id=tenant, secret=secret, secret_created_at=utcnow()))
        s.get(WebhookTenantRow, "acme").previous_secret = old
    store = WebhookStore(engine, SecretBox([new_key()]))
    assert store.signing_secrets("globex") == [plain["globex"]]  # readable before sealing

    _seal_webhook_secrets(store)  # what each ingress runs at start

    with Session(engine) as s:
        values = s.scalars(select(WebhookTenantRow.secret)).all()
    assert len(values) == 2 and all(v.startswith("fernet:") for v in values)
    assert stored(engine, "acme")[1].startswith("fernet:")
    assert store.signing_secrets("globex") == [plain["globex"]]
    assert store.reseal_secrets() == 0  # already sealed with the current key: untouched


def test_two_replicas_sealing_at_once_seal_each_value_once(engine) -> None:
    with Session(engine) as s, s.begin():
        for tenant in ("acme", "globex", "initech"):
            s.add(WebhookTenantRow(tenant_id=tenant, secret=new_secret()))
    key = new_key()
    counts: list[int] = []
    threads = [
        threading.Thread(
            target=lambda: counts.append(WebhookStore(engine, SecretBox([key])).reseal_secrets())
        )
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(counts) == 3


def test_key_rotation_keeps_every_secret(engine) -> None:
    k1, k2 = new_key(), new_key()
    first = WebhookStore(engine, SecretBox([k1]))
    a = first.rotate_secret("acme", grace_s=0)
    b = first.rotate_secret("acme", grace_s=3600)  # `a` is now the previous secret, still signing
    # Step 1: the new key first, the old one after: everything still opens, new values seal
    # with k2.
    both = WebhookStore(engine, SecretBox([k2, k1]))
    assert both.signing_secrets("acme") == [b, a]
    # Step 2: reseal under k2, then the old key can go.
    assert both.reseal_secrets() == 2
    assert WebhookStore(engine, SecretBox([k2])).signing_secrets("acme") == [b, a]
    with pytest.raises(SecretKeyError):
        WebhookStore(engine, SecretBox([k1])).signing_secrets("acme")


def test_a_bad_key_is_refused_by_name() -> None:
    with pytest.raises(SecretKeyError, match="not a Fernet key"):
        SecretBox(["not-a-key"])
    s = Settings(encryption_keys=f" {new_key()} , {new_key()} ")
    assert SecretBox.of_settings(s) is not None
    assert SecretBox.of_settings(Settings()) is None


def test_the_embedded_farm_makes_its_key_once_and_keeps_it_with_its_secrets(tmp_path) -> None:
    stack = LocalStack(Settings(state_dir=tmp_path / "state"))
    assert stack.resolved_settings().encryption_keys is None  # nothing made without `create`
    s = stack.resolved_settings(create=True)
    key = s.encryption_keys.get_secret_value()
    SecretBox([key])  # a valid key
    again = LocalStack(Settings(state_dir=tmp_path / "state")).resolved_settings(create=True)
    assert again.encryption_keys.get_secret_value() == key  # the same across `up`s
    assert s.s3_access_key is not None  # the store's credentials beside it, as before
    creds = tmp_path / "state" / "credentials.json"
    assert oct(creds.stat().st_mode & 0o777) == "0o600"
    on_disk = json.loads(s.write_secrets_file().read_text())
    assert on_disk["encryption_keys"] == key  # what the ingress and jobs read
    assert "BRANDFARM_ENCRYPTION_KEYS" not in s.public_env()  # never in a Ray runtime env
    # A key set by the operator wins over the file.
    mine = new_key()
    set_ = LocalStack(Settings(state_dir=tmp_path / "state", encryption_keys=mine))
    assert set_.resolved_settings(create=True).encryption_keys.get_secret_value() == mine


def test_a_sealed_secret_fits_the_column(engine) -> None:
    store = WebhookStore(engine, SecretBox([new_key()]))
    store.rotate_secret("acme", grace_s=3600)
    store.rotate_secret("acme", grace_s=3600)
    with engine.connect() as c:
        longest = c.execute(text("SELECT max(length(secret)) FROM webhook_tenants")).scalar_one()
    assert 100 < longest < 400  # above the old column's 100: the migration widened it
