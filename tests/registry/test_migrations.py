"""Migrations: a release-1 database (today's `create_all` schema, frozen in release_1/) upgrades
to the newest revision with every row intact, on SQLite and Postgres; the migrated schema and
the models agree; concurrent migrators do not trip over each other."""

from __future__ import annotations

import datetime as dt
import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from registry.db import (
    RELEASE_1,
    alembic_config,
    current_revision,
    head_revision,
    make_engine,
    migrate,
)
from registry.files import FileCatalog
from registry.jobs import JobStore
from registry.schema import metadata
from registry.tenants import TenantDirectory, _digest

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
RELEASE_1_DDL = Path(__file__).parent / "release_1"
T0 = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(params=["sqlite", "postgres"])
def empty_db(request, tmp_path) -> Iterator[str]:
    """The URL of an empty database: a SQLite file, or a new database on the local Postgres
    (dropped afterwards; skipped, with the reason, where Postgres does not answer)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'farm.db'}"
        return
    name = f"bf_db_{secrets.token_hex(6)}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(sa.text(f"CREATE DATABASE {name}"))
    except Exception as e:  # noqa: BLE001 - any connection failure means: skip
        pytest.skip(f"Postgres at {PG_ADMIN_URL} does not answer: {type(e).__name__}")
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as c:
            c.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


def create_release_1(url: str) -> sa.Engine:
    """A database exactly as release 1 made it: its frozen DDL, no alembic_version table."""
    engine = sa.create_engine(url)
    ddl = (RELEASE_1_DDL / f"{engine.dialect.name}.sql").read_text()
    statements = [s for s in ddl.split(";") if s.strip().strip("-").strip()]
    with engine.begin() as conn:
        for statement in statements:
            body = "\n".join(ln for ln in statement.splitlines() if not ln.startswith("--"))
            conn.exec_driver_sql(body)
    return engine


def release_1_rows(key_secret: str) -> dict[str, list[dict]]:
    """A row or more for every release-1 table, with every column set (NULLs included)."""
    salt = b"s" * 16
    job = {
        "tenant_id": "acme",
        "brand": "acme-logo",
        "training_file": "file-1",
        "base_model": "brandfarm-shapes",
        "spec": json.dumps({"hyperparameters": {"steps": 8}, "seed": 1}),
        "created_at": T0,
        "adapter_version": None,
        "error": None,
        "worker_pid": None,
        "started_at": None,
        "finished_at": None,
    }
    return {
        "tenants": [
            {"id": "acme", "created_at": T0, "images_per_hour": 100},
            {"id": "globex", "created_at": T0, "images_per_hour": None},
        ],
        "api_keys": [
            {
                "id": "0123456789ab",
                "tenant_id": "acme",
                "salt": salt,
                "digest": _digest(salt, key_secret),
                "created_at": T0,
                "revoked_at": None,
            },
            {
                "id": "ba9876543210",
                "tenant_id": "globex",
                "salt": salt,
                "digest": b"d" * 32,
                "created_at": T0,
                "revoked_at": T0 + dt.timedelta(days=1),
            },
        ],
        "files": [
            {
                "id": "file-1",
                "tenant_id": "acme",
                "filename": "logos.zip",
                "purpose": "fine-tune",
                "bytes": 12345,
                "sha256": "a" * 64,
                "object_key": "tenants/acme/files/file-1.zip",
                "images": 8,
                "created_at": T0,
            }
        ],
        "fine_tuning_jobs": [
            {
                **job,
                "id": "ftjob-1",
                "status": "succeeded",
                "started_at": T0 + dt.timedelta(minutes=1),
                "finished_at": T0 + dt.timedelta(minutes=9),
                "adapter_version": 3,
                "idempotency_key": "key-1",
                "attempts": 2,
                "cancel_requested": False,
            },
            {
                **job,
                "id": "ftjob-2",
                "status": "failed",
                "error": "training diverged",
                "idempotency_key": None,
                "attempts": 1,
                "cancel_requested": True,
                "worker_pid": 4242,
            },
        ],
        "fine_tuning_job_events": [
            {"id": 1, "job_id": "ftjob-1", "created_at": T0, "level": "info",
             "message": "job queued", "step": None, "loss": None},
            {"id": 2, "job_id": "ftjob-1", "created_at": T0, "level": "info",
             "message": "step 4", "step": 4, "loss": 0.125},
            {"id": 3, "job_id": "ftjob-2", "created_at": T0, "level": "error",
             "message": "job failed", "step": None, "loss": None},
        ],
        "renders": [
            {"id": "r" * 24, "tenant_id": "acme", "created_at": T0, "images": 2,
             "base_model": "brandfarm-shapes"},
            {"id": "g" * 24, "tenant_id": "globex", "created_at": T0, "images": 1,
             "base_model": "brandfarm-shapes"},
        ],
    }  # fmt: skip


def dump(engine: sa.Engine) -> dict[str, list[dict]]:
    """Every row of every table, read through the database's own (reflected) schema."""
    reflected = sa.MetaData()
    reflected.reflect(engine)
    with engine.connect() as conn:
        return {
            name: [dict(r._mapping) for r in conn.execute(sa.select(t).order_by(*t.primary_key))]
            for name, t in reflected.tables.items()
            if name != "alembic_version"
        }


def schema_diff(engine: sa.Engine, target: sa.MetaData = metadata) -> list:
    with engine.connect() as conn:
        return compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), target
        )


def test_release_1_database_upgrades_with_every_row_intact(empty_db: str) -> None:
    secret = "k" * 43
    old = create_release_1(empty_db)
    rows = release_1_rows(secret)
    reflected = sa.MetaData()
    reflected.reflect(old)
    assert set(reflected.tables) == set(rows), "the fixture must fill every release-1 table"
    with old.begin() as conn:
        for table in reflected.sorted_tables:
            conn.execute(table.insert(), rows[table.name])
    before = dump(old)
    old.dispose()

    engine = make_engine(empty_db)  # detects release 1, stamps it, upgrades
    with engine.connect() as conn:
        assert current_revision(conn) == head_revision()
    after = dump(engine)
    for table, old_rows in before.items():
        assert len(after[table]) == len(old_rows), table
        for old_row, new_row in zip(old_rows, after[table], strict=True):
            assert {k: new_row[k] for k in old_row} == old_row, table
    assert schema_diff(engine) == []

    # And the farm's own code reads them as before.
    tenants = TenantDirectory(engine)
    assert tenants.authenticate(f"bf-0123456789ab-{secret}") == "acme"
    assert tenants.get_tenant("acme").images_per_hour == 100
    assert tenants.count_renders() == 2
    assert FileCatalog(engine).get("acme", "file-1").bytes == 12345
    jobs = JobStore(engine)
    done = jobs.get("acme", "ftjob-1")
    assert (done.status, done.adapter_version, done.attempts) == ("succeeded", 3, 2)
    assert [e.message for e in jobs.events("ftjob-1")] == ["job queued", "step 4"]
    assert jobs.get("acme", "ftjob-2").error == "training diverged"
    # New columns start unset: the farm's settings apply until an operator sets overrides.
    assert tenants.get_tenant("globex").limits.max_stored_bytes is None
    engine.dispose()


def test_fresh_database_matches_the_models(empty_db: str) -> None:
    engine = make_engine(empty_db)
    assert schema_diff(engine) == []
    assert migrate(engine) == head_revision()  # again: nothing to do
    engine.dispose()


def test_release_1_revision_is_exactly_the_release_1_schema(empty_db: str, tmp_path) -> None:
    """Stamping a release-1 database at 0001 is only right if 0001 builds that same schema."""
    engine = sa.create_engine(empty_db)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), RELEASE_1)
    frozen_url = (
        f"sqlite:///{tmp_path / 'frozen.db'}" if empty_db.startswith("sqlite") else empty_db
    )
    if frozen_url == empty_db:  # Postgres: the frozen DDL in a schema of its own
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE SCHEMA frozen"))
        frozen_url = f"{empty_db}?options=-csearch_path%3Dfrozen"
    frozen = create_release_1(frozen_url)
    release_1 = sa.MetaData()
    release_1.reflect(frozen)
    frozen.dispose()
    assert schema_diff(engine, release_1) == []
    engine.dispose()


MIGRATOR = """
import sys
from registry.db import make_engine, current_revision
engine = make_engine(sys.argv[1])
with engine.connect() as conn:
    print(current_revision(conn))
"""


def test_concurrent_migrations_all_succeed(empty_db: str) -> None:
    """Several processes (up, ingress replicas, job workers) migrating one database at once."""
    create_release_1(empty_db).dispose()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MIGRATOR, empty_db],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err for _, err in outs]
    assert {out.strip() for out, _ in outs} == {head_revision()}
    engine = sa.create_engine(empty_db)
    assert schema_diff(engine) == []
    engine.dispose()
