"""Table definitions of the store (SQLAlchemy Core) and the column types shared by both dialects.

Owns the schema as Python objects: the Alembic revisions in ``migrations/`` create exactly these
tables (a test compares the migrated database with this metadata), and the store's queries are
written against them. Nothing here creates tables; only the migrations do.

Portability notes:

* :class:`UTCDateTime` stores timezone-aware UTC timestamps: ``timestamptz`` on PostgreSQL, and on
  SQLite a naive UTC string in one fixed format, so that string comparison is time order. It
  always returns aware UTC datetimes and refuses naive ones.
* :data:`JSONDoc` is ``JSONB`` on PostgreSQL and ``JSON`` (text) elsewhere.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect

from jobstore.records import JOB_STATUSES

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every dialect (naive datetimes are refused)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the store only takes aware UTC times")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


JSONDoc = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
EventId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

_status_list = ", ".join(f"'{s}'" for s in JOB_STATUSES)

tenants = sa.Table(
    "tenants",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("tenant_id", sa.String(40), sa.ForeignKey("tenants.id"), nullable=False, index=True),
    sa.Column("prefix", sa.String(32), nullable=False, unique=True),
    sa.Column("key_hash", sa.String(64), nullable=False),  # sha256 hex of the secret part
    sa.Column("label", sa.String(200), nullable=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("last_used_at", UTCDateTime(), nullable=True),
    sa.Column("revoked_at", UTCDateTime(), nullable=True),
    sa.Column("admin", sa.Boolean(), nullable=False, server_default=sa.false()),
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("tenant_id", sa.String(40), sa.ForeignKey("tenants.id"), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("spec", JSONDoc, nullable=False),
    sa.Column("metadata", JSONDoc, nullable=False),
    sa.Column("attempt", sa.Integer(), nullable=False),
    sa.Column("max_attempts", sa.Integer(), nullable=False),
    sa.Column("lease_owner", sa.String(200), nullable=True),
    sa.Column("lease_expires_at", UTCDateTime(), nullable=True),
    sa.Column("progress_step", sa.Integer(), nullable=False),
    sa.Column("total_steps", sa.Integer(), nullable=True),
    sa.Column("error_code", sa.String(64), nullable=True),
    sa.Column("error_message", sa.Text(), nullable=True),
    sa.Column("error_category", sa.String(16), nullable=True),
    sa.Column("adapter_uri", sa.Text(), nullable=True),
    sa.Column("idempotency_key", sa.String(255), nullable=True),
    sa.Column("request_hash", sa.String(128), nullable=True),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.Column("started_at", UTCDateTime(), nullable=True),
    sa.Column("finished_at", UTCDateTime(), nullable=True),
    # what a running job does besides its steps (an eval of its spec's `eval` group); 0005
    sa.Column("activity", JSONDoc, nullable=True),
    # the spec's resources.gpus: the resource class whose workers may claim the job; 0008
    sa.Column("gpus", sa.Integer(), nullable=False, server_default="1"),
    sa.UniqueConstraint("tenant_id", "idempotency_key"),
    sa.CheckConstraint(f"status IN ({_status_list})", name="status"),
    sa.CheckConstraint("attempt >= 1 AND max_attempts >= 1", name="attempts"),
    sa.Index(None, "tenant_id", "created_at", "id"),
    sa.Index(None, "status"),
    sa.Index(None, "tenant_id", "status"),
    sa.Index(None, "status", "gpus", "created_at"),
)

# When a worker last started a job of a tenant in a resource class: the tenant's turn in fair
# dispatch (the oldest turn goes first); 0008.
dispatch_turns = sa.Table(
    "dispatch_turns",
    metadata,
    sa.Column(
        "tenant_id",
        sa.String(40),
        sa.ForeignKey("tenants.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("gpus", sa.Integer(), primary_key=True),
    sa.Column("last_dispatched_at", UTCDateTime(), nullable=False),
)

job_events = sa.Table(
    "job_events",
    metadata,
    sa.Column("id", EventId, primary_key=True, autoincrement=True),
    sa.Column(
        "job_id", sa.String(40), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("message", sa.Text(), nullable=False),
    sa.Column("data", JSONDoc, nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Index(None, "job_id", "id"),
    sqlite_autoincrement=True,  # never reuse an id: clients resume streams from the last one
)

# The primary key (job_id, name, step) is the uniqueness that makes a replayed step a no-op and
# the index of every metrics query (one name, a step range, ascending). On PostgreSQL it also
# carries the value (INCLUDE), so reading a name's points is an index-only scan over contiguous
# index pages instead of one heap page visit per point (a job's steps interleave its names).
metrics = sa.Table(
    "metrics",
    metadata,
    sa.Column(
        "job_id", sa.String(40), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("step", sa.Integer(), nullable=False),
    sa.Column("value", sa.Double(), nullable=False),
    sa.PrimaryKeyConstraint("job_id", "name", "step", postgresql_include=["value"]),
)

checkpoints = sa.Table(
    "checkpoints",
    metadata,
    sa.Column(
        "job_id", sa.String(40), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column("step", sa.Integer(), primary_key=True),
    sa.Column("uri", sa.Text(), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
)
