"""Content safety: tenants' policy documents, the moderation audit trail, and the perceptual
hashes of uploaded images (near-duplicate checks).

Revision ID: 0010_content_policy
Revises: 0006_webhooks
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_content_policy"
down_revision = "0006_webhooks"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "content_policies",
        sa.Column("tenant_id", sa.String(length=63), sa.ForeignKey("tenants.id"), primary_key=True),
        sa.Column("rules", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "moderation_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("tenant_id", sa.String(length=63), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(length=40), nullable=False),
        sa.Column("field", sa.String(length=255), nullable=False),
        sa.Column("scope", sa.String(length=10), nullable=False),
        sa.Column("rule", sa.String(length=80), nullable=False),
        sa.Column("matched", sa.String(length=255), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=True),
    )
    op.create_index("ix_moderation_events_tenant_id", "moderation_events", ["tenant_id"])
    op.create_table(
        "image_hashes",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("tenant_id", sa.String(length=63), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("file_id", sa.String(length=40), nullable=False),
        sa.Column("file_sha256", sa.String(length=64), nullable=False),
        sa.Column("purpose", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=512), nullable=False),
        sa.Column("phash", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    for column in ("tenant_id", "file_id", "file_sha256"):
        op.create_index(f"ix_image_hashes_{column}", "image_hashes", [column])


def downgrade() -> None:
    for column in ("tenant_id", "file_id", "file_sha256"):
        op.drop_index(f"ix_image_hashes_{column}", table_name="image_hashes")
    op.drop_table("image_hashes")
    op.drop_index("ix_moderation_events_tenant_id", table_name="moderation_events")
    op.drop_table("moderation_events")
    op.drop_table("content_policies")
