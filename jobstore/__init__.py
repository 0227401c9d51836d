"""The OPSD service's state: tables, sessions, queries and the job state machine.

Public surface: :class:`Store` (every query), the records, states and exceptions of
:mod:`jobstore.records`, and :func:`upgrade` / :func:`current_revision` (Alembic migrations in
``migrations/``). Works on PostgreSQL (``postgresql+psycopg://…``) and SQLite files
(``sqlite:///path``). Imports neither fastapi, celery nor torch.
"""

from jobstore.evals import EVAL_STATUSES, EVAL_TERMINAL_STATUSES, EvalRecord
from jobstore.migrate import current_revision, head_revision, upgrade
from jobstore.preflights import PREFLIGHT_STATUSES, PreflightRecord
from jobstore.records import (
    CANCELLED,
    CANCELLING,
    FAILED,
    JOB_STATUSES,
    LIVE_STATUSES,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL_STATUSES,
    TRANSITIONS,
    CheckpointRecord,
    EventRecord,
    IdempotencyConflict,
    InvalidCursor,
    JobError,
    JobNotFound,
    JobRecord,
    StoreError,
    TenantNotFound,
    TenantRecord,
)
from jobstore.store import Store
from jobstore.tenancy import ApiKeyRecord, FileRecord, new_file_id
from jobstore.usage import JobUsage

__all__ = [
    "CANCELLED",
    "CANCELLING",
    "EVAL_STATUSES",
    "EVAL_TERMINAL_STATUSES",
    "FAILED",
    "JOB_STATUSES",
    "LIVE_STATUSES",
    "PREFLIGHT_STATUSES",
    "QUEUED",
    "RUNNING",
    "SUCCEEDED",
    "TERMINAL_STATUSES",
    "TRANSITIONS",
    "ApiKeyRecord",
    "CheckpointRecord",
    "EvalRecord",
    "EventRecord",
    "FileRecord",
    "IdempotencyConflict",
    "InvalidCursor",
    "JobError",
    "JobNotFound",
    "JobRecord",
    "JobUsage",
    "PreflightRecord",
    "Store",
    "StoreError",
    "TenantNotFound",
    "TenantRecord",
    "current_revision",
    "head_revision",
    "new_file_id",
    "upgrade",
]
