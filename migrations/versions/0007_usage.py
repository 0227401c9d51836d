"""Usage ledger: what each job consumed per step (device-seconds, tokens), for `GET /usage`.

Revision ID: 0007_usage
Revises: 0006_preflight
Create Date: 2026-11-30

``job_usage`` has one row per job, step and source (``train`` or ``eval``), written with the
step's metrics (see ``jobstore/usage.py``); ``recorded_at`` (indexed) is what a time range
selects on. Existing jobs have no rows (their usage before this revision is not reconstructed).
Self-contained on purpose (no imports from jobstore).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_usage"
down_revision: str | Sequence[str] | None = "0006_preflight"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "job_usage",
        sa.Column("job_id", sa.String(40), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(8), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("device_seconds", sa.Double(), nullable=False),
        sa.Column("generated_tokens", sa.BigInteger(), nullable=False),
        sa.Column("teacher_scored_tokens", sa.BigInteger(), nullable=False),
        sa.Column("student_scored_tokens", sa.BigInteger(), nullable=False),
        sa.Column("eval_tokens", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_job_usage_job_id_jobs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "step", "source", name="pk_job_usage"),
    )
    op.create_index("ix_job_usage_recorded_at", "job_usage", ["recorded_at"])


def downgrade() -> None:
    op.drop_index("ix_job_usage_recorded_at", table_name="job_usage")
    op.drop_table("job_usage")
