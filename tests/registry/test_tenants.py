"""Tenants and API keys on SQLite and, where it answers, Postgres."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from registry.tenants import ApiKeyRow, TenantDirectory, TenantError


@pytest.fixture
def directory(sql_engine):
    return TenantDirectory(sql_engine)


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
