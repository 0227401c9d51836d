"""The store's eval queries on PostgreSQL and SQLite: create/get (tenant-isolated), claim under
a lease (once; an expired lease can be taken over, as a new attempt), renew, finish, fail, list,
cascade delete, and the reaper's sweeps (lost evals requeued or failed, stale queued re-sent)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from jobstore import IdempotencyConflict, JobError, JobNotFound, Store
from jobstore.evals import evals
from jobstore.migrate import upgrade
from tests.service_fixtures import fresh_postgres_url, sqlite_url

CONFIG = {"dataset_uri": "/data/bench.jsonl", "n": 4}


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    url, drop = fresh_postgres_url()
    yield url
    drop()


@pytest.fixture(params=["postgres", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
    else:
        url = sqlite_url(tmp_path / "opsd.db")
        upgrade(url)
    instance = Store(url)
    yield instance
    instance.close()


def _job(store: Store, tenant_name: str = "acme") -> tuple[str, str]:
    tenant = store.get_or_create_tenant(tenant_name)
    job, _ = store.create_job(tenant.id, spec={"base_model": "m", "dataset_uri": "d"})
    return tenant.id, job.id


def test_create_get_list_and_tenant_isolation(store: Store) -> None:
    tenant_id, job_id = _job(store)
    other_id, _ = _job(store, "globex")
    record = store.create_eval(tenant_id, job_id, config=CONFIG)
    assert record.id.startswith("eval_") and record.status == "queued"
    assert record.config == CONFIG and record.results is None and record.error is None
    assert record.created_at.tzinfo is not None and record.finished_at is None
    assert store.get_eval(record.id) == record
    assert store.get_eval(record.id, tenant_id=tenant_id) == record
    assert store.get_eval(record.id, tenant_id=other_id) is None
    assert store.get_eval("eval_missing") is None
    second = store.create_eval(tenant_id, job_id, config={**CONFIG, "n": 8})
    assert [e.id for e in store.list_evals(job_id)] == [record.id, second.id]
    assert store.list_evals(job_id, tenant_id=other_id) == []
    with pytest.raises(JobNotFound):
        store.create_eval(tenant_id, "job_missing", config=CONFIG)


def test_an_idempotency_key_makes_one_eval(store: Store) -> None:
    tenant_id, job_id = _job(store)
    other_tenant, other_job = _job(store, "globex")
    key = f"k-{job_id}"
    first, created = store.create_eval_once(
        tenant_id, job_id, config=CONFIG, idempotency_key=key, request_hash="h1"
    )
    assert created
    again = store.create_eval_once(
        tenant_id, job_id, config=CONFIG, idempotency_key=key, request_hash="h1"
    )
    assert again == (first, False)
    with pytest.raises(IdempotencyConflict, match=f"eval {first.id}"):
        store.create_eval_once(
            tenant_id, job_id, config=CONFIG, idempotency_key=key, request_hash="h2"
        )
    theirs, created = store.create_eval_once(
        other_tenant, other_job, config=CONFIG, idempotency_key=key, request_hash="h1"
    )
    assert created and theirs.id != first.id
    with pytest.raises(JobNotFound):
        store.create_eval_once(
            tenant_id, "job_missing", config=CONFIG, idempotency_key=f"{key}-2", request_hash="h"
        )
    assert [e.id for e in store.list_evals(job_id)] == [first.id]


def test_claim_finish_and_fail_are_conditional(store: Store) -> None:
    tenant_id, job_id = _job(store)
    record = store.create_eval(tenant_id, job_id, config=CONFIG)
    claimed = store.claim_eval(record.id, "w1", lease_seconds=60)
    assert claimed is not None and claimed.status == "running" and claimed.lease_owner == "w1"
    assert claimed.started_at is not None
    assert store.claim_eval(record.id, "w2", lease_seconds=60) is None  # live lease: no takeover
    assert store.renew_eval_lease(record.id, "w1", lease_seconds=60)
    assert not store.renew_eval_lease(record.id, "w2", lease_seconds=60)
    assert not store.finish_eval(record.id, results={"adapter": {}}, worker_id="w2")
    results = {"adapter": {"avg_at_n": 0.5, "pass_at_k": {"1": 0.5}}, "base": None}
    assert store.finish_eval(record.id, results=results, worker_id="w1")
    done = store.get_eval(record.id)
    assert done is not None and done.status == "succeeded" and done.results == results
    assert done.finished_at is not None and done.is_terminal
    assert not store.fail_eval(record.id, error=JobError("x", "y", "system"))  # terminal stays
    assert store.claim_eval(record.id, "w3") is None

    queued = store.create_eval(tenant_id, job_id, config=CONFIG)
    assert store.fail_eval(queued.id, error=JobError("queue_unavailable", "down", "system"))
    failed = store.get_eval(queued.id)
    assert failed is not None and failed.status == "failed"
    assert failed.error == JobError("queue_unavailable", "down", "system")


def test_an_expired_lease_is_taken_over(store: Store) -> None:
    tenant_id, job_id = _job(store)
    record = store.create_eval(tenant_id, job_id, config=CONFIG)
    assert store.claim_eval(record.id, "lost-worker", lease_seconds=60) is not None
    _expire_lease(store, record.id)
    taken = store.claim_eval(record.id, "w2", lease_seconds=60)
    assert taken is not None and taken.lease_owner == "w2"
    assert (record.attempt, taken.attempt) == (1, 2)  # a takeover is a new attempt
    assert not store.renew_eval_lease(record.id, "lost-worker", lease_seconds=60)
    assert not store.finish_eval(record.id, results={}, worker_id="lost-worker")
    _expire_lease(store, record.id)
    assert store.claim_eval(record.id, "w3", max_attempts=2) is None  # attempts used up


def _expire_lease(store: Store, eval_id: str) -> None:
    past = datetime.now(UTC) - timedelta(seconds=5)
    with store.engine.begin() as connection:
        connection.execute(
            sa.update(evals).where(evals.c.id == eval_id).values(lease_expires_at=past)
        )


def test_lost_evals_are_requeued_then_failed_on_their_last_attempt(store: Store) -> None:
    tenant_id, job_id = _job(store)
    record = store.create_eval(tenant_id, job_id, config=CONFIG)
    alive = store.create_eval(tenant_id, job_id, config=CONFIG)
    assert store.claim_eval(alive.id, "live-worker", lease_seconds=3600) is not None
    soon = datetime.now(UTC) + timedelta(seconds=120)
    for attempt in (1, 2):
        claimed = store.claim_eval(record.id, f"w{attempt}", lease_seconds=60)
        assert claimed is not None and claimed.attempt == attempt
        assert record.id not in store.requeue_lost_evals(max_attempts=3)  # lease still live
        assert record.id in store.requeue_lost_evals(now=soon, max_attempts=3)
        requeued = store.get_eval(record.id)
        assert requeued is not None and requeued.status == "queued"
        assert (requeued.attempt, requeued.lease_owner) == (attempt + 1, None)
        assert not store.renew_eval_lease(record.id, f"w{attempt}", lease_seconds=60)
    assert store.claim_eval(record.id, "w3", lease_seconds=60) is not None
    assert record.id not in store.requeue_lost_evals(now=soon, max_attempts=3)
    failed = store.get_eval(record.id)
    assert failed is not None and failed.status == "failed" and failed.attempt == 3
    assert failed.error is not None and failed.error.code == "worker_lost"
    assert failed.error.category == "system" and "3 attempts" in failed.error.message
    still = store.get_eval(alive.id)
    assert still is not None and (still.status, still.attempt) == ("running", 1)


def test_stale_queued_evals_are_resent_once_per_period(store: Store) -> None:
    tenant_id, job_id = _job(store)
    stale = store.create_eval(tenant_id, job_id, config=CONFIG)
    running = store.create_eval(tenant_id, job_id, config=CONFIG)
    assert store.claim_eval(running.id, "w", lease_seconds=3600) is not None
    period = timedelta(minutes=10)
    later = datetime.now(UTC) + period + timedelta(seconds=1)
    mine = {stale.id, running.id}  # the PostgreSQL database is shared with other tests

    def resent(now: datetime | None = None) -> set[str]:
        return mine & set(store.resend_stale_queued_evals(older_than=period, now=now))

    assert resent() == set()  # just created
    assert resent(later) == {stale.id}
    assert resent(later) == set()  # re-sent at `later`: quiet for another period
    assert resent(later + period + timedelta(seconds=1)) == {stale.id}
    record = store.get_eval(stale.id)
    assert record is not None and (record.status, record.attempt) == ("queued", 1)


def test_evals_go_with_their_job(store: Store) -> None:
    tenant_id, job_id = _job(store)
    record = store.create_eval(tenant_id, job_id, config=CONFIG)
    with store.engine.begin() as connection:
        connection.exec_driver_sql(f"DELETE FROM jobs WHERE id = '{job_id}'")
    assert store.get_eval(record.id) is None
