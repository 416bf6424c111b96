"""Render sources: a render made by an operation on a stored render (vary, remix, upscale, zoom
out, pan) records which render and image it started from and the operation. Nullable: plain
generations, and every render before this revision, have none.

Revision ID: 0007_render_sources
Revises: 0004_render_queue
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_render_sources"
down_revision = "0004_render_queue"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("renders", sa.Column("source_render", sa.String(length=32), nullable=True))
    op.add_column("renders", sa.Column("source_index", sa.Integer(), nullable=True))
    op.add_column("renders", sa.Column("operation", sa.String(length=20), nullable=True))


def downgrade() -> None:
    # Batch mode: SQLite drops a column by copying the table.
    with op.batch_alter_table("renders") as batch:
        batch.drop_column("operation")
        batch.drop_column("source_index")
        batch.drop_column("source_render")
