"""Evals survive lost workers and retried submissions: attempts, re-sends, Idempotency-Keys.

Revision ID: 0003_eval_attempts
Revises: 0002_evals
Create Date: 2026-11-28

``attempt`` (1 for existing rows) counts the runs of an eval; the reaper fails an eval whose
worker was lost on its last allowed attempt instead of retrying it for ever. ``resent_at``
records when the reaper last sent a queued eval's message again (a message can be lost with a
killed worker). ``idempotency_key`` + ``request_hash`` (unique per tenant and key) make a retried
``POST /jobs/{id}/evals`` return the eval it already made. Self-contained on purpose (no imports
from jobstore).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_eval_attempts"
down_revision: str | Sequence[str] | None = "0002_evals"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("evals") as batch:
        batch.add_column(
            sa.Column("attempt", sa.Integer(), nullable=False, server_default=sa.text("1"))
        )
        batch.add_column(sa.Column("resent_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("idempotency_key", sa.String(255), nullable=True))
        batch.add_column(sa.Column("request_hash", sa.String(128), nullable=True))
    op.create_index(
        "ix_evals_tenant_id_idempotency_key",
        "evals",
        ["tenant_id", "idempotency_key"],
        unique=True,
    )


def downgrade() -> None:
    op.drop_index("ix_evals_tenant_id_idempotency_key", table_name="evals")
    with op.batch_alter_table("evals") as batch:
        batch.drop_column("request_hash")
        batch.drop_column("idempotency_key")
        batch.drop_column("resent_at")
        batch.drop_column("attempt")
