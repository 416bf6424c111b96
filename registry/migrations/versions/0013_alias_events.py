"""Alias events: one row per change of a brand's aliases, polled by every ingress replica to
drop its cached alias answers (instant promotion and rollback).

Revision ID: 0013_alias_events
Revises: 0012_render_adapters
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013_alias_events"
down_revision = "0012_render_adapters"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "alias_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("brand", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_alias_events_created_at", "alias_events", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_alias_events_created_at", table_name="alias_events")
    op.drop_table("alias_events")
