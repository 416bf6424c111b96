"""A per-tenant lock that holds across processes and machines, for admissions whose check and
record are separate transactions (a fine-tune job: count the tenant's jobs, then create one).

Postgres: a transaction-scoped advisory lock on its own connection, held while the caller's
body writes on other connections. SQLite (one machine by nature): a lock file beside the
database; a private in-memory database: a lock in this process.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

from filelock import FileLock
from sqlalchemy import text
from sqlalchemy.engine import Engine

_LOCK_TIMEOUT_S = 60
_local: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
_local_guard = threading.Lock()


@contextmanager
def tenant_lock(engine: Engine, tenant_id: str, purpose: str) -> Iterator[None]:
    """Hold `purpose`'s lock of the tenant (exclusive among everyone using the same database)
    for the body. Raises `TimeoutError` (filelock's Timeout) when a SQLite file lock is not
    had within a minute; Postgres waits as its lock_timeout allows."""
    name = f"brandfarm.{purpose}.{tenant_id}"
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn, conn.begin():
            # hashtext: a 32-bit key; a collision only makes two tenants wait on each other.
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:name))"), {"name": name})
            yield
        return
    database = engine.url.database or ""
    shared_file = database not in ("", ":memory:") and not database.startswith("file:")
    if engine.dialect.name == "sqlite" and shared_file:  # other processes may open it too
        # One lock file per purpose, not per tenant: these admissions are rare and short.
        with FileLock(f"{database}.{purpose}.lock", timeout=_LOCK_TIMEOUT_S):
            yield
        return
    with _local_guard:  # private to this process: a lock here is enough
        lock = _local[name]
    with lock:
        yield
