"""Cluster-wide render limits: in-flight slots and hourly-quota reservations as leased rows
(registry.render_limits), and a tenant's own in-flight render cap.

Revision ID: 0005_cluster_limits
Revises: 0010_content_policy
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_cluster_limits"
down_revision = "0010_content_policy"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "render_slots",
        sa.Column("id", sa.String(length=32), primary_key=True),
        sa.Column("tenant_id", sa.String(length=63), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_render_slots_tenant_id", "render_slots", ["tenant_id"])
    op.create_index("ix_render_slots_expires_at", "render_slots", ["expires_at"])
    op.create_table(
        "quota_reservations",
        sa.Column("id", sa.String(length=32), primary_key=True),
        sa.Column("tenant_id", sa.String(length=63), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_quota_reservations_tenant_id", "quota_reservations", ["tenant_id"])
    op.create_index("ix_quota_reservations_expires_at", "quota_reservations", ["expires_at"])
    # Nullable (unset: the farm's max_inflight_per_tenant applies), so SQLite adds it in place.
    op.add_column("tenants", sa.Column("max_inflight_renders", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("max_inflight_renders")
    op.drop_table("quota_reservations")
    op.drop_table("render_slots")
