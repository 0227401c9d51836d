"""The store: every query the API and the workers run, and the job state machine.

:class:`Store` owns tenants and API keys, jobs and their status transitions, and the per-job
records (events, metrics, checkpoints). It talks to PostgreSQL or a SQLite file through short
transactions and returns the plain records of :mod:`jobstore.records`, never ORM objects.

State machine (``jobstore.records.TRANSITIONS``): every status change is ONE conditional
``UPDATE … WHERE id = :id AND status IN (…) [AND lease_owner = :worker] RETURNING …`` whose
matched row decides (none: the transition is refused), plus an event row in the same
transaction. Terminal states are never in any ``IN (…)`` list, so
they never change. Transition events are named after the new status (``queued``, ``running``,
``cancelling``, ``cancelled``, ``succeeded``, ``failed``) except ``requeued`` (a lost worker's job
going back to ``queued``).

Leases: a worker owns a running job while ``lease_owner`` is its id. It renews the lease with
:meth:`Store.heartbeat`; :meth:`Store.requeue_expired` takes back jobs whose lease ran out. A
lease that expired but was not taken back yet is still renewed by its owner's heartbeat (both are
conditional updates, so whichever commits first wins).

Metrics: a step replayed after a resume is ignored (``ON CONFLICT DO NOTHING`` on
``(job_id, name, step)``); NaN and ±inf values are skipped, not stored (JSON cannot carry them;
a diverging run is reported through its events). ``query_metrics(max_points=N)`` downsamples in
SQL, per metric name, to at most N points with the first and last kept as they are (the rest
averaged over equal step ranges; see :mod:`jobstore.metric_queries`).

Timestamps are timezone-aware UTC, taken from this process's clock.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine, Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from jobstore import metric_queries
from jobstore.cursor import decode_cursor, encode_cursor
from jobstore.db import Executor, create_engine, read_engine, session_factory, write_engine
from jobstore.evals import EvalQueries
from jobstore.ids import new_api_key_id, new_job_id, new_tenant_id
from jobstore.preflights import PreflightQueries
from jobstore.records import (
    CANCELLED,
    CANCELLING,
    FAILED,
    JOB_STATUSES,
    LIVE_STATUSES,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TRANSITIONS,
    CheckpointRecord,
    EventRecord,
    IdempotencyConflict,
    JobError,
    JobNotFound,
    JobRecord,
    StoreError,
    TenantNotFound,
    TenantRecord,
    stored_error,
)
from jobstore.tables import (
    JSONDoc,
    UTCDateTime,
    api_keys,
    checkpoints,
    dispatch_turns,
    job_events,
    jobs,
    metrics,
    tenants,
)
from jobstore.tenancy import TenancyQueries
from jobstore.usage import UsageQueries, job_usage, usage_rows

API_KEY_PREFIX = "opsd"
MAX_INT32 = 2**31 - 1
LAST_USED_RESOLUTION = timedelta(minutes=1)
_MAX_API_KEY_LENGTH = 256
# A digest compared against when the key's prefix is unknown, so both paths hash and compare.
_DUMMY_DIGEST = hashlib.sha256(b"opsd-unknown-key").hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


def _ts(value: datetime) -> sa.BindParameter[datetime]:
    """A bound timestamp with the store's UTC type (for use inside SQL expressions)."""
    return sa.literal(value, UTCDateTime())


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _parse_api_key(api_key: object) -> tuple[str, str] | None:
    """``(prefix, secret)`` of ``opsd_<prefix>_<secret>``; ``None`` if it is not of that shape."""
    if not isinstance(api_key, str) or len(api_key) > _MAX_API_KEY_LENGTH:
        return None
    parts = api_key.split("_", 2)
    if len(parts) != 3 or parts[0] != API_KEY_PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


def _failure_values(error: JobError, now: datetime) -> dict[str, Any]:
    """The columns a transition to ``failed`` sets."""
    return {
        "error_code": error.code,
        "error_message": error.message,
        "error_category": error.category,
        "finished_at": now,
        "lease_expires_at": None,
    }


def spec_gpus(spec: Any) -> int:
    """``resources.gpus`` of a job spec (a dict); 1 when absent (specs from before resources)."""
    resources = spec.get("resources") if isinstance(spec, dict) else None
    gpus = resources.get("gpus") if isinstance(resources, dict) else None
    return gpus if isinstance(gpus, int) and not isinstance(gpus, bool) and gpus >= 1 else 1


def _tenant_record(row: Row[Any]) -> TenantRecord:
    m = row._mapping
    return TenantRecord(id=m["id"], name=m["name"], created_at=m["created_at"])


def _job_record(row: Row[Any]) -> JobRecord:
    m = row._mapping
    return JobRecord(
        id=m["id"],
        tenant_id=m["tenant_id"],
        status=m["status"],
        spec=dict(m["spec"] or {}),
        metadata=dict(m["metadata"] or {}),
        attempt=m["attempt"],
        max_attempts=m["max_attempts"],
        lease_owner=m["lease_owner"],
        lease_expires_at=m["lease_expires_at"],
        progress_step=m["progress_step"],
        total_steps=m["total_steps"],
        error=stored_error(m),
        adapter_uri=m["adapter_uri"],
        idempotency_key=m["idempotency_key"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        started_at=m["started_at"],
        finished_at=m["finished_at"],
        activity=dict(m["activity"]) if m["activity"] is not None else None,
    )


def _event_record(row: Row[Any]) -> EventRecord:
    m = row._mapping
    return EventRecord(
        id=m["id"],
        job_id=m["job_id"],
        kind=m["kind"],
        message=m["message"],
        data=dict(m["data"] or {}),
        created_at=m["created_at"],
    )


class Store(EvalQueries, PreflightQueries, TenancyQueries, UsageQueries):
    """The service's state on PostgreSQL (``postgresql+psycopg://…``) or SQLite (``sqlite:///…``).

    Thread-safe: every method opens its own short transaction from a pool. The schema must have
    been created with :func:`jobstore.migrate.upgrade`.
    """

    def __init__(self, database_url: str, *, echo: bool = False) -> None:
        self._engine = create_engine(database_url, echo=echo)
        self._dialect = self._engine.dialect.name
        self._autocommit = read_engine(self._engine)
        self._write_sessions = session_factory(write_engine(self._engine))
        # The hottest statements are built once: building and cache-keying a statement per call
        # costs more CPU than the round trip it makes.
        new_job_columns = (
            "id",
            "tenant_id",
            "status",
            "spec",
            "metadata",
            "attempt",
            "max_attempts",
            "progress_step",
            "idempotency_key",
            "request_hash",
            "created_at",
            "updated_at",
            "gpus",
        )
        self._insert_job = (
            self._insert(jobs)
            .values({c: sa.bindparam(c, type_=jobs.c[c].type) for c in new_job_columns})
            .on_conflict_do_nothing(index_elements=["tenant_id", "idempotency_key"])
            .returning(*jobs.c)
        )
        self._insert_event_row = sa.insert(job_events).returning(job_events.c.id)
        self._lock_job_events = sa.select(
            sa.func.pg_advisory_xact_lock(sa.func.hashtextextended(sa.bindparam("job_id"), 0))
        )
        # PostgreSQL: the job and its "queued" event in ONE statement (one round trip, atomic
        # on an autocommit connection); no event when the idempotency key already exists.
        new_job = self._insert_job.cte("new_job")
        queued_event = sa.select(
            new_job.c.id,
            sa.literal(QUEUED),
            sa.literal("job queued"),
            sa.literal({"attempt": 1}, JSONDoc),
            new_job.c.created_at,
        )
        new_event = (
            sa.insert(job_events)
            .from_select(["job_id", "kind", "message", "data", "created_at"], queued_event)
            .cte("new_event")
        )
        self._create_job_statement = sa.select(new_job).add_cte(new_event)
        self._select_job = sa.select(jobs).where(jobs.c.id == sa.bindparam("job_id"))
        self._select_tenant_job = self._select_job.where(
            jobs.c.tenant_id == sa.bindparam("tenant_id")
        )
        self._select_job_by_key = sa.select(jobs).where(
            jobs.c.tenant_id == sa.bindparam("tenant_id"),
            jobs.c.idempotency_key == sa.bindparam("idempotency_key"),
        )

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def dialect(self) -> str:
        """``"postgresql"`` or ``"sqlite"``."""
        return self._dialect

    def close(self) -> None:
        """Close the pooled connections (the store can still be used; it reconnects)."""
        self._engine.dispose()

    def ping(self) -> bool:
        """``SELECT 1``: True if the database answers, False on any error."""
        try:
            with self._engine.connect() as connection:
                connection.execute(sa.select(1)).scalar_one()
        except Exception:  # any failure means "not ready"; the caller only needs the bit
            return False
        return True

    # -- sessions -----------------------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        """A connection for reads: autocommit on PostgreSQL (each statement sees the latest
        commits; no read here needs two statements to agree), a deferred transaction on SQLite."""
        with self._autocommit.connect() as connection:
            if self._dialect == "sqlite":
                with connection.begin():
                    yield connection
            else:
                yield connection

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with self._write_sessions() as session, session.begin():
            yield session

    def _insert(self, table: sa.Table) -> Any:
        """The dialect's INSERT (it has ``on_conflict_do_nothing`` / ``on_conflict_do_update``).

        With ``ON CONFLICT DO NOTHING … RETURNING``, a returned row means "inserted".
        """
        return postgresql.insert(table) if self._dialect == "postgresql" else sqlite.insert(table)

    # -- tenants and API keys -----------------------------------------------------------------

    def get_or_create_tenant(self, name: str) -> TenantRecord:
        """The tenant called ``name``, created if it does not exist (race-safe)."""
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            raise ValueError("tenant name must be a non-empty string of at most 200 characters")
        query = sa.select(tenants).where(tenants.c.name == name)
        with self._read() as session:
            row = session.execute(query).first()
        if row is not None:
            return _tenant_record(row)
        with self._write() as session:
            session.execute(
                self._insert(tenants)
                .values(id=new_tenant_id(), name=name, created_at=_now())
                .on_conflict_do_nothing(index_elements=["name"])
            )
            return _tenant_record(session.execute(query).one())

    def get_tenant(self, tenant_id: str) -> TenantRecord | None:
        with self._read() as session:
            row = session.execute(sa.select(tenants).where(tenants.c.id == tenant_id)).first()
        return None if row is None else _tenant_record(row)

    def create_api_key(
        self, tenant_name: str, *, label: str | None = None, admin: bool = False
    ) -> str:
        """A new key ``opsd_<prefix>_<secret>`` for the tenant (created if needed); an
        ``admin`` key may also list and revoke every key.

        The key is returned in clear only here; the table keeps the prefix (a public id) and the
        SHA-256 of the secret.
        """
        tenant = self.get_or_create_tenant(tenant_name)
        for _ in range(5):
            prefix = secrets.token_hex(6)
            secret = secrets.token_urlsafe(32)
            with self._write() as session:
                inserted = session.execute(
                    self._insert(api_keys)
                    .values(
                        id=new_api_key_id(),
                        tenant_id=tenant.id,
                        prefix=prefix,
                        key_hash=_hash_secret(secret),
                        label=label,
                        admin=admin,
                        created_at=_now(),
                    )
                    .on_conflict_do_nothing(index_elements=["prefix"])
                    .returning(api_keys.c.id)
                ).first()
            if inserted is not None:
                return f"{API_KEY_PREFIX}_{prefix}_{secret}"
        raise StoreError("could not allocate a unique API key prefix")  # pragma: no cover

    def authenticate(self, api_key: str) -> TenantRecord | None:
        """The tenant of a valid, unrevoked key; ``None`` for a malformed, unknown or revoked one.

        The secret's hash is compared in constant time. ``last_used_at`` is written at most once
        per :data:`LAST_USED_RESOLUTION`, so authenticating is a read most of the time.
        """
        parsed = _parse_api_key(api_key)
        if parsed is None:
            return None
        prefix, secret = parsed
        digest = _hash_secret(secret)
        query = (
            sa.select(
                api_keys.c.id.label("key_id"),
                api_keys.c.key_hash,
                api_keys.c.revoked_at,
                api_keys.c.last_used_at,
                api_keys.c.admin,
                tenants.c.id,
                tenants.c.name,
                tenants.c.created_at,
            )
            .join_from(api_keys, tenants, api_keys.c.tenant_id == tenants.c.id)
            .where(api_keys.c.prefix == prefix)
        )
        with self._read() as session:
            row = session.execute(query).first()
        if row is None:
            hmac.compare_digest(digest, _DUMMY_DIGEST)
            return None
        if not hmac.compare_digest(row.key_hash, digest) or row.revoked_at is not None:
            return None
        now = _now()
        stale_before = now - LAST_USED_RESOLUTION
        if row.last_used_at is None or row.last_used_at < stale_before:
            with self._write() as session:
                session.execute(
                    sa.update(api_keys)
                    .where(
                        api_keys.c.id == row.key_id,
                        sa.or_(
                            api_keys.c.last_used_at.is_(None),
                            api_keys.c.last_used_at < stale_before,
                        ),
                    )
                    .values(last_used_at=now)
                )
        return TenantRecord(
            id=row.id,
            name=row.name,
            created_at=row.created_at,
            key_id=row.key_id,
            admin=bool(row.admin),
        )

    def revoke_api_key(self, key_or_prefix: str) -> bool:
        """Revoke a key given in full or by its prefix; False if unknown or already revoked."""
        parsed = _parse_api_key(key_or_prefix)
        prefix = parsed[0] if parsed is not None else key_or_prefix
        with self._write() as session:
            result = session.execute(
                sa.update(api_keys)
                .where(api_keys.c.prefix == prefix, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=_now())
            )
        return result.rowcount == 1

    def count_api_keys(self) -> int:
        """Number of API keys of all tenants, revoked ones included."""
        with self._read() as session:
            return session.execute(sa.select(sa.func.count()).select_from(api_keys)).scalar_one()

    # -- jobs ---------------------------------------------------------------------------------

    def create_job(
        self,
        tenant_id: str,
        *,
        spec: dict[str, Any],
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        max_attempts: int = 3,
    ) -> tuple[JobRecord, bool]:
        """A new ``queued`` job (attempt 1, event ``queued``) and True.

        With an ``idempotency_key`` already used by this tenant: ``(that job, False)`` if
        ``request_hash`` equals the one stored with it (``None == None``), else
        :class:`IdempotencyConflict`. Two concurrent creates with one key make one job (the
        unique ``(tenant_id, idempotency_key)`` plus ``ON CONFLICT DO NOTHING`` decide).
        """
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if idempotency_key is not None and not idempotency_key:
            raise ValueError("idempotency_key must be non-empty")
        now = _now()
        job_id = new_job_id()
        values = {
            "id": job_id,
            "tenant_id": tenant_id,
            "status": QUEUED,
            "spec": spec,
            "metadata": metadata or {},
            "attempt": 1,
            "max_attempts": max_attempts,
            "progress_step": 0,
            "idempotency_key": idempotency_key,
            "request_hash": request_hash,
            "created_at": now,
            "updated_at": now,
            "gpus": spec_gpus(spec),
        }
        try:
            if self._dialect == "postgresql":
                with self._autocommit.connect() as connection:
                    row = connection.execute(self._create_job_statement, values).first()
            else:
                with self._write() as session:
                    row = session.execute(self._insert_job, values).first()
                    if row is not None:
                        queued = {"attempt": 1}
                        self._insert_event(session, job_id, QUEUED, "job queued", queued, now)
        except IntegrityError as exc:  # the only other constraint that can fail: the tenant
            raise TenantNotFound(f"tenant {tenant_id!r} does not exist") from exc
        if row is not None:
            return _job_record(row), True
        # The key is taken: by an earlier request, or by a concurrent one (PostgreSQL made our
        # insert wait for it to commit); the job is visible now.
        assert idempotency_key is not None
        with self._read() as session:
            existing = self._job_by_key(session, tenant_id, idempotency_key)
        if existing is None:  # pragma: no cover - the conflicting row cannot vanish
            raise StoreError(f"job for idempotency key {idempotency_key!r} vanished")
        return self._replayed(existing, idempotency_key, request_hash)

    @staticmethod
    def _replayed(
        row: Row[Any], idempotency_key: str, request_hash: str | None
    ) -> tuple[JobRecord, bool]:
        job = _job_record(row)
        if row._mapping["request_hash"] != request_hash:
            raise IdempotencyConflict(idempotency_key, job.id)
        return job, False

    def _job_by_key(
        self, session: Executor, tenant_id: str, idempotency_key: str
    ) -> Row[Any] | None:
        params = {"tenant_id": tenant_id, "idempotency_key": idempotency_key}
        return session.execute(self._select_job_by_key, params).first()

    def get_job(self, job_id: str, *, tenant_id: str | None = None) -> JobRecord | None:
        """The job, or ``None`` if it does not exist (or belongs to another tenant)."""
        query, params = self._select_job, {"job_id": job_id}
        if tenant_id is not None:
            query, params = self._select_tenant_job, {**params, "tenant_id": tenant_id}
        with self._read() as session:
            row = session.execute(query, params).first()
        return None if row is None else _job_record(row)

    def list_jobs(
        self,
        tenant_id: str,
        *,
        status: str | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> tuple[list[JobRecord], str | None]:
        """One page of the tenant's jobs, newest first, and the cursor of the next page.

        The cursor is opaque (keyset on ``(created_at, id)``, stable under inserts); it is
        ``None`` on the last page. A cursor this store did not issue raises InvalidCursor.
        """
        if limit < 1:
            raise ValueError("limit must be >= 1")
        if status is not None and status not in JOB_STATUSES:
            raise ValueError(f"unknown status {status!r}; one of {', '.join(JOB_STATUSES)}")
        query = sa.select(jobs).where(jobs.c.tenant_id == tenant_id)
        if status is not None:
            query = query.where(jobs.c.status == status)
        if cursor is not None:
            created_at, job_id = decode_cursor(cursor)
            query = query.where(
                sa.tuple_(jobs.c.created_at, jobs.c.id)
                < sa.tuple_(_ts(created_at), sa.literal(job_id, sa.String()))
            )
        query = query.order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit + 1)
        with self._read() as session:
            page = [_job_record(row) for row in session.execute(query)]
        if len(page) <= limit:
            return page, None
        page = page[:limit]
        return page, encode_cursor(page[-1].created_at, page[-1].id)

    def request_cancel(self, job_id: str, *, tenant_id: str | None = None) -> JobRecord | None:
        """Ask to cancel: queued -> cancelled, running -> cancelling; other states unchanged.

        Returns the job as it is afterwards, or ``None`` if not found (for that tenant).
        """
        owned = [jobs.c.id == job_id]
        if tenant_id is not None:
            owned.append(jobs.c.tenant_id == tenant_id)
        now = _now()
        with self._write() as session:
            cancelled = self._transition(
                session,
                job_id,
                (QUEUED,),
                CANCELLED,
                now,
                "cancelled before it started",
                extra_where=owned,
                values={"finished_at": now},
            )
            if cancelled is None:
                self._transition(
                    session,
                    job_id,
                    (RUNNING,),
                    CANCELLING,
                    now,
                    "cancellation requested",
                    extra_where=owned,
                )
            row = session.execute(sa.select(jobs).where(*owned)).first()
        return None if row is None else _job_record(row)

    # -- worker side: leases and transitions --------------------------------------------------

    def _transition(
        self,
        session: Session,
        job_id: str,
        from_statuses: tuple[str, ...],
        to_status: str,
        now: datetime,
        message: str | Callable[[JobRecord], str],
        *,
        worker_id: str | None = None,
        values: dict[str, Any] | None = None,
        extra_where: list[sa.ColumnElement[bool]] | None = None,
        event_kind: str | None = None,
        event_data: dict[str, Any] | Callable[[JobRecord], dict[str, Any]] | None = None,
    ) -> JobRecord | None:
        """One conditional UPDATE plus an event row; the job after it, or None if it matched
        nothing (wrong status, not the lease owner, …). ``message`` and ``event_data`` may be
        functions of the updated job.
        """
        if any(to_status not in TRANSITIONS[s] for s in from_statuses):
            raise AssertionError(f"transition {from_statuses} -> {to_status} is not allowed")
        where = [jobs.c.id == job_id, jobs.c.status.in_(from_statuses), *(extra_where or [])]
        if worker_id is not None:
            where.append(jobs.c.lease_owner == worker_id)
        row = session.execute(
            sa.update(jobs)
            .where(*where)
            .values(status=to_status, updated_at=now, **(values or {}))
            .returning(*jobs.c)
        ).first()
        if row is None:
            return None
        job = _job_record(row)
        text = message(job) if callable(message) else message
        data = event_data(job) if callable(event_data) else event_data
        self._insert_event(session, job_id, event_kind or to_status, text, data, now)
        return job

    def claim_job(self, job_id: str, worker_id: str, *, lease_seconds: float) -> JobRecord | None:
        """queued -> running for ``worker_id`` with a lease; ``None`` if the job is not queued."""
        now = _now()
        with self._write() as session:
            return self._claim(session, job_id, worker_id, lease_seconds, now)

    def _claim(
        self, session: Session, job_id: str, worker_id: str, lease_seconds: float, now: datetime
    ) -> JobRecord | None:
        """The queued -> running transition of a claim, its lease and its `running` event."""
        return self._transition(
            session,
            job_id,
            (QUEUED,),
            RUNNING,
            now,
            lambda job: (
                f"claimed by worker {worker_id} (attempt {job.attempt} of {job.max_attempts})"
            ),
            values={
                "lease_owner": worker_id,
                "lease_expires_at": now + timedelta(seconds=lease_seconds),
                "started_at": sa.func.coalesce(jobs.c.started_at, _ts(now)),
            },
            event_data=lambda job: {"worker_id": worker_id, "attempt": job.attempt},
        )

    def claim_next_job(
        self,
        worker_id: str,
        *,
        gpus: int,
        lease_seconds: float,
        max_running_per_tenant: int = 0,
    ) -> JobRecord | None:
        """Claim the next queued job of resource class ``gpus`` in fair order; None if none.

        Fair order: the tenant with the fewest running jobs first, then the tenant whose last
        turn (``tenants.last_dispatched_at``) is oldest (never: first), then the oldest job --
        round-robin across tenants, so one tenant's hundred queued jobs do not starve another's
        one. With ``max_running_per_tenant`` > 0 a tenant already running that many jobs is
        passed over. On PostgreSQL claims are serialized by a transaction-level advisory lock
        (the cap and the turns stay exact between workers) and rows another transaction holds
        (a cancel) are skipped (``FOR UPDATE SKIP LOCKED``); SQLite serializes writes anyway.
        """
        now = _now()
        with self._write() as session:
            if self._dialect == "postgresql":
                session.execute(
                    sa.select(sa.func.pg_advisory_xact_lock(sa.func.hashtextextended("claim", 0)))
                )
            # Each tenant's running jobs counted once (not per queued row): one pass over the
            # live rows through ix_jobs_status, joined to the queued jobs of the class.
            running = (
                sa.select(jobs.c.tenant_id, sa.func.count().label("n"))
                .where(jobs.c.status.in_((RUNNING, CANCELLING)))
                .group_by(jobs.c.tenant_id)
                .subquery("running")
            )
            held = sa.func.coalesce(running.c.n, 0)
            query = (
                sa.select(jobs.c.id, jobs.c.tenant_id)
                .select_from(
                    jobs.outerjoin(running, running.c.tenant_id == jobs.c.tenant_id).outerjoin(
                        dispatch_turns,
                        sa.and_(
                            dispatch_turns.c.tenant_id == jobs.c.tenant_id,
                            dispatch_turns.c.gpus == int(gpus),
                        ),
                    )
                )
                .where(jobs.c.status == QUEUED, jobs.c.gpus == int(gpus))
            )
            if max_running_per_tenant > 0:
                query = query.where(held < max_running_per_tenant)
            query = query.order_by(
                held,
                dispatch_turns.c.last_dispatched_at.asc().nulls_first(),
                jobs.c.created_at,
                jobs.c.id,
            ).limit(1)
            if self._dialect == "postgresql":
                query = query.with_for_update(skip_locked=True, of=jobs)
            picked = session.execute(query).first()
            if picked is None:
                return None
            job = self._claim(session, picked.id, worker_id, lease_seconds, now)
            session.execute(
                self._insert(dispatch_turns)
                .values(tenant_id=picked.tenant_id, gpus=int(gpus), last_dispatched_at=now)
                .on_conflict_do_update(
                    index_elements=["tenant_id", "gpus"], set_={"last_dispatched_at": now}
                )
            )
        return job

    def count_queued_in_class(self, *, gpus: int) -> int:
        """Queued jobs of resource class ``gpus``."""
        with self._read() as session:
            return int(
                session.execute(
                    sa.select(sa.func.count())
                    .select_from(jobs)
                    .where(jobs.c.status == QUEUED, jobs.c.gpus == int(gpus))
                ).scalar_one()
            )

    def requeue_job(self, job_id: str, worker_id: str, *, error: JobError) -> str | None:
        """The lease owner's job lost a process of its group: requeue it as a whole.

        running -> queued with attempt + 1 (event ``requeued``, data: the error) while attempts
        are left, else -> failed with ``error``. Returns the new status, or None when the
        worker no longer holds the lease (nothing changed).
        """
        now = _now()
        with self._write() as session:
            row = session.execute(
                sa.select(jobs.c.attempt, jobs.c.max_attempts).where(
                    jobs.c.id == job_id,
                    jobs.c.status == RUNNING,
                    jobs.c.lease_owner == worker_id,
                )
            ).first()
            if row is None:
                return None
            if row.attempt < row.max_attempts:
                job = self._transition(
                    session,
                    job_id,
                    (RUNNING,),
                    QUEUED,
                    now,
                    f"{error.message}; requeued for attempt {row.attempt + 1} of "
                    f"{row.max_attempts}",
                    worker_id=worker_id,
                    extra_where=[jobs.c.attempt == row.attempt],
                    values={
                        "attempt": jobs.c.attempt + 1,
                        "lease_owner": None,
                        "lease_expires_at": None,
                    },
                    event_kind="requeued",
                    event_data={"attempt": row.attempt + 1, "error": error.to_dict()},
                )
                return QUEUED if job is not None else None
            job = self._transition(
                session,
                job_id,
                (RUNNING,),
                FAILED,
                now,
                f"{error.code}: {error.message}",
                worker_id=worker_id,
                values=_failure_values(error, now),
                event_data={"error": error.to_dict()},
            )
            return FAILED if job is not None else None

    def heartbeat(self, job_id: str, worker_id: str, *, lease_seconds: float) -> str | None:
        """Extend the lease if ``worker_id`` still holds it on a running/cancelling job.

        Returns the job's status (``cancelling`` tells the worker to stop), or ``None`` when the
        lease is lost (the job was requeued, finished or taken by another worker).
        """
        now = _now()
        with self._write() as session:
            status = session.execute(
                sa.update(jobs)
                .where(
                    jobs.c.id == job_id,
                    jobs.c.status.in_((RUNNING, CANCELLING)),
                    jobs.c.lease_owner == worker_id,
                )
                .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
                .returning(jobs.c.status)
            ).scalar_one_or_none()
        return status

    def update_progress(
        self, job_id: str, worker_id: str, *, step: int, total_steps: int | None
    ) -> None:
        """Record progress (only for the lease owner of a running/cancelling job; else a no-op).

        ``total_steps=None`` leaves the stored total unchanged.
        """
        values: dict[str, Any] = {"progress_step": min(step, MAX_INT32), "updated_at": _now()}
        if total_steps is not None:
            values["total_steps"] = min(total_steps, MAX_INT32)  # an INTEGER column
        with self._write() as session:
            session.execute(
                sa.update(jobs)
                .where(
                    jobs.c.id == job_id,
                    jobs.c.status.in_((RUNNING, CANCELLING)),
                    jobs.c.lease_owner == worker_id,
                )
                .values(**values)
            )

    def set_activity(self, job_id: str, worker_id: str, activity: dict[str, Any] | None) -> None:
        """What a running job does besides its steps (None: nothing), for the lease owner only.

        Touches ``updated_at`` like progress does, so cached answers about the job refresh.
        """
        with self._write() as session:
            session.execute(
                sa.update(jobs)
                .where(
                    jobs.c.id == job_id,
                    jobs.c.status.in_((RUNNING, CANCELLING)),
                    jobs.c.lease_owner == worker_id,
                )
                .values(activity=activity, updated_at=_now())
            )

    def finish_job(self, job_id: str, worker_id: str, *, adapter_uri: str) -> bool:
        """running|cancelling -> succeeded with the adapter's URI, for the lease owner only."""
        now = _now()
        with self._write() as session:
            job = self._transition(
                session,
                job_id,
                (RUNNING, CANCELLING),
                SUCCEEDED,
                now,
                "training finished",
                worker_id=worker_id,
                values={"adapter_uri": adapter_uri, "finished_at": now, "lease_expires_at": None},
                event_data={"adapter_uri": adapter_uri},
            )
        return job is not None

    def fail_job(self, job_id: str, *, error: JobError, worker_id: str | None = None) -> bool:
        """Any live state -> failed with ``error`` (only for the lease owner if ``worker_id``)."""
        now = _now()
        with self._write() as session:
            job = self._transition(
                session,
                job_id,
                tuple(s for s in JOB_STATUSES if s in LIVE_STATUSES),
                FAILED,
                now,
                f"{error.code}: {error.message}",
                worker_id=worker_id,
                values=_failure_values(error, now),
                event_data={"error": error.to_dict()},
            )
        return job is not None

    def mark_cancelled(self, job_id: str, worker_id: str) -> bool:
        """running|cancelling -> cancelled, for the lease owner (the worker stopped the run)."""
        now = _now()
        with self._write() as session:
            job = self._transition(
                session,
                job_id,
                (RUNNING, CANCELLING),
                CANCELLED,
                now,
                f"cancelled; worker {worker_id} stopped the run",
                worker_id=worker_id,
                values={"finished_at": now, "lease_expires_at": None},
            )
        return job is not None

    def requeue_expired(self, *, now: datetime | None = None) -> list[str]:
        """Take back jobs whose worker stopped renewing its lease (``lease_expires_at < now``).

        cancelling -> cancelled; running with attempts left -> queued with attempt + 1 and the
        lease cleared (event ``requeued``); running on its last attempt -> failed with
        ``JobError("worker_lost", …, "system")``. Returns the ids now queued, for the caller to
        re-enqueue.
        """
        now = now or _now()
        requeued: list[str] = []
        with self._write() as session:
            candidates = session.execute(
                sa.select(
                    jobs.c.id,
                    jobs.c.status,
                    jobs.c.attempt,
                    jobs.c.max_attempts,
                    jobs.c.lease_owner,
                )
                .where(
                    jobs.c.status.in_((RUNNING, CANCELLING)),
                    jobs.c.lease_expires_at < _ts(now),
                )
                .order_by(jobs.c.created_at, jobs.c.id)
            ).all()
            for job_id, status, attempt, max_attempts, owner in candidates:
                # The row must still be exactly as read: same status, owner, attempt, expired.
                same = [
                    jobs.c.lease_expires_at < _ts(now),
                    jobs.c.attempt == attempt,
                    jobs.c.lease_owner.is_not_distinct_from(owner),
                ]
                if status == CANCELLING:
                    self._transition(
                        session,
                        job_id,
                        (CANCELLING,),
                        CANCELLED,
                        now,
                        f"cancelled; the lease of worker {owner} expired",
                        extra_where=same,
                        values={"finished_at": now, "lease_expires_at": None},
                        event_data={"reason": "lease_expired", "worker_id": owner},
                    )
                elif attempt < max_attempts:
                    if self._transition(
                        session,
                        job_id,
                        (RUNNING,),
                        QUEUED,
                        now,
                        f"the lease of worker {owner} expired; requeued for attempt "
                        f"{attempt + 1} of {max_attempts}",
                        extra_where=same,
                        values={
                            "attempt": jobs.c.attempt + 1,
                            "lease_owner": None,
                            "lease_expires_at": None,
                        },
                        event_kind="requeued",
                        event_data={"attempt": attempt + 1, "previous_owner": owner},
                    ):
                        requeued.append(job_id)
                else:
                    error = JobError(
                        "worker_lost",
                        f"worker {owner} stopped renewing its lease on attempt {attempt} of "
                        f"{max_attempts}",
                        "system",
                    )
                    self._transition(
                        session,
                        job_id,
                        (RUNNING,),
                        FAILED,
                        now,
                        f"{error.code}: {error.message}",
                        extra_where=same,
                        values=_failure_values(error, now),
                        event_data={"error": error.to_dict()},
                    )
        return requeued

    def release_job(self, job_id: str, worker_id: str) -> bool:
        """running -> queued for the lease owner, without spending an attempt.

        For a worker that leaves cleanly (a redeploy): the job resumes elsewhere from its last
        checkpoint as the same attempt. Event ``released``.
        """
        now = _now()
        with self._write() as session:
            return (
                self._transition(
                    session,
                    job_id,
                    (RUNNING,),
                    QUEUED,
                    now,
                    f"worker {worker_id} is shutting down; the job waits for another worker",
                    worker_id=worker_id,
                    values={"lease_owner": None, "lease_expires_at": None},
                    event_kind="released",
                    event_data={"worker_id": worker_id},
                )
                is not None
            )

    def release_idempotency_key(self, job_id: str) -> None:
        """Forget the job's Idempotency-Key, so a retry of its submission creates a new job.

        For a submission that failed after its row was written (the queue was unreachable): the
        failed job stays visible, and the client's retry with the same key is not a replay of it.
        """
        with self._write() as session:
            session.execute(sa.update(jobs).where(jobs.c.id == job_id).values(idempotency_key=None))

    def job_by_idempotency_key(self, tenant_id: str, idempotency_key: str) -> JobRecord | None:
        """The tenant's job made with this Idempotency-Key, if any."""
        with self._read() as session:
            row = self._job_by_key(session, tenant_id, idempotency_key)
        return None if row is None else _job_record(row)

    def discard_unqueued_job(self, job_id: str) -> bool:
        """Delete a job whose message could not be sent, if it is still untouched in ``queued``.

        For a submission answered 503 (the broker was unreachable): no job is left behind, and
        the client's retry submits anew. False when a worker got the job after all (it was
        re-sent, or claimed) and it must stay.
        """
        with self._write() as session:
            deleted = session.execute(
                sa.delete(jobs)
                .where(jobs.c.id == job_id, jobs.c.status == QUEUED, jobs.c.started_at.is_(None))
                .returning(jobs.c.id)
            ).first()
        return deleted is not None

    def requeue_stale_queued(
        self, *, older_than: timedelta, now: datetime | None = None
    ) -> list[str]:
        """Queued jobs untouched for `older_than`, whose message may have been lost.

        A broker can drop a delivered message (a worker killed between receiving it and
        claiming the job). Such a job would wait forever; this marks each stale one as touched
        (`updated_at = now`, so it is returned at most once per `older_than`) and returns the
        ids for the caller to enqueue again. A duplicate message is harmless: only one claim
        of a queued job succeeds.
        """
        now = now or _now()
        with self._write() as session:
            rows = session.execute(
                sa.update(jobs)
                .where(jobs.c.status == QUEUED, jobs.c.updated_at < _ts(now - older_than))
                .values(updated_at=now)
                .returning(jobs.c.id)
            ).all()
        return sorted(row.id for row in rows)

    # -- events -------------------------------------------------------------------------------

    def _insert_event(
        self,
        session: Session,
        job_id: str,
        kind: str,
        message: str,
        data: dict[str, Any] | None,
        now: datetime,
    ) -> int:
        if self._dialect == "postgresql":
            # Serialize the job's event writers until commit, so that its event ids become
            # visible in increasing order: a reader resuming ``after_id`` never skips an event
            # whose (smaller) id was taken by a transaction that committed later. (SQLite
            # write transactions are serialized already.)
            session.execute(self._lock_job_events, {"job_id": job_id})
        values = {"job_id": job_id, "kind": kind, "message": message, "data": data or {}}
        values["created_at"] = now
        return session.execute(self._insert_event_row, values).scalar_one()

    def add_event(
        self, job_id: str, kind: str, message: str, data: dict[str, Any] | None = None
    ) -> int:
        """Append an event to the job; returns its id. JobNotFound if the job does not exist."""
        try:
            with self._write() as session:
                return self._insert_event(session, job_id, kind, message, data, _now())
        except IntegrityError as exc:
            raise JobNotFound(job_id) from exc

    @staticmethod
    def _visible(session: Executor, job_id: str, tenant_id: str | None) -> bool:
        """True unless ``tenant_id`` is given and the job is not that tenant's."""
        if tenant_id is None:
            return True
        found = session.execute(
            sa.select(jobs.c.id).where(jobs.c.id == job_id, jobs.c.tenant_id == tenant_id)
        ).first()
        return found is not None

    def list_events(
        self,
        job_id: str,
        *,
        after_id: int = 0,
        limit: int = 1000,
        tenant_id: str | None = None,
    ) -> list[EventRecord]:
        """The job's events with ``id > after_id``, ascending, at most ``limit``.

        Ids of one job's events become visible in increasing order, so polling with the last
        id seen (an SSE ``Last-Event-ID``) misses nothing. With ``tenant_id``, another tenant's
        job has no events (``[]``).
        """
        query = (
            sa.select(job_events)
            .where(job_events.c.job_id == job_id, job_events.c.id > after_id)
            .order_by(job_events.c.id)
            .limit(limit)
        )
        with self._read() as session:
            if not self._visible(session, job_id, tenant_id):
                return []
            return [_event_record(row) for row in session.execute(query)]

    # -- metrics ------------------------------------------------------------------------------

    def record_metrics(self, job_id: str, step: int, metrics_at_step: dict[str, float]) -> int:
        """Store the values of one step; returns the number of rows inserted.

        A ``(name, step)`` already stored is left as it is (a replayed step after a resume
        inserts nothing). NaN and ±inf are skipped. JobNotFound if the job does not exist.
        """
        return self.record_metrics_bulk(job_id, [(step, metrics_at_step)])

    def record_metrics_bulk(
        self, job_id: str, steps: Iterable[tuple[int, dict[str, float]]]
    ) -> int:
        """:meth:`record_metrics` for many ``(step, {name: value})`` in one transaction, with
        their usage-ledger rows (:mod:`jobstore.usage`)."""
        steps = list(steps)
        ledger = usage_rows(job_id, steps, _now())
        rows = []
        for step, metrics_at_step in steps:
            for name, value in metrics_at_step.items():
                number = float(value)
                if math.isfinite(number):
                    rows.append(
                        {"job_id": job_id, "name": name, "step": int(step), "value": number}
                    )
        if not rows:
            return 0
        # executemany (batched into multi-row VALUES by SQLAlchemy); RETURNING yields only the
        # rows that were inserted, which is the count (rowcount is unreliable for executemany).
        stmt = (
            self._insert(metrics)
            .on_conflict_do_nothing(index_elements=["job_id", "name", "step"])
            .returning(metrics.c.step)
        )
        try:
            with self._write() as session:
                inserted = len(session.execute(stmt, rows).all())
                if ledger:
                    session.execute(
                        self._insert(job_usage).on_conflict_do_nothing(
                            index_elements=["job_id", "step", "source"]
                        ),
                        ledger,
                    )
                return inserted
        except IntegrityError as exc:
            raise JobNotFound(job_id) from exc

    def query_metrics(
        self,
        job_id: str,
        *,
        names: list[str] | None = None,
        step_min: int | None = None,
        step_max: int | None = None,
        max_points: int | None = None,
        tenant_id: str | None = None,
    ) -> dict[str, list[tuple[int, float]]]:
        """``{name: [(step, value), …]}`` ascending by step, for names that have points.

        Filters: ``names``, inclusive ``step_min``/``step_max``. With ``max_points`` (>= 2),
        names with more points than that are downsampled in SQL (see the module doc: first and
        last points kept, the rest averaged over equal step ranges). With ``tenant_id``, another
        tenant's job has no metrics (``{}``).
        """
        if max_points is not None and max_points < 2:
            raise ValueError("max_points must be >= 2 (the first and last points are kept)")
        if names is not None and not names:
            return {}
        with self._read() as session:
            if not self._visible(session, job_id, tenant_id):
                return {}
            if max_points is None:
                return metric_queries.read_points(session, job_id, names, step_min, step_max)
            return metric_queries.downsample(session, job_id, names, step_min, step_max, max_points)

    def metric_names(self, job_id: str, *, tenant_id: str | None = None) -> list[str]:
        """The job's metric names, sorted."""
        with self._read() as session:
            if not self._visible(session, job_id, tenant_id):
                return []
            return metric_queries.metric_names(session, job_id)

    # -- checkpoints --------------------------------------------------------------------------

    def add_checkpoint(self, job_id: str, step: int, uri: str) -> None:
        """Record a complete checkpoint; a second one at the same step replaces the first."""
        stmt = self._insert(checkpoints).values(
            job_id=job_id, step=step, uri=uri, created_at=_now()
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["job_id", "step"],
            set_={"uri": stmt.excluded.uri, "created_at": stmt.excluded.created_at},
        )
        try:
            with self._write() as session:
                session.execute(stmt)
        except IntegrityError as exc:
            raise JobNotFound(job_id) from exc

    def count_jobs_by_tenant_and_status(self) -> list[tuple[str, str, int]]:
        """`(tenant name, status, number of jobs)` for every pair that has jobs (metrics)."""
        query = (
            sa.select(tenants.c.name, jobs.c.status, sa.func.count())
            .select_from(jobs.join(tenants, tenants.c.id == jobs.c.tenant_id))
            .group_by(tenants.c.name, jobs.c.status)
        )
        with self._read() as connection:
            return [(name, status, int(count)) for name, status, count in connection.execute(query)]

    def remove_checkpoint(self, job_id: str, step: int) -> bool:
        """Forget the checkpoint of `step` (retention removed it); False if none was recorded."""
        with self._write() as session:
            row = session.execute(
                sa.delete(checkpoints)
                .where(checkpoints.c.job_id == job_id, checkpoints.c.step == step)
                .returning(checkpoints.c.step)
            ).first()
        return row is not None

    def list_checkpoints(
        self, job_id: str, *, tenant_id: str | None = None
    ) -> list[CheckpointRecord]:
        """The job's checkpoints, ascending by step."""
        c = checkpoints
        query = sa.select(c).where(c.c.job_id == job_id).order_by(c.c.step)
        with self._read() as session:
            if not self._visible(session, job_id, tenant_id):
                return []
            return [
                CheckpointRecord(
                    job_id=row.job_id, step=row.step, uri=row.uri, created_at=row.created_at
                )
                for row in session.execute(query)
            ]
