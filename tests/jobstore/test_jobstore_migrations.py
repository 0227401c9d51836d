"""Migrations: they build the schema the code expects, on empty PostgreSQL and SQLite databases,
idempotently, from two processes at once, and from the ``alembic`` command line."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.pool import NullPool

import jobstore
from jobstore.migrate import ADVISORY_LOCK_KEY, alembic_config
from jobstore.tables import metadata
from tests.service_fixtures import fresh_postgres_url, sqlite_url

REPO = Path(__file__).resolve().parents[2]
TABLES = {
    "tenants",
    "api_keys",
    "jobs",
    "job_events",
    "metrics",
    "checkpoints",
    "evals",
    "files",
    "dispatch_turns",  # 0008: each tenant's turn per resource class
    "preflights",
}
TABLES |= {"job_usage"}  # revision 0007_usage


@pytest.fixture(scope="module")
def scratch_postgres() -> Iterator[str]:
    """A PostgreSQL database for this module's tests (dropping databases is slow: one only)."""
    url, drop = fresh_postgres_url(migrate=False)
    yield url
    drop()


def _reset(url: str) -> None:
    """Make the database empty again (as never migrated)."""
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql("DROP SCHEMA public CASCADE")
            connection.exec_driver_sql("CREATE SCHEMA public")
    finally:
        engine.dispose()


@pytest.fixture(params=["postgres", "sqlite"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty, never-migrated database."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "state" / "opsd.db")
    url: str = request.getfixturevalue("scratch_postgres")
    _reset(url)
    return url


def _schema_diff(url: str) -> list[object]:
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, metadata))
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_builds_the_schema_of_the_code_and_is_idempotent(empty_url: str) -> None:
    assert jobstore.current_revision(empty_url) is None
    jobstore.upgrade(empty_url)
    head = jobstore.head_revision()
    assert head is not None
    assert jobstore.current_revision(empty_url) == head
    assert _tables(empty_url) == TABLES | {"alembic_version"}
    assert _schema_diff(empty_url) == []  # migrations and jobstore.tables agree
    jobstore.upgrade(empty_url)  # again: a no-op
    jobstore.upgrade(empty_url)
    assert jobstore.current_revision(empty_url) == head
    store = jobstore.Store(empty_url)
    try:
        assert store.ping()
        tenant = store.get_or_create_tenant("t")
        job, _ = store.create_job(tenant.id, spec={"base_model": "m", "dataset_uri": "d"})
        assert store.get_job(job.id) == job
    finally:
        store.close()


def test_downgrade_to_base_and_back(empty_url: str) -> None:
    jobstore.upgrade(empty_url)
    command.downgrade(alembic_config(empty_url), "base")
    assert jobstore.current_revision(empty_url) is None
    assert _tables(empty_url) <= {"alembic_version"}
    jobstore.upgrade(empty_url)
    assert _schema_diff(empty_url) == []


def test_evals_made_before_eval_attempts_read_as_first_attempts(empty_url: str) -> None:
    jobstore.upgrade(empty_url, "0002_evals")
    store = jobstore.Store(empty_url)
    try:
        tenant = store.get_or_create_tenant("t")
        engine = store.engine
    finally:
        store.close()
    # rows written as that revision's schema has them (today's queries know later columns)
    now = tenant.created_at
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO jobs (id, tenant_id, status, spec, metadata, attempt, max_attempts, "
                "progress_step, created_at, updated_at) VALUES ('job_old', :tenant, 'succeeded', "
                "'{}', '{}', 1, 3, 0, :now, :now)"
            ),
            {"tenant": tenant.id, "now": now},
        )
        connection.execute(
            sa.text(
                "INSERT INTO evals (id, tenant_id, job_id, status, config, created_at) "
                "VALUES ('eval_old', :tenant, 'job_old', 'queued', '{}', :now)"
            ),
            {"tenant": tenant.id, "now": now},
        )
    engine.dispose()
    jobstore.upgrade(empty_url)
    store = jobstore.Store(empty_url)
    try:
        record = store.get_eval("eval_old")
        assert record is not None and (record.status, record.attempt) == ("queued", 1)
        with store.engine.begin() as connection, pytest.raises(sa.exc.IntegrityError):
            connection.execute(sa.text("UPDATE evals SET status = 'bogus'"))  # checks kept
    finally:
        store.close()


_UPGRADE = (
    "import sys, jobstore; print('ready', flush=True); jobstore.upgrade(sys.argv[1]); print('ok')"
)


def _start_upgrades(url: str, n: int) -> list[subprocess.Popen[str]]:
    """``n`` processes that import the store, say "ready", then upgrade ``url``."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _UPGRADE, url],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    for process in processes:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
    time.sleep(0.3)  # both are now blocked on the migration lock the test holds
    assert all(p.poll() is None for p in processes)
    return processes


def _wait_all(processes: list[subprocess.Popen[str]]) -> None:
    for process in processes:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        assert out.strip() == "ok", (out, err)


def test_two_processes_upgrading_at_once_on_postgres(scratch_postgres: str) -> None:
    url = scratch_postgres
    _reset(url)
    holder = sa.create_engine(url, poolclass=NullPool)
    try:
        # Hold the migration lock so both processes queue on it, then let them race.
        with holder.connect() as connection:
            connection.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": ADVISORY_LOCK_KEY})
            processes = _start_upgrades(url, 2)
            connection.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": ADVISORY_LOCK_KEY})
            connection.commit()
        _wait_all(processes)
        assert jobstore.current_revision(url) == jobstore.head_revision()
        assert _schema_diff(url) == []
    finally:
        holder.dispose()


def test_two_processes_upgrading_at_once_on_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "opsd.db"
    url = sqlite_url(path)
    fd = os.open(f"{path}.migrate.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        processes = _start_upgrades(url, 2)
    finally:
        os.close(fd)
    _wait_all(processes)
    assert jobstore.current_revision(url) == jobstore.head_revision()
    assert _schema_diff(url) == []


def test_alembic_command_line_reads_opsd_database_url(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "cli.db")
    alembic = Path(sys.executable).with_name("alembic")
    result = subprocess.run(
        [str(alembic), "upgrade", "head"],
        cwd=REPO,
        env={**os.environ, "OPSD_DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert jobstore.current_revision(url) == jobstore.head_revision()


def test_sqlite_connections_are_set_up_for_several_processes(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "opsd.db")
    jobstore.upgrade(url)
    store = jobstore.Store(url)
    try:
        with store.engine.connect() as connection:
            pragma = connection.exec_driver_sql
            assert pragma("PRAGMA journal_mode").scalar() == "wal"
            assert pragma("PRAGMA foreign_keys").scalar() == 1
            assert pragma("PRAGMA busy_timeout").scalar() >= 1000
    finally:
        store.close()


def test_in_memory_sqlite_and_other_backends_are_refused() -> None:
    with pytest.raises(ValueError, match="file"):
        jobstore.Store("sqlite://")
    with pytest.raises(ValueError, match="unsupported"):
        jobstore.Store("mysql://u@h/db")


def test_jobstore_imports_neither_web_nor_queue_nor_ml_frameworks() -> None:
    code = (
        "import sys, jobstore, jobstore.migrate; "
        "print(sorted(m for m in ('fastapi', 'celery', 'torch') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_nothing_outside_tests_creates_tables_without_migrations() -> None:
    sources = [*(REPO / "jobstore").glob("*.py"), *(REPO / "migrations").rglob("*.py")]
    assert sources
    for source in sources:
        assert "create_all" not in source.read_text(), source
