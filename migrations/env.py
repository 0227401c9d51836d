"""Alembic environment of the OPSD store: which database, which lock, which metadata.

The URL comes from the ``sqlalchemy.url`` option (``alembic -x url=…`` overrides it) or, when
that is empty, from ``OPSD_DATABASE_URL``. Online migrations run on the store's own engine
settings (:func:`jobstore.db.create_engine`) under :func:`jobstore.migrate.migration_lock`, so
two processes migrating at once run the revisions once. On SQLite the whole upgrade is one
transaction (``BEGIN IMMEDIATE``), revisions render ALTERs in batch mode, and foreign keys are
off while migrating (table rebuilds must not cascade) and checked before commit.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from jobstore.db import create_engine, use_immediate_transactions
from jobstore.migrate import migration_lock
from jobstore.tables import metadata as target_metadata

config = context.config

if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def database_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url")
    url = url or config.get_main_option("sqlalchemy.url") or os.environ.get("OPSD_DATABASE_URL")
    if not url:
        raise RuntimeError("no database URL: set sqlalchemy.url, -x url=… or OPSD_DATABASE_URL")
    return url


def run_migrations_offline() -> None:
    context.configure(
        url=database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def _migrate(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        # PRAGMA foreign_keys is a no-op inside a transaction: set it on the raw connection,
        # which is in autocommit (see jobstore.db).
        connection.connection.driver_connection.execute("PRAGMA foreign_keys = OFF")
        use_immediate_transactions(connection)
    try:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=sqlite,
            transactional_ddl=True if sqlite else None,
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
            if sqlite:
                problems = connection.execute(text("PRAGMA foreign_key_check")).all()
                if problems:
                    raise RuntimeError(f"foreign key violations after migrating: {problems[:5]}")
    finally:
        if sqlite:
            connection.connection.driver_connection.execute("PRAGMA foreign_keys = ON")


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:  # a caller passed its own connection (and holds any lock)
        _migrate(connection)
        return
    engine = create_engine(database_url(), poolclass=NullPool)
    try:
        with engine.connect() as connection, migration_lock(connection):
            _migrate(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
