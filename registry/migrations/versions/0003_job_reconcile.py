"""Job reconciliation: the outbox marker and the tenant-facing error code of fine-tune jobs.

`submitted` is False from a job's creation until its Ray job is submitted (the reconciler submits
what a crash left unsubmitted); rows that exist before this revision were submitted when they
were created, hence the server default true. `error_code` says why a job failed, for tenants.

Revision ID: 0003_job_reconcile
Revises: 0002_tenant_limits
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_job_reconcile"
down_revision = "0002_tenant_limits"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "fine_tuning_jobs",
        sa.Column("submitted", sa.Boolean(), nullable=False, server_default=sa.true()),
    )
    op.add_column("fine_tuning_jobs", sa.Column("error_code", sa.String(length=40), nullable=True))


def downgrade() -> None:
    # Batch mode: SQLite drops a column by copying the table.
    with op.batch_alter_table("fine_tuning_jobs") as batch:
        batch.drop_column("error_code")
        batch.drop_column("submitted")
