"""Progress of evaluations: an eval's own progress, and what a running job is evaluating.

Revision ID: 0005_eval_progress
Revises: 0003_eval_attempts
Create Date: 2026-12-02

``evals.progress`` holds the running eval's progress (which model is being sampled, problems
done of total, samples per second), written by the worker as it samples; ``jobs.activity`` holds
what a running job does besides its optimizer steps (the `eval` group of its spec evaluating the
base or the student: step, problems done of total, samples per second), so `GET /jobs/{id}` can
say so. Both are NULL when nothing is in progress (and for existing rows). Self-contained on
purpose (no imports from jobstore).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005_eval_progress"
down_revision: str | Sequence[str] | None = "0003_eval_attempts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON_DOC = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("evals") as batch:
        batch.add_column(sa.Column("progress", JSON_DOC, nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("activity", JSON_DOC, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("activity")
    with op.batch_alter_table("evals") as batch:
        batch.drop_column("progress")
