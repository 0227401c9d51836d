"""Schema migrations, programmatically: ``alembic upgrade head`` and the current revision.

Owns the bridge between the store and the Alembic revisions in ``migrations/`` at the repository
root: :func:`upgrade` (safe to call at every start, and from several processes at once) and
:func:`current_revision`, plus :func:`migration_lock`, which ``migrations/env.py`` holds while it
migrates: ``pg_advisory_lock`` on PostgreSQL, an ``flock`` on ``<db file>.migrate.lock`` for
SQLite. A process that waited for the lock then finds the schema at head and does nothing.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from jobstore.db import create_engine, sqlite_path

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# Key of the PostgreSQL advisory lock held while migrating (any constant; "opsd" in ASCII).
ADVISORY_LOCK_KEY = 0x6F707364


def alembic_config(database_url: str | None = None) -> Config:
    """An Alembic config for ``migrations/`` (no ini file, so the host's logging is untouched)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    if database_url is not None:
        config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Migrate the database to ``revision`` (default: the latest). A no-op when already there."""
    command.upgrade(alembic_config(database_url), revision)


def head_revision() -> str | None:
    """The newest revision in ``migrations/``."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(database_url: str) -> str | None:
    """The revision the database is at; ``None`` for a database never migrated."""
    engine = create_engine(database_url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


@contextmanager
def migration_lock(connection: Connection) -> Iterator[None]:
    """Hold the store's migration lock for the database of ``connection``.

    Commits the connection's transaction (if any) before and after, so Alembic starts and ends
    its own transaction.
    """
    dialect = connection.dialect.name
    if dialect == "postgresql":
        connection.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
        connection.commit()
        try:
            yield
        finally:
            if connection.in_transaction():
                connection.rollback()
            connection.execute(
                sa.text("SELECT pg_advisory_unlock(:key)"), {"key": ADVISORY_LOCK_KEY}
            )
            connection.commit()
    elif dialect == "sqlite":
        lock_path = f"{sqlite_path(connection.engine.url)}.migrate.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock
    else:  # pragma: no cover - create_engine refuses other backends
        yield
