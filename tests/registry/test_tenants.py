"""Tenants and API keys on SQLite and, where it answers, Postgres."""

from __future__ import annotations

import secrets

import pytest
import sqlalchemy as sa

from registry.tenants import ApiKeyRow, TenantDirectory, TenantError, make_engine

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _postgres_engine():
    """A fresh schema on the machine's Postgres, or a skip saying why not."""
    schema = f"bf_test_{secrets.token_hex(4)}"
    try:
        admin = sa.create_engine(PG_URL)
        with admin.begin() as c:
            c.execute(sa.text(f"CREATE SCHEMA {schema}"))
    except Exception as e:  # noqa: BLE001 - any connection failure means: skip
        pytest.skip(f"Postgres at {PG_URL} does not answer: {type(e).__name__}")
    engine = make_engine(f"{PG_URL}?options=-csearch_path%3D{schema}")
    return engine, lambda: _drop(admin, schema, engine)


def _drop(admin, schema, engine) -> None:
    engine.dispose()
    with admin.begin() as c:
        c.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def directory(request, tmp_path):
    if request.param == "sqlite":
        yield TenantDirectory(make_engine(f"sqlite:///{tmp_path / 't.db'}"))
        return
    engine, cleanup = _postgres_engine()
    try:
        yield TenantDirectory(engine)
    finally:
        cleanup()


def test_create_authenticate_revoke(directory):
    issued = directory.create_tenant("acme")
    assert issued.key.startswith(f"bf-{issued.key_id}-")
    assert directory.authenticate(issued.key) == "acme"
    second = directory.add_key("acme")
    assert directory.authenticate(second.key) == "acme"
    assert directory.revoke_key(issued.key_id) == "acme"
    assert directory.authenticate(issued.key) is None
    assert directory.authenticate(second.key) == "acme"
    [tenant] = directory.list_tenants()
    assert tenant.id == "acme" and tenant.active_keys == 1


def test_wrong_or_malformed_keys_are_refused(directory):
    issued = directory.create_tenant("acme")
    tampered = issued.key[:-1] + ("A" if issued.key[-1] != "A" else "B")
    for key in (tampered, "", None, "bf-x", issued.key + "x", f"bf-{'0' * 12}-{'a' * 43}"):
        assert directory.authenticate(key) is None


def test_only_a_salted_hash_is_stored(directory):
    a = directory.create_tenant("acme")
    b = directory.create_tenant("globex")
    with directory.engine.connect() as c:
        rows = c.execute(sa.select(ApiKeyRow.salt, ApiKeyRow.digest)).all()
    secret_a = a.key.rsplit("-", 1)[1]
    for salt, digest in rows:
        assert secret_a.encode() not in bytes(salt) + bytes(digest)
    assert len({bytes(s) for s, _ in rows}) == 2  # each key has its own salt
    assert directory.authenticate(b.key) == "globex"


def test_bad_names_duplicates_unknowns(directory):
    for bad in ("A", "x", "-lead", "has space", "a" * 64, "under_score"):
        with pytest.raises(TenantError, match="must match"):
            directory.create_tenant(bad)
    directory.create_tenant("acme")
    with pytest.raises(TenantError, match="already exists"):
        directory.create_tenant("acme")
    with pytest.raises(TenantError, match="no tenant"):
        directory.add_key("nobody")
    with pytest.raises(TenantError, match="no key"):
        directory.revoke_key("000000000000")


def test_usage_counts_for_quota(directory):
    directory.create_tenant("acme", images_per_hour=5)
    directory.create_tenant("globex")
    directory.record_render("r1", "acme", 2, "m")
    directory.record_render("r2", "acme", 3, "m")
    directory.record_render("r3", "globex", 4, "m")
    assert directory.images_in_last_hour("acme") == 5
    assert directory.images_in_last_hour("globex") == 4
    assert directory.count_renders("acme") == 2 and directory.count_renders() == 3
    assert directory.get_tenant("acme").images_per_hour == 5
