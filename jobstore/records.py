"""Plain records the store returns (detached from ORM sessions) and the job state machine.

States: queued -> running -> succeeded | failed; queued -> cancelled; running -> cancelling ->
cancelled; a running job whose lease expired goes back to queued with attempt + 1. Terminal
states never change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

QUEUED = "queued"
RUNNING = "running"
CANCELLING = "cancelling"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"

JOB_STATUSES: tuple[str, ...] = (QUEUED, RUNNING, CANCELLING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL_STATUSES: frozenset[str] = frozenset({SUCCEEDED, FAILED, CANCELLED})
LIVE_STATUSES: frozenset[str] = frozenset({QUEUED, RUNNING, CANCELLING})

# Allowed transitions; every one is a conditional UPDATE plus an event row.
TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING, CANCELLED, FAILED}),
    RUNNING: frozenset({SUCCEEDED, FAILED, CANCELLING, QUEUED, CANCELLED}),
    CANCELLING: frozenset({CANCELLED, SUCCEEDED, FAILED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}


class StoreError(Exception):
    """Base class of store errors."""


class IdempotencyConflict(StoreError):
    """The Idempotency-Key was already used by this tenant with a different request body."""

    def __init__(self, key: str, job_id: str, *, kind: str = "job") -> None:
        super().__init__(
            f"Idempotency-Key {key!r} was used for a different request ({kind} {job_id})"
        )
        self.key = key
        self.job_id = job_id  # the id of what the key made (a job, or an eval)


class InvalidCursor(StoreError):
    """A pagination cursor that this store did not issue."""


class JobNotFound(StoreError):
    """A per-job record (event, metrics, checkpoint) was written for a job that does not exist."""


class TenantNotFound(StoreError):
    """A job was created for a tenant id that does not exist."""


@dataclass(frozen=True)
class TenantRecord:
    id: str
    name: str
    created_at: datetime
    key_id: str | None = None  # the API key that authenticated (from `Store.authenticate`)
    admin: bool = False  # that key may list and revoke every key


@dataclass(frozen=True)
class JobError:
    code: str  # e.g. dataset_error, model_load_error, out_of_memory, worker_lost, internal_error
    message: str
    category: str  # "user" | "system"

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message, "category": self.category}


def stored_error(row: Mapping[str, Any]) -> JobError | None:
    """The error of a row with ``error_code``, ``error_message`` and ``error_category`` columns
    (jobs, evals, pre-flights); ``None`` when ``error_code`` is null."""
    if row["error_code"] is None:
        return None
    return JobError(
        code=row["error_code"],
        message=row["error_message"] or "",
        category=row["error_category"] or "system",
    )


@dataclass(frozen=True)
class JobRecord:
    id: str
    tenant_id: str
    status: str
    spec: dict[str, Any]
    metadata: dict[str, Any]
    attempt: int  # 1 for the first run; +1 each time a lost worker's job is requeued
    max_attempts: int
    lease_owner: str | None
    lease_expires_at: datetime | None
    progress_step: int
    total_steps: int | None
    error: JobError | None
    adapter_uri: str | None
    idempotency_key: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    # what the job is doing besides its steps, e.g. {"kind": "eval", "step", "role", "done",
    # "total", "samples_per_s"}; None when nothing (set by the worker while it runs)
    activity: dict[str, Any] | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


@dataclass(frozen=True)
class EventRecord:
    id: int  # monotonically increasing per store; usable as SSE Last-Event-ID
    job_id: str
    kind: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None


@dataclass(frozen=True)
class CheckpointRecord:
    job_id: str
    step: int
    uri: str
    created_at: datetime
