"""Engines and session factories for the store, with the per-dialect settings it relies on.

PostgreSQL (``postgresql+psycopg://…``): a pooled engine whose connections are pinged on
checkout only when they sat idle in the pool for more than :data:`IDLE_PING_SECONDS` (a dead one
is replaced before use). SQLAlchemy's ``pool_pre_ping`` pings on *every* checkout, a round trip
that costs as much as the query of a typical API read; a connection returned a moment ago by a
busy server is not worth that. A server restart under continuous traffic can still fail the
requests in flight on old connections; SQLAlchemy then discards the whole pool.

SQLite (``sqlite:///path``): a file database shared by several processes (the API and a worker):

* every connection sets ``journal_mode=WAL`` (readers never block the writer; retried when
  processes open a new file together, see :func:`enable_wal`),
  ``foreign_keys=ON``, ``busy_timeout`` (a writer waits for the lock instead of failing at once)
  and ``synchronous=NORMAL`` (durable in WAL mode except for the last commits on power loss);
* the driver's own transaction handling is switched off and SQLAlchemy emits ``BEGIN`` itself, so
  that write transactions can start with ``BEGIN IMMEDIATE``: they take the write lock up front
  and wait for it under the busy timeout, instead of failing with "database is locked" when a
  read transaction tries to upgrade to a write while another process writes.

Use :func:`write_engine` for sessions that write and :func:`read_engine` for reads; plain
engines begin deferred (read) transactions. In-memory SQLite is refused: it cannot be shared
between processes.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import Pool

SQLITE_BUSY_TIMEOUT_MS = 30_000
IDLE_PING_SECONDS = 5.0
PG_CONNECT_TIMEOUT_SECONDS = 5
# What the store's queries run on: an ORM session (writes) or a connection (reads).
Executor = Session | Connection
_SQLITE_BEGIN_OPTION = "jobstore_sqlite_begin"


def backend_name(database_url: str | URL) -> str:
    """``"postgresql"`` or ``"sqlite"``; ``ValueError`` for any other backend."""
    backend = make_url(database_url).get_backend_name()
    if backend not in ("postgresql", "sqlite"):
        raise ValueError(
            f"unsupported database {backend!r}: use postgresql+psycopg:// or sqlite://"
        )
    return backend


def sqlite_path(database_url: str | URL) -> Path:
    """The file behind a ``sqlite:///path`` URL (``ValueError`` for an in-memory database)."""
    url = make_url(database_url)
    database = url.database
    if not database or database == ":memory:" or url.query.get("mode") == "memory":
        raise ValueError("the store needs a SQLite *file* (sqlite:///path/to/opsd.db)")
    if database.startswith("file:"):
        raise ValueError("SQLite URI filenames are not supported; use sqlite:///path/to/opsd.db")
    return Path(database)


def create_engine(
    database_url: str | URL, *, echo: bool = False, poolclass: type[Pool] | None = None
) -> Engine:
    """An engine for the store's database, configured for its dialect (see the module doc)."""
    url = make_url(database_url)
    kwargs: dict[str, Any] = {"echo": echo}
    if poolclass is not None:
        kwargs["poolclass"] = poolclass
    if backend_name(url) == "sqlite":
        path = sqlite_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {
            "check_same_thread": False,  # pooled connections move between threads
            "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000,
        }
        engine = sa.create_engine(url, **kwargs)
        _install_sqlite_hooks(engine)
        return engine
    if "connect_timeout" not in url.query:
        # A server that does not answer (stopped, or a dropped network) fails a connection
        # attempt after this long instead of the operating system's minutes.
        kwargs["connect_args"] = {"connect_timeout": PG_CONNECT_TIMEOUT_SECONDS}
    engine = sa.create_engine(url, **kwargs)
    _install_idle_ping(engine)
    return engine


def write_engine(engine: Engine) -> Engine:
    """A view of ``engine`` (same pool) whose transactions are write transactions.

    On SQLite they begin with ``BEGIN IMMEDIATE``; on PostgreSQL nothing changes.
    """
    return engine.execution_options(**{_SQLITE_BEGIN_OPTION: "IMMEDIATE"})


def read_engine(engine: Engine) -> Engine:
    """A view of ``engine`` (same pool) for reads and for writes made of one statement.

    On PostgreSQL its connections run in autocommit: each statement is its own transaction and
    snapshot, and costs one round trip instead of three (no ``BEGIN``, no ``COMMIT`` or
    ``ROLLBACK``). On SQLite nothing changes (reads begin deferred transactions).
    """
    if engine.dialect.name == "postgresql":
        return engine.execution_options(isolation_level="AUTOCOMMIT")
    return engine


def use_immediate_transactions(connection: Connection) -> None:
    """Make the transactions of this SQLite ``connection`` begin with ``BEGIN IMMEDIATE``."""
    connection.execution_options(**{_SQLITE_BEGIN_OPTION: "IMMEDIATE"})


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that return plain values after commit (no expiry, no autoflush)."""
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=False)


def _install_idle_ping(engine: Engine) -> None:
    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        if record is not None:
            record.info["checked_in_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("checked_in_at")
        if since is None or time.monotonic() - since < IDLE_PING_SECONDS:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:  # any failure: the pool replaces this connection and retries
            raise sa.exc.DisconnectionError(f"stale pooled connection: {exc}") from exc
        if not alive:
            raise sa.exc.DisconnectionError("stale pooled connection")


def enable_wal(cursor: Any, timeout_s: float = SQLITE_BUSY_TIMEOUT_MS / 1000) -> None:
    """Put the database of ``cursor`` (a DB-API cursor) in WAL mode, waiting out lock conflicts.

    WAL is a property of the file, so this is a read once any connection has set it. Before
    that, switching takes an exclusive lock, and SQLite answers "database is locked" at once,
    without its busy handler, when another process is opening, switching or checkpointing the
    same new file at that moment (two services started together on a fresh store): retry with
    backoff for up to ``timeout_s``, like the busy timeout would.
    """
    deadline = time.monotonic() + timeout_s
    delay = 0.002
    while True:
        try:
            if _journal_mode(cursor, "") == "wal" or _journal_mode(cursor, " = WAL") == "wal":
                return
            problem = "SQLite kept its rollback journal instead of switching to WAL"
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise
            problem = str(exc)
        if time.monotonic() + delay > deadline:
            raise sqlite3.OperationalError(f"cannot enable WAL mode: {problem}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _journal_mode(cursor: Any, assignment: str) -> str:
    return str(cursor.execute(f"PRAGMA journal_mode{assignment}").fetchone()[0]).lower()


def _install_sqlite_hooks(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Autocommit at the driver level: SQLAlchemy's "begin" hook below emits BEGIN itself.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            enable_wal(cursor)
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get(_SQLITE_BEGIN_OPTION, "")
        connection.exec_driver_sql(f"BEGIN {mode}".strip())
