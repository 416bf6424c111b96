"""Render adapters: each usage row records the adapter version the render used (brand and
version), so per-version render counts (a canary's champion against its challenger) come from
the durable usage rows of every ingress replica. Nullable: base-model renders, and every render
before this revision, have none.

Revision ID: 0012_render_adapters
Revises: 0011_queue_ops
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012_render_adapters"
down_revision = "0011_queue_ops"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("renders", sa.Column("adapter_brand", sa.String(length=63), nullable=True))
    op.add_column("renders", sa.Column("adapter_version", sa.Integer(), nullable=True))
    op.create_index(
        "ix_renders_adapter", "renders", ["tenant_id", "adapter_brand", "adapter_version"]
    )


def downgrade() -> None:
    op.drop_index("ix_renders_adapter", table_name="renders")
    # Batch mode: SQLite drops a column by copying the table.
    with op.batch_alter_table("renders") as batch:
        batch.drop_column("adapter_version")
        batch.drop_column("adapter_brand")
