"""Alembic's environment and the revisions of the farm database (applied by `registry.db`)."""
