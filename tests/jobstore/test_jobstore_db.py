"""`jobstore.db` on the real PostgreSQL: pooled connections that died while idle are replaced
before use, and reads run in autocommit (no transaction left open between statements)."""

from __future__ import annotations

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
