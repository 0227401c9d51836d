"""Eval runs: the ``evals`` table (benchmark evaluations of a job's adapter).

Revision ID: 0002_evals
Revises: 0001
Create Date: 2026-12-02

Self-contained on purpose (no imports from jobstore): a revision must keep producing the same
schema when the application's code moves on.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002_evals"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUSES = ("queued", "running", "succeeded", "failed")


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _json() -> sa.types.TypeEngine[object]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    statuses = ", ".join(f"'{s}'" for s in STATUSES)
    op.create_table(
        "evals",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("tenant_id", sa.String(40), nullable=False),
        sa.Column("job_id", sa.String(40), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("config", _json(), nullable=False),
        sa.Column("results", _json(), nullable=True),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("error_category", sa.String(16), nullable=True),
        sa.Column("lease_owner", sa.String(200), nullable=True),
        sa.Column("lease_expires_at", _ts(), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("started_at", _ts(), nullable=True),
        sa.Column("finished_at", _ts(), nullable=True),
        sa.CheckConstraint(f"status IN ({statuses})", name="ck_evals_status"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_evals_tenant_id_tenants"),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_evals_job_id_jobs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_evals"),
    )
    op.create_index("ix_evals_job_id_created_at", "evals", ["job_id", "created_at"])
    op.create_index("ix_evals_tenant_id_created_at", "evals", ["tenant_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_evals_tenant_id_created_at", table_name="evals")
    op.drop_index("ix_evals_job_id_created_at", table_name="evals")
    op.drop_table("evals")
