"""Fixtures of the jobstore tests: real databases, never mocks.

* ``postgres_url``: a fresh PostgreSQL database for the whole session, migrated by the Alembic
  revisions, dropped at the end (``service_fixtures.fresh_postgres_url``). An unreachable server
  is a test *error* with a message saying what to start, never a skip.
* ``sqlite_template``: a SQLite file migrated once; each test gets a copy.
* ``database_url`` / ``store``: parametrized over both backends; each test starts from empty
  tables (PostgreSQL tables are emptied, the SQLite file is a fresh copy).
* ``tenant``, ``other_tenant``, ``make_job`` (a job driven to a given status).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from jobstore import (
    CANCELLED,
    CANCELLING,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    JobError,
    JobRecord,
    Store,
    TenantRecord,
    upgrade,
)
from tests.service_fixtures import fresh_postgres_url, sqlite_url

BACKENDS = ("postgres", "sqlite")
SPEC: dict[str, Any] = {"base_model": "Qwen/Qwen3-1.7B", "dataset_uri": "file:///data/train.jsonl"}
WORKER = "worker-1"
_TABLES = ("checkpoints", "metrics", "job_events", "jobs", "api_keys", "files", "tenants")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    url, drop = fresh_postgres_url()
    yield url
    drop()


@pytest.fixture(scope="session")
def _postgres_admin(postgres_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(postgres_url, poolclass=NullPool)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "opsd.db"
    upgrade(sqlite_url(path))
    assert not Path(f"{path}-wal").exists()  # fully checkpointed: the file alone is the db
    return path


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        url: str = request.getfixturevalue("postgres_url")
        with request.getfixturevalue("_postgres_admin").begin() as connection:
            for table in _TABLES:  # DELETE: much faster than TRUNCATE on tiny tables
                connection.exec_driver_sql(f"DELETE FROM {table}")
        return url
    path = tmp_path / "opsd.db"
    shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
    return sqlite_url(path)


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    instance = Store(database_url)
    yield instance
    instance.close()


@pytest.fixture
def tenant(store: Store) -> TenantRecord:
    return store.get_or_create_tenant("acme")


@pytest.fixture
def other_tenant(store: Store) -> TenantRecord:
    return store.get_or_create_tenant("globex")


@pytest.fixture
def make_job(store: Store, tenant: TenantRecord) -> Callable[..., JobRecord]:
    """``make_job(status=QUEUED, tenant_id=None, **create_kwargs)``; running jobs are owned by
    :data:`WORKER` with a 60 s lease."""

    def make(status: str = QUEUED, *, tenant_id: str | None = None, **kwargs: Any) -> JobRecord:
        kwargs.setdefault("spec", SPEC)
        job, created = store.create_job(tenant_id or tenant.id, **kwargs)
        assert created
        if status in (RUNNING, CANCELLING, SUCCEEDED):
            assert store.claim_job(job.id, WORKER, lease_seconds=60) is not None
        if status == CANCELLING:
            assert store.request_cancel(job.id) is not None
        elif status == SUCCEEDED:
            assert store.finish_job(job.id, WORKER, adapter_uri="file:///adapters/a")
        elif status == FAILED:
            assert store.fail_job(job.id, error=JobError("dataset_error", "bad row", "user"))
        elif status == CANCELLED:
            assert store.request_cancel(job.id) is not None
        current = store.get_job(job.id)
        assert current is not None and current.status == status
        return current

    return make
