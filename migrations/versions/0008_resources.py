"""Resource classes and fair dispatch: a job's GPU count, and each tenant's last turn per class.

Revision ID: 0008_resources
Revises: 0007_usage
Create Date: 2026-11-30

``jobs.gpus`` is the job spec's ``resources.gpus`` (1 for existing rows): the resource class whose
queue the job's message goes to and whose workers may claim it. ``dispatch_turns`` holds, per
tenant and class, when a worker last started a job of that tenant there: the next claim in a class
goes to the tenant with the fewest running jobs, then the one whose turn is oldest (round-robin
across tenants).
``ix_jobs_status_gpus_created_at`` serves that claim (queued jobs of one class, oldest first).
Self-contained on purpose (no imports from jobstore).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_resources"
down_revision: str | Sequence[str] | None = "0007_usage"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("gpus", sa.Integer(), nullable=False, server_default="1"))
        batch.create_index("ix_jobs_status_gpus_created_at", ["status", "gpus", "created_at"])
    op.create_table(
        "dispatch_turns",
        sa.Column("tenant_id", sa.String(40), nullable=False),
        sa.Column("gpus", sa.Integer(), nullable=False),
        sa.Column("last_dispatched_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name="fk_dispatch_turns_tenant_id_tenants",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("tenant_id", "gpus", name="pk_dispatch_turns"),
    )


def downgrade() -> None:
    op.drop_table("dispatch_turns")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_status_gpus_created_at")
        batch.drop_column("gpus")
