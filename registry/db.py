"""The SQL layer's shared pieces: the declarative base, engines (SQLite or any URL), time."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    pass


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def make_engine(url: str) -> Engine:
    """An engine for `url` with the schema created. SQLite gets WAL and a busy timeout so that
    the CLI and the API can share the file."""
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
    import registry.files  # noqa: F401 - every table module, so create_all sees all tables
    import registry.jobs  # noqa: F401
    import registry.tenants  # noqa: F401

    Base.metadata.create_all(engine)
    return engine
