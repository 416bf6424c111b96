"""Alembic's environment: migrate over the connection `registry.db.migrate` hands in.

There is no alembic.ini and no offline (`--sql`) mode; run migrations through
`registry.db.migrate(engine)` (or `make_engine`), which also serialises concurrent callers.
"""

from __future__ import annotations

from alembic import context

from registry.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "run the farm's migrations through registry.db.migrate(engine); there is no alembic.ini"
    )
context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite alters most things by copying the table; autogenerate then writes batch ops.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
