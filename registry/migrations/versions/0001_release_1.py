"""Release 1: the schema `Base.metadata.create_all` made before migrations existed.

A database that release 1 created is stamped at this revision, not re-created; so this must stay
exactly that schema (tests/registry/release_1/ holds its DDL, and the tests compare).

Revision ID: 0001_release_1
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_release_1"
down_revision = None
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.String(63), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("images_per_hour", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(12), nullable=False),
        sa.Column("tenant_id", sa.String(63), nullable=False),
        sa.Column("salt", sa.LargeBinary(16), nullable=False),
        sa.Column("digest", sa.LargeBinary(32), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("revoked_at", _TS, nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_api_keys_tenant_id", "api_keys", ["tenant_id"])
    op.create_table(
        "files",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("tenant_id", sa.String(63), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("bytes", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("object_key", sa.String(512), nullable=False),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_files_tenant_id", "files", ["tenant_id"])
    op.create_table(
        "fine_tuning_jobs",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("tenant_id", sa.String(63), nullable=False),
        sa.Column("brand", sa.String(63), nullable=False),
        sa.Column("training_file", sa.String(40), nullable=False),
        sa.Column("base_model", sa.String(255), nullable=False),
        sa.Column("spec", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("started_at", _TS, nullable=True),
        sa.Column("finished_at", _TS, nullable=True),
        sa.Column("adapter_version", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("worker_pid", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant_id", "idempotency_key"),
    )
    op.create_index("ix_fine_tuning_jobs_status", "fine_tuning_jobs", ["status"])
    op.create_index("ix_fine_tuning_jobs_tenant_id", "fine_tuning_jobs", ["tenant_id"])
    op.create_table(
        "renders",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("tenant_id", sa.String(63), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.Column("base_model", sa.String(255), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_renders_created_at", "renders", ["created_at"])
    op.create_index("ix_renders_tenant_id", "renders", ["tenant_id"])
    op.create_table(
        "fine_tuning_job_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(40), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("level", sa.String(8), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=True),
        sa.Column("loss", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["fine_tuning_jobs.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_fine_tuning_job_events_job_id", "fine_tuning_job_events", ["job_id"])


def downgrade() -> None:
    for table in (
        "fine_tuning_job_events",
        "renders",
        "fine_tuning_jobs",
        "files",
        "api_keys",
        "tenants",
    ):
        op.drop_table(table)
