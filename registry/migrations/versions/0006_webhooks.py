"""Webhooks: tenants' signing secrets and default URL, endpoints (and why one is disabled), and
the outbox of events, deliveries and their attempts.

Revision ID: 0006_webhooks
Revises: 0003_job_reconcile
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_webhooks"
down_revision = "0003_job_reconcile"
branch_labels = None
depends_on = None

URL = sa.String(length=2048)


def _when(name: str) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=True)


def upgrade() -> None:
    op.create_table(
        "webhook_tenants",
        sa.Column("tenant_id", sa.String(length=63), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("secret", sa.String(length=100), nullable=True),
        _when("secret_created_at"),
        sa.Column("previous_secret", sa.String(length=100), nullable=True),
        _when("previous_secret_until"),
        sa.Column("url", URL, nullable=True),
        sa.PrimaryKeyConstraint("tenant_id"),
    )
    op.create_table(
        "webhook_endpoints",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.String(length=63), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("url", URL, nullable=False),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        _when("disabled_at"),
        sa.Column("disabled_reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant_id", "url"),
    )
    op.create_index("ix_webhook_endpoints_tenant_id", "webhook_endpoints", ["tenant_id"])
    op.create_table(
        "webhook_events",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=63), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_webhook_events_tenant_id", "webhook_events", ["tenant_id"])
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column(
            "event_id", sa.String(length=40), sa.ForeignKey("webhook_events.id"), nullable=False
        ),
        sa.Column("tenant_id", sa.String(length=63), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("url", URL, nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _when("next_attempt_at"),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        _when("lease_until"),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        _when("finished_at"),
        sa.PrimaryKeyConstraint("id"),
    )
    for column in ("event_id", "tenant_id", "status", "next_attempt_at"):
        op.create_index(f"ix_webhook_deliveries_{column}", "webhook_deliveries", [column])
    op.create_table(
        "webhook_attempts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column(
            "delivery_id",
            sa.String(length=40),
            sa.ForeignKey("webhook_deliveries.id"),
            nullable=False,
        ),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("duration_ms", sa.Float(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("response_body", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_webhook_attempts_delivery_id", "webhook_attempts", ["delivery_id"])


def downgrade() -> None:
    for table in (
        "webhook_attempts",
        "webhook_deliveries",
        "webhook_events",
        "webhook_endpoints",
        "webhook_tenants",
    ):
        op.drop_table(table)
