"""The render queue: async renders (`render_tasks`) and each tenant's render plan
(`render_plans`: tiers, fair-share weight, queue-length cap).

Revision ID: 0004_render_queue
Revises: 0005_cluster_limits
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_render_queue"
down_revision = "0005_cluster_limits"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "render_tasks",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("priority", sa.String(length=8), nullable=False),
        sa.Column("tier", sa.Integer(), nullable=False),
        sa.Column("request", sa.Text(), nullable=False),
        sa.Column("webhook_url", sa.Text(), nullable=True),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.Column("cost", sa.Float(), nullable=False),
        sa.Column("vstart", sa.Float(), nullable=False),
        sa.Column("vfinish", sa.Float(), nullable=False),
        sa.Column("progress_step", sa.Integer(), nullable=False),
        sa.Column("progress_total", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("error_code", sa.String(length=40), nullable=True),
        sa.Column("event_pending", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_render_tasks_tenant_id", "render_tasks", ["tenant_id"])
    op.create_index("ix_render_tasks_claim", "render_tasks", ["status", "tier", "vfinish"])
    op.create_index("ix_render_tasks_event_pending", "render_tasks", ["event_pending"])
    op.create_table(
        "render_plans",
        sa.Column("tenant_id", sa.String(length=63), nullable=False),
        sa.Column("plan", sa.String(length=16), nullable=False),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.Column("max_queued", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("tenant_id"),
    )


def downgrade() -> None:
    op.drop_table("render_plans")
    op.drop_index("ix_render_tasks_event_pending", table_name="render_tasks")
    op.drop_index("ix_render_tasks_claim", table_name="render_tasks")
    op.drop_index("ix_render_tasks_tenant_id", table_name="render_tasks")
    op.drop_table("render_tasks")
