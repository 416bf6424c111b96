"""Engines for the farm database (SQLite or any SQLAlchemy URL), each brought to the newest
schema by the Alembic migrations in `registry/migrations` before it is handed out.

A database made by release 1 (`create_all`, no `alembic_version` table) is recognised, stamped
at its revision and upgraded. Processes that start together (`up`, the ingress replicas, job
workers) may all migrate at once: Postgres serialises them with an advisory lock held by the
migrating transaction, SQLite with a lock file beside the database file.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from filelock import FileLock
from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Connection, Engine

from registry.sql_base import Base, utcnow  # noqa: F401 - re-exported: the old import path

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
#: The revision whose schema is exactly what release 1's `create_all` made.
RELEASE_1 = "0001_release_1"
#: Key of the Postgres advisory lock migrations hold (any constant the farm alone uses).
_PG_MIGRATION_LOCK = 0x62666D6967  # "bfmig"
_LOCK_TIMEOUT_S = 300


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, built here rather than read from an alembic.ini, so that the
    migrations ship inside the package. `env.py` migrates over `connection`."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def head_revision() -> str:
    """The newest revision in `registry/migrations/versions`."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "registry/migrations/versions holds no revision"
    return head


def current_revision(connection: Connection) -> str | None:
    """The database's revision; None for an empty database or one release 1 created."""
    return MigrationContext.configure(connection).get_current_revision()


def make_engine(url: str) -> Engine:
    """An engine for `url` with the schema at the newest revision. SQLite gets WAL and a busy
    timeout so that the CLI and the API can share the file."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
    else:
        engine = create_engine(url, pool_pre_ping=True)
    migrate(engine)
    return engine


@contextmanager
def _sqlite_file_lock(engine: Engine) -> Iterator[None]:
    # pysqlite runs DDL outside any transaction, so SQLite's own locks cannot make a multi-step
    # migration atomic against another process; a lock file beside the database does.
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        yield  # private to this process: nobody to race with
        return
    with FileLock(f"{database}.migrate.lock", timeout=_LOCK_TIMEOUT_S):
        yield


def migrate(engine: Engine) -> str:
    """Upgrade the database to the newest revision; returns it. Cheap when already there (one
    query), and safe when several processes call it at once."""
    head = head_revision()
    with engine.connect() as conn:
        if current_revision(conn) == head:
            return head
    lock = _sqlite_file_lock(engine) if engine.dialect.name == "sqlite" else nullcontext()
    with lock, engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # Held until this transaction ends; Postgres DDL is transactional, so a process
            # that waited here sees the finished schema and its version, and upgrades nothing.
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
        cfg = alembic_config(conn)
        before = current_revision(conn)
        if before is None and inspect(conn).has_table("tenants"):
            command.stamp(cfg, RELEASE_1)  # release 1's create_all made exactly that schema
            before = RELEASE_1
        command.upgrade(cfg, "head")
        after = current_revision(conn) or head
        if after != before:
            log.info("farm database migrated from %s to %s", before or "empty", after)
        return after
