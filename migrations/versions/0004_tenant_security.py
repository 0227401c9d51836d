"""Untrusted tenants: uploaded files, admin keys, and an index for per-tenant queue quotas.

Revision ID: 0004_tenant_security
Revises: 0005_eval_progress
Create Date: 2026-12-01

``files`` holds each tenant's uploaded datasets (validated at upload: format, rows, the fields
every row has; ``uri`` is where the bytes are stored). ``api_keys.admin`` marks keys that may
list and revoke every key (``GET /keys``, ``DELETE /keys/{id}``). ``ix_jobs_tenant_id_status``
serves the admission quota (queued jobs per tenant). Self-contained (no imports from jobstore).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004_tenant_security"
down_revision: str | Sequence[str] | None = "0005_eval_progress"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    json_doc = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
    op.create_table(
        "files",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("tenant_id", sa.String(40), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("fields", json_doc, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_files_tenant_id_tenants"),
        sa.PrimaryKeyConstraint("id", name="pk_files"),
    )
    op.create_index("ix_files_tenant_id_created_at", "files", ["tenant_id", "created_at"])
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(
            sa.Column("admin", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.create_index("ix_jobs_tenant_id_status", "jobs", ["tenant_id", "status"])


def downgrade() -> None:
    op.drop_index("ix_jobs_tenant_id_status", table_name="jobs")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("admin")
    op.drop_index("ix_files_tenant_id_created_at", table_name="files")
    op.drop_table("files")
