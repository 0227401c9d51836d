"""Pre-flights in the store: the ``preflights`` table, its record and the queries (a
:class:`Store` mixin).

A pre-flight (``POST /jobs/{id}/preflight``) measures, before or beside a job's training, the
privileged gap, the divergence profile and the alignment checks of the job's spec
(:mod:`opsd_engine.preflight`). Its row holds the request (``config``: sample sizes), the
outcome (``report``: the engine's report document) and its state, ``queued -> running ->
succeeded | failed``, each change one conditional UPDATE like the evals'. A worker holds a
running pre-flight under a lease; a redelivered message may take over one whose lease ran out
(a new ``attempt``), and the reaper puts one whose worker was lost back to ``queued``
(:meth:`PreflightQueries.requeue_lost_preflights`; ``failed`` with ``worker_lost`` after
``max_attempts``) and sends a queued one whose message may be lost again
(:meth:`PreflightQueries.resend_stale_queued_preflights`). Rows are deleted with their job
(``ON DELETE CASCADE``). The table is created by the migration ``0006_preflight``; its
columns and lease queries are those of every sub-task (:mod:`jobstore.leased_tasks`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError

from jobstore.ids import new_id
from jobstore.leased_tasks import TASK_STATUSES, LeasedTasks, task_table, utc_now
from jobstore.records import (
    QUEUED,
    JobError,
    JobNotFound,
    stored_error,
)
from jobstore.tables import JSONDoc

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Session

PREFLIGHT_STATUSES: tuple[str, ...] = TASK_STATUSES
PREFLIGHT_MAX_ATTEMPTS = 3

preflights = task_table("preflights", sa.Column("report", JSONDoc, nullable=True))


@dataclass(frozen=True)
class PreflightRecord:
    id: str
    tenant_id: str
    job_id: str
    status: str
    config: dict[str, Any]
    report: dict[str, Any] | None
    progress: dict[str, Any] | None
    error: JobError | None
    attempt: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


def _record(row: Row[Any]) -> PreflightRecord:
    m = row._mapping
    return PreflightRecord(
        id=m["id"],
        tenant_id=m["tenant_id"],
        job_id=m["job_id"],
        status=m["status"],
        config=dict(m["config"] or {}),
        report=dict(m["report"]) if m["report"] is not None else None,
        progress=dict(m["progress"]) if m["progress"] is not None else None,
        error=stored_error(m),
        attempt=m["attempt"],
        created_at=m["created_at"],
        started_at=m["started_at"],
        finished_at=m["finished_at"],
    )


_TASKS = LeasedTasks(preflights, "pre-flight")


class PreflightQueries:
    """The pre-flight queries of :class:`jobstore.Store` (mixed in; uses its sessions)."""

    if TYPE_CHECKING:

        def _read(self) -> AbstractContextManager[Connection]: ...

        def _write(self) -> AbstractContextManager[Session]: ...

    def create_preflight(
        self, tenant_id: str, job_id: str, *, config: dict[str, Any]
    ) -> PreflightRecord:
        """A new ``queued`` pre-flight of ``job_id``; :class:`JobNotFound` if there is no job."""
        values = {
            "id": new_id("pf"),
            "tenant_id": tenant_id,
            "job_id": job_id,
            "status": QUEUED,
            "config": config,
            "created_at": utc_now(),
        }
        try:
            with self._write() as session:
                row = session.execute(
                    sa.insert(preflights).values(**values).returning(*preflights.c)
                ).one()
        except IntegrityError as exc:
            raise JobNotFound(job_id) from exc
        return _record(row)

    def get_preflight(
        self, preflight_id: str, *, tenant_id: str | None = None
    ) -> PreflightRecord | None:
        """The pre-flight, or ``None`` (also when it belongs to another tenant)."""
        query = _TASKS.select(preflights.c.id == preflight_id, tenant_id=tenant_id)
        with self._read() as connection:
            row = connection.execute(query).first()
        return None if row is None else _record(row)

    def list_preflights(
        self, job_id: str, *, tenant_id: str | None = None, limit: int = 100
    ) -> list[PreflightRecord]:
        """The job's most recent ``limit`` pre-flights, oldest first."""
        query = _TASKS.select(preflights.c.job_id == job_id, tenant_id=tenant_id)
        query = query.order_by(preflights.c.created_at.desc(), preflights.c.id.desc()).limit(limit)
        with self._read() as connection:
            rows = connection.execute(query).all()
        return [_record(row) for row in reversed(rows)]

    def latest_preflight(
        self, job_id: str, *, tenant_id: str | None = None
    ) -> PreflightRecord | None:
        """The job's most recent pre-flight, or ``None``."""
        latest = self.list_preflights(job_id, tenant_id=tenant_id, limit=1)
        return latest[0] if latest else None

    def claim_preflight(
        self,
        preflight_id: str,
        worker_id: str,
        *,
        lease_seconds: float = 300.0,
        max_attempts: int = PREFLIGHT_MAX_ATTEMPTS,
    ) -> PreflightRecord | None:
        """queued -> running for ``worker_id``, or a takeover of a running one whose lease
        expired (``attempt + 1``, while attempts are left); ``None`` when not claimable."""
        with self._write() as session:
            row = _TASKS.claim(
                session,
                preflight_id,
                worker_id,
                lease_seconds=lease_seconds,
                max_attempts=max_attempts,
            )
        return None if row is None else _record(row)

    def renew_preflight_lease(
        self, preflight_id: str, worker_id: str, *, lease_seconds: float
    ) -> bool:
        """Extend the lease of a running pre-flight held by ``worker_id``; False if it lost it."""
        with self._write() as session:
            return _TASKS.renew_lease(session, preflight_id, worker_id, lease_seconds=lease_seconds)

    def set_preflight_progress(
        self, preflight_id: str, worker_id: str, progress: dict[str, Any]
    ) -> bool:
        """Record a running pre-flight's progress (lease owner only)."""
        with self._write() as session:
            return _TASKS.update(
                session, _TASKS.held_by(preflight_id, worker_id), progress=progress
            )

    def finish_preflight(
        self, preflight_id: str, *, report: dict[str, Any], worker_id: str
    ) -> bool:
        """running -> succeeded with ``report`` (lease owner only)."""
        with self._write() as session:
            return _TASKS.finish(session, preflight_id, worker_id, report=report)

    def fail_preflight(
        self, preflight_id: str, *, error: JobError, worker_id: str | None = None
    ) -> bool:
        """queued|running -> failed with ``error`` (lease owner only if ``worker_id``)."""
        with self._write() as session:
            return _TASKS.fail(session, preflight_id, error, worker_id)

    def discard_unqueued_preflight(self, preflight_id: str) -> bool:
        """Delete a pre-flight whose message could not be sent (still queued, never started)."""
        with self._write() as session:
            return _TASKS.discard_unqueued(session, preflight_id)

    def requeue_lost_preflights(
        self, *, now: datetime | None = None, max_attempts: int = PREFLIGHT_MAX_ATTEMPTS
    ) -> list[str]:
        """Running pre-flights whose lease expired before ``now``: ``queued`` again with
        ``attempt + 1`` (ids returned, for the caller to enqueue), or ``failed`` with
        ``worker_lost`` on the last attempt."""
        with self._write() as session:
            return _TASKS.requeue_lost(session, now=now or utc_now(), max_attempts=max_attempts)

    def resend_stale_queued_preflights(
        self, *, older_than: timedelta, now: datetime | None = None
    ) -> list[str]:
        """Queued pre-flights not created or re-sent within ``older_than`` (their message may be
        lost): marked re-sent now, ids returned for the caller to enqueue again."""
        with self._write() as session:
            return _TASKS.resend_stale_queued(session, older_than=older_than, now=now or utc_now())
