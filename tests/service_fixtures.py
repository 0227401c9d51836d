"""Database helpers shared by the service's test suites (jobstore, API, worker).

Owns how tests get a database: :func:`fresh_postgres_url` creates a throw-away PostgreSQL
database (``opsd_test_<random>``) on the server named by ``OPSD_TEST_POSTGRES_ADMIN_URL``
(default ``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``), migrated to head unless
asked not to, and returns it with a function that drops it; :func:`redis_test_url` names a
Redis database on the server ``OPSD_TEST_REDIS_SERVER``; :func:`sqlite_url` names a SQLite
file. PostgreSQL is required: when the server cannot be reached these helpers raise
:class:`PostgresUnavailable` (tests then fail; they never skip).

Usage from any test package::

    from tests.service_fixtures import fresh_postgres_url

    @pytest.fixture(scope="session")
    def pg_url():
        url, drop = fresh_postgres_url()
        yield url
        drop()
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

DEFAULT_POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
ADMIN_URL_ENV = "OPSD_TEST_POSTGRES_ADMIN_URL"
REDIS_SERVER_ENV = "OPSD_TEST_REDIS_SERVER"
DEFAULT_REDIS_SERVER = "redis://127.0.0.1:6379"


class PostgresUnavailable(RuntimeError):
    """The tests' PostgreSQL server cannot be reached or refused to create a database."""


def postgres_admin_url() -> str:
    """URL of a database on the test server with the right to CREATE/DROP DATABASE."""
    return os.environ.get(ADMIN_URL_ENV) or DEFAULT_POSTGRES_ADMIN_URL


def _admin_engine(admin_url: str) -> sa.Engine:
    return sa.create_engine(
        admin_url,
        isolation_level="AUTOCOMMIT",
        poolclass=NullPool,
        connect_args={"connect_timeout": 5},
    )


def fresh_postgres_url(*, migrate: bool = True) -> tuple[str, Callable[[], None]]:
    """A new empty database ``opsd_test_<random>`` (migrated to head if ``migrate``).

    Returns ``(url, drop)``; ``drop()`` removes the database (closing any connection still
    open to it) and may be called more than once.
    """
    admin_url = postgres_admin_url()
    admin = make_url(admin_url)
    name = f"opsd_test_{secrets.token_hex(6)}"
    engine = _admin_engine(admin_url)
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
            # Test data need not survive a crash: commits skip the WAL flush (much faster).
            connection.exec_driver_sql(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    except sa.exc.SQLAlchemyError as exc:
        engine.dispose()
        shown = admin.render_as_string(hide_password=True)
        raise PostgresUnavailable(
            f"these tests need PostgreSQL: could not create a database through {shown} "
            f"({type(exc.orig or exc).__name__}: {exc.orig or exc}). Start PostgreSQL on "
            f"127.0.0.1:5432 (user postgres, trust auth) or set {ADMIN_URL_ENV} to a URL that "
            "may CREATE DATABASE."
        ) from exc
    url = admin.set(database=name).render_as_string(hide_password=False)
    dropped = False

    def drop() -> None:
        nonlocal dropped
        if dropped:
            return
        with engine.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        engine.dispose()
        dropped = True

    if migrate:
        from jobstore.migrate import upgrade

        try:
            upgrade(url)
        except BaseException:
            drop()
            raise
    return url, drop


XDIST_WORKERS_MAX = 3  # Redis has 16 databases: the suite's 4 (11-14), moved down 4 per worker


def xdist_worker_index() -> int:
    """0 in a plain pytest run, N in pytest-xdist's worker ``gwN`` (its PYTEST_XDIST_WORKER)."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(name[2:]) if name.startswith("gw") and name[2:].isdigit() else 0
    if index >= XDIST_WORKERS_MAX:
        raise RuntimeError(f"the suite runs on at most {XDIST_WORKERS_MAX} xdist workers (-n)")
    return index


def redis_test_url(db: int) -> str:
    """URL of Redis database ``db`` on the tests' Redis server (flushed by the tests using it).

    The server is ``OPSD_TEST_REDIS_SERVER`` (default ``redis://127.0.0.1:6379``), so two test
    runs on one machine can each use their own server instead of flushing each other's data.
    Under pytest-xdist each worker gets its own databases (``db - 4 * worker``), so two workers
    never flush or consume each other's queues.
    """
    server = (os.environ.get(REDIS_SERVER_ENV) or DEFAULT_REDIS_SERVER).rstrip("/")
    return f"{server}/{db - 4 * xdist_worker_index()}"


def sqlite_url(path: str | os.PathLike[str]) -> str:
    """``sqlite:///<absolute path>`` for a database file (not created here; see ``upgrade``)."""
    return f"sqlite:///{Path(path).resolve()}"


def launch_ports() -> str:
    """The rendezvous ports (``LOW-HIGH``, ``OPSD_LAUNCH_PORTS``) of the multi-process jobs the
    tests start: 16400-16499 (``OPSD_TEST_LAUNCH_PORTS`` to move it), split between xdist
    workers so two workers never race for one port."""
    low, high = (int(p) for p in os.environ.get("OPSD_TEST_LAUNCH_PORTS", "16400-16499").split("-"))
    share = (high - low + 1) // XDIST_WORKERS_MAX
    first = low + share * xdist_worker_index()
    return f"{first}-{first + share - 1}"
