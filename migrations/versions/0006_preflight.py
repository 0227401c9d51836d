"""Pre-flights: the ``preflights`` table (privileged gap and alignment checks of a job).

Revision ID: 0006_preflight
Revises: 0004_tenant_security
Create Date: 2026-11-30

One row per ``POST /jobs/{id}/preflight``: its request (``config``), state (``queued ->
running -> succeeded | failed``, under a worker's lease), progress and report (the engine's
``opsd_engine.preflight`` report document). Deleted with its job. Self-contained on purpose
(no imports from jobstore).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006_preflight"
down_revision: str | Sequence[str] | None = "0004_tenant_security"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUSES = ("queued", "running", "succeeded", "failed")
JSON_DOC = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    statuses = ", ".join(f"'{s}'" for s in STATUSES)
    op.create_table(
        "preflights",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("tenant_id", sa.String(40), nullable=False),
        sa.Column("job_id", sa.String(40), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("config", JSON_DOC, nullable=False),
        sa.Column("report", JSON_DOC, nullable=True),
        sa.Column("progress", JSON_DOC, nullable=True),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("error_category", sa.String(16), nullable=True),
        sa.Column("lease_owner", sa.String(200), nullable=True),
        sa.Column("lease_expires_at", _ts(), nullable=True),
        sa.Column("attempt", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("started_at", _ts(), nullable=True),
        sa.Column("finished_at", _ts(), nullable=True),
        sa.Column("resent_at", _ts(), nullable=True),
        sa.CheckConstraint(f"status IN ({statuses})", name="ck_preflights_status"),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name="fk_preflights_tenant_id_tenants"
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_preflights_job_id_jobs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_preflights"),
    )
    op.create_index("ix_preflights_job_id_created_at", "preflights", ["job_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_preflights_job_id_created_at", table_name="preflights")
    op.drop_table("preflights")
