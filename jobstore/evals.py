"""Eval runs in the store: the ``evals`` table, its record and the queries (a :class:`Store` mixin).

An eval scores a finished job's adapter (the final one or a checkpoint's) on a benchmark; its row
holds the request (``config``), the outcome (``results``: the benchmark summaries) and its state:
``queued -> running -> succeeded | failed`` (``queued -> failed`` when it cannot even be
enqueued). Each change is one conditional UPDATE, like the jobs' state machine. A worker holds a
running eval under a lease (``lease_owner``, ``lease_expires_at``). A lost worker never leaves an
eval ``running`` for ever: a redelivered message may take over an eval whose lease ran out, and
the reaper (:meth:`EvalQueries.requeue_lost_evals`) puts it back to ``queued`` for another
attempt, or fails it with ``worker_lost`` once ``max_attempts`` runs were lost. A queued eval
whose message was lost is sent again (:meth:`EvalQueries.resend_stale_queued_evals`).

The table is defined on :data:`jobstore.tables.metadata` (the migrations create it: revisions
``0002_evals``, ``0003_eval_attempts``, ``0005_eval_progress``). Rows are deleted with their
job (``ON DELETE CASCADE``). The columns and the lease queries it shares with the pre-flights
are :mod:`jobstore.leased_tasks`'s; this module adds the results and the Idempotency-Key.
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
    FAILED,
    QUEUED,
    SUCCEEDED,
    IdempotencyConflict,
    JobError,
    JobNotFound,
    stored_error,
)
from jobstore.tables import JSONDoc

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Session

EVAL_STATUSES: tuple[str, ...] = TASK_STATUSES
EVAL_TERMINAL_STATUSES: frozenset[str] = frozenset({SUCCEEDED, FAILED})
EVAL_MAX_ATTEMPTS = 3

evals = task_table(
    "evals",
    sa.Column("results", JSONDoc, nullable=True),
    sa.Column("idempotency_key", sa.String(255), nullable=True),
    sa.Column("request_hash", sa.String(128), nullable=True),
    sa.Index(None, "tenant_id", "created_at"),
    sa.Index(None, "tenant_id", "idempotency_key", unique=True),
)


def new_eval_id() -> str:
    return new_id("eval")


@dataclass(frozen=True)
class EvalRecord:
    id: str
    tenant_id: str
    job_id: str
    status: str
    config: dict[str, Any]
    results: dict[str, Any] | None
    error: JobError | None
    lease_owner: str | None
    lease_expires_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempt: int = 1
    progress: dict[str, Any] | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in EVAL_TERMINAL_STATUSES


def _eval_record(row: Row[Any]) -> EvalRecord:
    m = row._mapping
    return EvalRecord(
        id=m["id"],
        tenant_id=m["tenant_id"],
        job_id=m["job_id"],
        status=m["status"],
        config=dict(m["config"] or {}),
        results=dict(m["results"]) if m["results"] is not None else None,
        error=stored_error(m),
        lease_owner=m["lease_owner"],
        lease_expires_at=m["lease_expires_at"],
        created_at=m["created_at"],
        started_at=m["started_at"],
        finished_at=m["finished_at"],
        attempt=m["attempt"],
        progress=dict(m["progress"]) if m["progress"] is not None else None,
    )


_TASKS = LeasedTasks(evals, "eval")


class EvalQueries:
    """The eval queries of :class:`jobstore.Store` (mixed in; uses its sessions)."""

    if TYPE_CHECKING:

        def _read(self) -> AbstractContextManager[Connection]: ...

        def _write(self) -> AbstractContextManager[Session]: ...

        def _insert(self, table: sa.Table) -> Any: ...

    def create_eval(self, tenant_id: str, job_id: str, *, config: dict[str, Any]) -> EvalRecord:
        """A new ``queued`` eval of ``job_id``; :class:`JobNotFound` if the job does not exist."""
        return self.create_eval_once(tenant_id, job_id, config=config)[0]

    def create_eval_once(
        self,
        tenant_id: str,
        job_id: str,
        *,
        config: dict[str, Any],
        idempotency_key: str | None = None,
        request_hash: str | None = None,
    ) -> tuple[EvalRecord, bool]:
        """``(eval, True)`` for a new ``queued`` eval of ``job_id``.

        With an ``idempotency_key`` this tenant already used: ``(that eval, False)`` when
        ``request_hash`` equals the one stored with it, else :class:`IdempotencyConflict`; two
        concurrent creates with one key make one eval (the unique index plus ``ON CONFLICT DO
        NOTHING`` decide, as for jobs). :class:`JobNotFound` if the job does not exist.
        """
        insert = (
            self._insert(evals)
            .values(
                id=new_eval_id(),
                tenant_id=tenant_id,
                job_id=job_id,
                status=QUEUED,
                config=config,
                created_at=utc_now(),
                idempotency_key=idempotency_key,
                request_hash=request_hash if idempotency_key is not None else None,
            )
            .on_conflict_do_nothing(index_elements=["tenant_id", "idempotency_key"])
            .returning(*evals.c)
        )
        try:
            with self._write() as session:
                row = session.execute(insert).first()
        except IntegrityError as exc:  # the only other constraint that can fail: the job
            raise JobNotFound(job_id) from exc
        if row is not None:
            return _eval_record(row), True
        with self._read() as connection:  # the key is taken (by an earlier or concurrent call)
            row = connection.execute(
                sa.select(evals).where(
                    evals.c.tenant_id == tenant_id, evals.c.idempotency_key == idempotency_key
                )
            ).one()
        if row._mapping["request_hash"] != request_hash:
            raise IdempotencyConflict(idempotency_key, row._mapping["id"], kind="eval")
        return _eval_record(row), False

    def eval_by_idempotency_key(self, tenant_id: str, idempotency_key: str) -> EvalRecord | None:
        """The tenant's eval made with this Idempotency-Key, if any."""
        query = sa.select(evals).where(
            evals.c.tenant_id == tenant_id, evals.c.idempotency_key == idempotency_key
        )
        with self._read() as connection:
            row = connection.execute(query).first()
        return None if row is None else _eval_record(row)

    def get_eval(self, eval_id: str, tenant_id: str | None = None) -> EvalRecord | None:
        """The eval, or ``None`` if it does not exist (or belongs to another tenant)."""
        query = _TASKS.select(evals.c.id == eval_id, tenant_id=tenant_id)
        with self._read() as session:
            row = session.execute(query).first()
        return None if row is None else _eval_record(row)

    def list_evals(self, job_id: str, *, tenant_id: str | None = None) -> list[EvalRecord]:
        """The job's evals, oldest first."""
        query = _TASKS.select(evals.c.job_id == job_id, tenant_id=tenant_id).order_by(
            evals.c.created_at, evals.c.id
        )
        with self._read() as session:
            return [_eval_record(row) for row in session.execute(query)]

    def claim_eval(
        self,
        eval_id: str,
        worker_id: str,
        *,
        lease_seconds: float = 300.0,
        max_attempts: int = EVAL_MAX_ATTEMPTS,
    ) -> EvalRecord | None:
        """queued -> running for ``worker_id``, or take over a running eval whose lease expired.

        A takeover is a new attempt (``attempt + 1``), allowed while attempts are left. ``None``
        when the eval is finished, running under a live lease of another worker, or out of
        attempts (the reaper fails it).
        """
        with self._write() as session:
            row = _TASKS.claim(
                session, eval_id, worker_id, lease_seconds=lease_seconds, max_attempts=max_attempts
            )
        return None if row is None else _eval_record(row)

    def renew_eval_lease(self, eval_id: str, worker_id: str, *, lease_seconds: float) -> bool:
        """Extend the lease of a running eval held by ``worker_id``; False if it lost it."""
        with self._write() as session:
            return _TASKS.renew_lease(session, eval_id, worker_id, lease_seconds=lease_seconds)

    def set_eval_progress(self, eval_id: str, worker_id: str, progress: dict[str, Any]) -> bool:
        """Record a running eval's progress (lease owner only); False if it is not its own."""
        with self._write() as session:
            return _TASKS.update(session, _TASKS.held_by(eval_id, worker_id), progress=progress)

    def finish_eval(
        self, eval_id: str, *, results: dict[str, Any], worker_id: str | None = None
    ) -> bool:
        """running -> succeeded with ``results`` (only for the lease owner if ``worker_id``)."""
        with self._write() as session:
            return _TASKS.finish(session, eval_id, worker_id, results=results)

    def discard_unqueued_eval(self, eval_id: str) -> bool:
        """Delete an eval whose message could not be sent, if it is still ``queued`` and never
        started (the submission is answered 503 and leaves nothing behind)."""
        with self._write() as session:
            return _TASKS.discard_unqueued(session, eval_id)

    def fail_eval(self, eval_id: str, *, error: JobError, worker_id: str | None = None) -> bool:
        """queued|running -> failed with ``error`` (only for the lease owner if ``worker_id``)."""
        with self._write() as session:
            return _TASKS.fail(session, eval_id, error, worker_id)

    def requeue_lost_evals(
        self, *, now: datetime | None = None, max_attempts: int = EVAL_MAX_ATTEMPTS
    ) -> list[str]:
        """Take back running evals whose worker stopped renewing the lease (expired before ``now``).

        With attempts left: ``queued`` again with ``attempt + 1`` and the lease cleared; the ids
        are returned for the caller to enqueue. On the last attempt: ``failed`` with
        ``worker_lost`` (a worker that dies on every try, out of memory for instance, must not be
        retried for ever).
        """
        with self._write() as session:
            return _TASKS.requeue_lost(session, now=now or utc_now(), max_attempts=max_attempts)

    def resend_stale_queued_evals(
        self, *, older_than: timedelta, now: datetime | None = None
    ) -> list[str]:
        """Queued evals not created or re-sent within ``older_than``: their message may be lost.

        Marks each as re-sent now (so it is returned at most once per ``older_than``) and returns
        the ids for the caller to enqueue again; a duplicate message is skipped by the claim.
        """
        with self._write() as session:
            return _TASKS.resend_stale_queued(session, older_than=older_than, now=now or utc_now())
