"""Queue operations: which dispatcher claimed a render (`render_tasks.claimed_by`), indexes for
the retention sweep of finished render tasks and webhook deliveries, and webhook signing secrets
wide enough to hold their encrypted form (`registry.secret_box`; the rows are encrypted by the
ingress at start, which holds the farm key: a migration does not).

Revision ID: 0011_queue_ops
Revises: 0007_render_sources
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011_queue_ops"
down_revision = "0007_render_sources"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("render_tasks", sa.Column("claimed_by", sa.String(length=64), nullable=True))
    op.create_index("ix_render_tasks_finished", "render_tasks", ["status", "finished_at"])
    op.create_index(
        "ix_webhook_deliveries_finished", "webhook_deliveries", ["status", "finished_at"]
    )
    # Batch mode: SQLite changes a column's type by copying the table.
    with op.batch_alter_table("webhook_tenants") as batch:
        batch.alter_column("secret", type_=sa.String(length=400), existing_nullable=True)
        batch.alter_column("previous_secret", type_=sa.String(length=400), existing_nullable=True)


def downgrade() -> None:
    with op.batch_alter_table("webhook_tenants") as batch:
        batch.alter_column("previous_secret", type_=sa.String(length=100), existing_nullable=True)
        batch.alter_column("secret", type_=sa.String(length=100), existing_nullable=True)
    op.drop_index("ix_webhook_deliveries_finished", "webhook_deliveries")
    op.drop_index("ix_render_tasks_finished", "render_tasks")
    with op.batch_alter_table("render_tasks") as batch:
        batch.drop_column("claimed_by")
