"""The lease-and-retry state machine shared by a job's sub-tasks (evals, pre-flights).

A sub-task row lives in its own table with the columns ``id``, ``status``, ``lease_owner``,
``lease_expires_at``, ``attempt``, ``progress``, ``error_code``, ``error_message``,
``error_category``, ``created_at``, ``started_at``, ``finished_at`` and ``resent_at``; its
states are ``queued -> running -> succeeded | failed`` (``queued -> failed`` when it cannot
even be enqueued). :class:`LeasedTasks` holds the queries over one such table, each one
conditional statement run in the caller's write session:

* a worker claims a queued row under a lease, or takes over a running one whose lease expired
  (a new ``attempt``, while attempts are left), renews the lease, records progress, and ends it
  with one terminal write (``finish`` / ``fail``, for the lease owner);
* the reaper puts a row whose worker was lost back to ``queued`` (``attempt + 1``), or fails it
  with ``worker_lost`` after ``max_attempts``, and sends again a queued row whose message may
  be lost;
* a row whose message could not be sent is deleted while it is still queued and never started.

The per-kind mixins (:mod:`jobstore.evals`, :mod:`jobstore.preflights`) keep the public method
names of :class:`jobstore.Store` and turn the returned rows into their records.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from jobstore.records import FAILED, QUEUED, RUNNING, SUCCEEDED, JobError
from jobstore.tables import JSONDoc, UTCDateTime, metadata

if TYPE_CHECKING:
    from sqlalchemy.engine import Row
    from sqlalchemy.orm import Session


TASK_STATUSES: tuple[str, ...] = (QUEUED, RUNNING, SUCCEEDED, FAILED)


def task_table(name: str, *extra: sa.SchemaItem) -> sa.Table:
    """The sub-task table ``name`` on :data:`jobstore.tables.metadata`: the columns, the status
    check and the ``(job_id, created_at)`` index every sub-task has, then ``extra`` (its
    outcome's column, other columns and indexes). Rows belong to a tenant and are deleted with
    their job (``ON DELETE CASCADE``); ``progress`` is the running task's progress document."""
    statuses = ", ".join(f"'{s}'" for s in TASK_STATUSES)
    return sa.Table(
        name,
        metadata,
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("tenant_id", sa.String(40), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column(
            "job_id", sa.String(40), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("config", JSONDoc, nullable=False),
        sa.Column("progress", JSONDoc, nullable=True),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("error_category", sa.String(16), nullable=True),
        sa.Column("lease_owner", sa.String(200), nullable=True),
        sa.Column("lease_expires_at", UTCDateTime(), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False, server_default=sa.text("1")),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("resent_at", UTCDateTime(), nullable=True),
        sa.CheckConstraint(f"status IN ({statuses})", name="status"),
        sa.Index(None, "job_id", "created_at"),
        *extra,
    )


def utc_now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class LeasedTasks:
    """The lease queries over ``table``; ``noun`` names one row in messages (``"eval"``)."""

    table: sa.Table
    noun: str

    def select(
        self, *where: sa.ColumnElement[bool], tenant_id: str | None = None
    ) -> sa.Select[Any]:
        """SELECT the rows matching ``where``, only the tenant's if ``tenant_id`` is given."""
        query = sa.select(self.table).where(*where)
        if tenant_id is not None:
            query = query.where(self.table.c.tenant_id == tenant_id)
        return query

    def claim(
        self,
        session: Session,
        task_id: str,
        worker_id: str,
        *,
        lease_seconds: float,
        max_attempts: int,
    ) -> Row[Any] | None:
        """queued -> running for ``worker_id``, or a takeover of a running row whose lease
        expired (``attempt + 1``, while ``attempt < max_attempts``); the progress is cleared (a
        new attempt starts over). The updated row, or ``None`` when it is not claimable."""
        c = self.table.c
        now = utc_now()
        lost = sa.and_(c.status == RUNNING, c.lease_expires_at < sa.literal(now, UTCDateTime()))
        claimable = sa.or_(c.status == QUEUED, sa.and_(lost, c.attempt < max_attempts))
        return session.execute(
            sa.update(self.table)
            .where(c.id == task_id, claimable)
            .values(
                status=RUNNING,
                lease_owner=worker_id,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                started_at=sa.func.coalesce(c.started_at, sa.literal(now, UTCDateTime())),
                progress=None,
                attempt=sa.case((lost, c.attempt + 1), else_=c.attempt),
            )
            .returning(*self.table.c)
        ).first()

    def held_by(self, task_id: str, worker_id: str) -> list[sa.ColumnElement[bool]]:
        """The conditions "``task_id`` is running under ``worker_id``'s lease"."""
        c = self.table.c
        return [c.id == task_id, c.status == RUNNING, c.lease_owner == worker_id]

    def renew_lease(
        self, session: Session, task_id: str, worker_id: str, *, lease_seconds: float
    ) -> bool:
        """Extend the lease of a running row held by ``worker_id``; False if it lost it."""
        return self.update(
            session,
            self.held_by(task_id, worker_id),
            lease_expires_at=utc_now() + timedelta(seconds=lease_seconds),
        )

    def finish(self, session: Session, task_id: str, worker_id: str | None, **outcome: Any) -> bool:
        """running -> succeeded with the ``outcome`` columns (lease owner only if
        ``worker_id``); False if it was not running (or not held by ``worker_id``)."""
        return self.update(
            session,
            self._of(task_id, self.table.c.status == RUNNING, worker_id),
            status=SUCCEEDED,
            **outcome,
            finished_at=utc_now(),
            lease_expires_at=None,
        )

    def fail(self, session: Session, task_id: str, error: JobError, worker_id: str | None) -> bool:
        """queued|running -> failed with ``error`` (lease owner only if ``worker_id``)."""
        return self.update(
            session,
            self._of(task_id, self.table.c.status.in_((QUEUED, RUNNING)), worker_id),
            status=FAILED,
            error_code=error.code,
            error_message=error.message,
            error_category=error.category,
            finished_at=utc_now(),
            lease_expires_at=None,
        )

    def discard_unqueued(self, session: Session, task_id: str) -> bool:
        """Delete the row if it is still ``queued`` and never started; False otherwise."""
        c = self.table.c
        deleted = session.execute(
            sa.delete(self.table)
            .where(c.id == task_id, c.status == QUEUED, c.started_at.is_(None))
            .returning(c.id)
        ).first()
        return deleted is not None

    def requeue_lost(self, session: Session, *, now: datetime, max_attempts: int) -> list[str]:
        """Running rows whose lease expired before ``now``: ``queued`` again with
        ``attempt + 1`` and the lease cleared (their ids returned, sorted, for the caller to
        enqueue), or, on the last attempt, ``failed`` with ``worker_lost``."""
        c = self.table.c
        expired = [c.status == RUNNING, c.lease_expires_at < sa.literal(now, UTCDateTime())]
        requeued = session.execute(
            sa.update(self.table)
            .where(*expired, c.attempt < max_attempts)
            .values(
                status=QUEUED,
                attempt=c.attempt + 1,
                lease_owner=None,
                lease_expires_at=None,
                resent_at=now,
            )
            .returning(c.id)
        ).all()
        session.execute(
            sa.update(self.table)
            .where(*expired, c.attempt >= max_attempts)
            .values(
                status=FAILED,
                error_code="worker_lost",
                error_message=(
                    f"the worker running this {self.noun} was lost on each of its "
                    f"{max_attempts} attempts (killed, out of memory, or the machine went away)"
                ),
                error_category="system",
                finished_at=now,
                lease_expires_at=None,
            )
        )
        return sorted(row.id for row in requeued)

    def resend_stale_queued(
        self, session: Session, *, older_than: timedelta, now: datetime
    ) -> list[str]:
        """Queued rows not created or re-sent within ``older_than`` before ``now`` (their
        message may be lost): marked re-sent at ``now`` (so each is returned at most once per
        ``older_than``); their ids, sorted, for the caller to enqueue again."""
        c = self.table.c
        last_sent = sa.func.coalesce(c.resent_at, c.created_at)
        rows = session.execute(
            sa.update(self.table)
            .where(c.status == QUEUED, last_sent < sa.literal(now - older_than, UTCDateTime()))
            .values(resent_at=now)
            .returning(c.id)
        ).all()
        return sorted(row.id for row in rows)

    def _of(
        self, task_id: str, in_status: sa.ColumnElement[bool], worker_id: str | None
    ) -> list[sa.ColumnElement[bool]]:
        """``task_id`` in a status (``in_status``), held by ``worker_id`` unless it is None."""
        c = self.table.c
        where = [c.id == task_id, in_status]
        if worker_id is not None:
            where.append(c.lease_owner == worker_id)
        return where

    def update(self, session: Session, where: list[sa.ColumnElement[bool]], **values: Any) -> bool:
        """UPDATE the rows matching ``where`` with ``values``; True if one matched."""
        row = session.execute(
            sa.update(self.table).where(*where).values(**values).returning(self.table.c.id)
        ).first()
        return row is not None
