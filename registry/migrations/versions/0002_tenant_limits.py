"""Tenant limits and render retention: per-tenant overrides of the farm's caps, and renders
whose objects the retention sweep has deleted (the row stays: it is usage and audit trail).

Revision ID: 0002_tenant_limits
Revises: 0001_release_1
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_tenant_limits"
down_revision = "0001_release_1"
branch_labels = None
depends_on = None


def _tenant_columns() -> list[sa.Column]:
    # Nullable (unset: the farm's setting applies), so SQLite adds them in place.
    return [
        sa.Column("max_concurrent_fine_tunes", sa.Integer(), nullable=True),
        sa.Column("max_queued_jobs", sa.Integer(), nullable=True),
        sa.Column("max_stored_bytes", sa.BigInteger(), nullable=True),
        sa.Column("render_retention_days", sa.Float(), nullable=True),
    ]


def upgrade() -> None:
    for column in _tenant_columns():
        op.add_column("tenants", column)
    op.add_column("renders", sa.Column("expired_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("renders") as batch:
        batch.drop_column("expired_at")
    with op.batch_alter_table("tenants") as batch:
        for column in reversed(_tenant_columns()):
            batch.drop_column(column.name)
