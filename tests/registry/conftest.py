"""SQL engines for the registry's tables: SQLite always, Postgres where it answers."""

from __future__ import annotations

import secrets

import pytest
import sqlalchemy as sa

from registry.db import make_engine

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture(params=["sqlite", "postgres"])
def sql_engine(request, tmp_path):
    """A fresh database with every table: a SQLite file, or a new schema on the local Postgres
    (skipped, with the reason, where Postgres does not answer)."""
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'registry.db'}")
        yield engine
        engine.dispose()
        return
    schema = f"bf_test_{secrets.token_hex(4)}"
    try:
        admin = sa.create_engine(PG_URL)
        with admin.begin() as c:
            c.execute(sa.text(f"CREATE SCHEMA {schema}"))
    except Exception as e:  # noqa: BLE001 - any connection failure means: skip
        pytest.skip(f"Postgres at {PG_URL} does not answer: {type(e).__name__}")
    engine = make_engine(f"{PG_URL}?options=-csearch_path%3D{schema}")
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.begin() as c:
            c.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()
