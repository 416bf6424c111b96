"""Synchronous renders ride the render queue: `render_tasks.sync` marks the ticket of a
`POST /v1/images/generations` request, held by the ingress replica that has its client (only
that replica's dispatcher claims it; it never leaves that replica, is not listed and sends no
event). Existing rows are async renders.

Revision ID: 0014_sync_renders
Revises: 0013_alias_events
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014_sync_renders"
down_revision = "0013_alias_events"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "render_tasks",
        sa.Column("sync", sa.Boolean(), nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    # Batch mode: SQLite drops a column by copying the table.
    with op.batch_alter_table("render_tasks") as batch:
        batch.drop_column("sync")
