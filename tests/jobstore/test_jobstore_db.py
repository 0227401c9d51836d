"""`jobstore.db`: on the real PostgreSQL, pooled connections that died while idle are replaced
before use and reads run in autocommit (no transaction left open between statements); on SQLite,
processes that open a new store file at the same moment all get a WAL connection."""

from __future__ import annotations

import multiprocessing
import random
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from jobstore import Store, db


def _kill_other_backends(url: str) -> int:
    """Terminate every other session on the store's database (what a server restart does)."""
    admin = sa.create_engine(url, poolclass=NullPool)
    try:
        with admin.connect() as connection:
            killed = connection.execute(
                sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalar_one()
    finally:
        admin.dispose()
    return int(killed)


def test_a_connection_killed_while_idle_is_replaced_before_use(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(postgres_url)
    try:
        tenant = store.get_or_create_tenant("idle-ping")
        job, _ = store.create_job(tenant.id, spec={"base_model": "m", "dataset_uri": "/d"})
        assert _kill_other_backends(postgres_url) >= 1
        monkeypatch.setattr(db, "IDLE_PING_SECONDS", 0.0)  # every pooled connection is "idle"
        assert store.get_job(job.id) == job  # read path
        assert store.add_event(job.id, "note", "after the restart") > 0  # write path
    finally:
        store.close()


def test_reads_leave_no_transaction_open(postgres_url: str) -> None:
    store = Store(postgres_url)
    try:
        with store._read() as connection:
            connection.execute(sa.select(1)).scalar_one()
            state = connection.execute(
                sa.text("SELECT state FROM pg_stat_activity WHERE pid = pg_backend_pid()")
            ).scalar_one()
            in_transaction = connection.connection.dbapi_connection.info.transaction_status
        assert state == "active"  # not "idle in transaction" between statements
        assert in_transaction == 0  # psycopg TransactionStatus.IDLE
    finally:
        store.close()


def _held_read_lock(path: Path, seconds: float) -> threading.Thread:
    """Hold a read transaction on a rollback-journal database for ``seconds``, in a thread."""
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN")
    holder.execute("SELECT count(*) FROM sqlite_master").fetchone()

    def release() -> None:
        time.sleep(seconds)
        holder.execute("COMMIT")
        holder.close()

    thread = threading.Thread(target=release)
    thread.start()
    return thread


def _new_database(path: Path) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE t (x)")
    connection.close()


def test_enable_wal_waits_out_a_lock_that_sqlite_reports_at_once(tmp_path: Path) -> None:
    path = tmp_path / "opsd.db"
    _new_database(path)
    # With no busy timeout, SQLite answers "database is locked" at once, as it does (whatever the
    # timeout) when two processes switch a new file to WAL together.
    connection = sqlite3.connect(path, isolation_level=None, timeout=0)
    cursor = connection.cursor()
    thread = _held_read_lock(path, 0.3)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        cursor.execute("PRAGMA journal_mode = WAL")
    started = time.monotonic()
    db.enable_wal(cursor, timeout_s=10)
    assert time.monotonic() - started < 5
    thread.join()
    assert cursor.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    connection.close()


def test_enable_wal_gives_up_with_a_clear_error_after_its_timeout(tmp_path: Path) -> None:
    path = tmp_path / "opsd.db"
    _new_database(path)
    connection = sqlite3.connect(path, isolation_level=None, timeout=0)
    thread = _held_read_lock(path, 1.0)
    with pytest.raises(sqlite3.OperationalError, match="cannot enable WAL mode: database is"):
        db.enable_wal(connection.cursor(), timeout_s=0.2)
    thread.join()
    connection.close()


def _connect_once(url: str, barrier: object, results: object) -> None:
    barrier.wait()  # type: ignore[attr-defined]
    time.sleep(random.random() * 0.004)  # spread the opens over the moments that conflict
    try:
        engine = db.create_engine(url, poolclass=NullPool)
        with engine.connect() as connection:
            mode = connection.exec_driver_sql("PRAGMA journal_mode").scalar()
        engine.dispose()
        results.put(str(mode))  # type: ignore[attr-defined]
    except Exception as exc:  # reported to the test, which names it
        results.put(repr(exc))  # type: ignore[attr-defined]


def test_processes_opening_a_new_sqlite_store_together_all_connect(tmp_path: Path) -> None:
    """The API and a worker started at once on a fresh store: neither may die on "locked"."""
    context = multiprocessing.get_context("fork")
    processes_per_round = 6
    outcomes: list[str] = []
    for attempt in range(40):
        url = f"sqlite:///{tmp_path / f'round{attempt}.db'}"
        barrier = context.Barrier(processes_per_round)
        results = context.Queue()
        processes = [
            context.Process(target=_connect_once, args=(url, barrier, results))
            for _ in range(processes_per_round)
        ]
        for process in processes:
            process.start()
        outcomes += [results.get(timeout=60) for _ in processes]
        for process in processes:
            process.join(timeout=60)
    assert [o for o in outcomes if o != "wal"] == []
