"""Jobs: creation, idempotency (also under concurrency), tenant isolation, cursor pagination."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from jobstore import (
    CANCELLED,
    CANCELLING,
    QUEUED,
    RUNNING,
    IdempotencyConflict,
    InvalidCursor,
    JobRecord,
    Store,
    TenantNotFound,
    TenantRecord,
)
from jobstore.cursor import encode_cursor
from jobstore.ids import new_id
from jobstore.tables import jobs

SPEC = {"base_model": "Qwen/Qwen3-1.7B", "dataset_uri": "file:///data/train.jsonl"}
JOB_ID = re.compile(r"^job_[0-9a-hjkmnp-tv-z]{26}$")


def test_create_job(store: Store, tenant: TenantRecord) -> None:
    before = datetime.now(UTC)
    job, created = store.create_job(tenant.id, spec=SPEC, metadata={"team": "rl"}, max_attempts=5)
    assert created
    assert JOB_ID.match(job.id)
    assert job.tenant_id == tenant.id
    assert job.status == QUEUED and not job.is_terminal
    assert job.spec == SPEC and job.metadata == {"team": "rl"}
    assert (job.attempt, job.max_attempts, job.progress_step, job.total_steps) == (1, 5, 0, None)
    assert job.lease_owner is None and job.lease_expires_at is None
    assert job.error is None and job.adapter_uri is None and job.idempotency_key is None
    assert job.started_at is None and job.finished_at is None
    assert before <= job.created_at == job.updated_at <= datetime.now(UTC)
    assert job.created_at.utcoffset() == timedelta(0)
    assert store.get_job(job.id) == job
    [event] = store.list_events(job.id)
    assert (event.kind, event.data) == ("queued", {"attempt": 1})
    assert store.create_job(tenant.id, spec=SPEC)[0].metadata == {}


def test_job_ids_sort_by_creation_time() -> None:
    ids = [new_id("job", now_ms=ms) for ms in (1, 2, 1_000, 1_700_000_000_000, 2**47)]
    assert ids == sorted(ids)
    assert len({new_id("job", now_ms=5) for _ in range(1000)}) == 1000


def test_create_job_for_unknown_tenant(store: Store) -> None:
    with pytest.raises(TenantNotFound):
        store.create_job("ten_missing", spec=SPEC)
    with pytest.raises(ValueError):
        store.create_job("ten_missing", spec=SPEC, max_attempts=0)


def test_idempotent_create(store: Store, tenant: TenantRecord, other_tenant: TenantRecord) -> None:
    job, created = store.create_job(tenant.id, spec=SPEC, idempotency_key="k1", request_hash="h1")
    assert created and job.idempotency_key == "k1"
    again, created_again = store.create_job(
        tenant.id, spec=SPEC, idempotency_key="k1", request_hash="h1"
    )
    assert (again, created_again) == (job, False)
    with pytest.raises(IdempotencyConflict) as conflict:
        store.create_job(tenant.id, spec={"other": 1}, idempotency_key="k1", request_hash="h2")
    assert conflict.value.job_id == job.id and conflict.value.key == "k1"
    with pytest.raises(IdempotencyConflict):
        store.create_job(tenant.id, spec=SPEC, idempotency_key="k1", request_hash=None)
    # the key is per tenant; no key means no de-duplication
    theirs, created = store.create_job(
        other_tenant.id, spec=SPEC, idempotency_key="k1", request_hash="h1"
    )
    assert created and theirs.id != job.id
    assert (
        store.create_job(tenant.id, spec=SPEC)[0].id != store.create_job(tenant.id, spec=SPEC)[0].id
    )
    # a key without a hash replays as long as the hash stays absent
    bare, _ = store.create_job(tenant.id, spec=SPEC, idempotency_key="k2")
    assert store.create_job(tenant.id, spec=SPEC, idempotency_key="k2") == (bare, False)
    assert len(store.list_events(job.id)) == 1  # replays add no event
    assert len(store.list_jobs(tenant.id, limit=100)[0]) == 4


def test_concurrent_creates_with_one_key_make_one_job(store: Store, tenant: TenantRecord) -> None:
    threads_n = 8
    barrier = threading.Barrier(threads_n)
    results: list[tuple[JobRecord, bool]] = []
    errors: list[BaseException] = []

    def create() -> None:
        barrier.wait()
        try:
            results.append(
                store.create_job(tenant.id, spec=SPEC, idempotency_key="race", request_hash="h")
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len({job.id for job, _ in results}) == 1
    assert sorted(created for _, created in results) == [False] * (threads_n - 1) + [True]
    assert len(store.list_jobs(tenant.id)[0]) == 1


def test_get_job_is_tenant_scoped(
    store: Store,
    tenant: TenantRecord,
    other_tenant: TenantRecord,
    make_job: Callable[..., JobRecord],
) -> None:
    job = make_job()
    assert store.get_job(job.id, tenant_id=tenant.id) == job
    assert store.get_job(job.id, tenant_id=other_tenant.id) is None
    assert store.get_job(job.id) == job
    assert store.get_job("job_missing") is None


def test_cancel_is_tenant_scoped(
    store: Store,
    tenant: TenantRecord,
    other_tenant: TenantRecord,
    make_job: Callable[..., JobRecord],
) -> None:
    job = make_job(RUNNING)
    assert store.request_cancel(job.id, tenant_id=other_tenant.id) is None
    assert store.get_job(job.id).status == RUNNING  # type: ignore[union-attr]
    assert store.request_cancel(job.id, tenant_id=tenant.id).status == CANCELLING  # type: ignore[union-attr]
    assert store.request_cancel("job_missing") is None


def _all_pages(store: Store, tenant_id: str, **kwargs: object) -> list[list[JobRecord]]:
    pages, cursor = [], None
    while True:
        page, cursor = store.list_jobs(tenant_id, cursor=cursor, **kwargs)  # type: ignore[arg-type]
        pages.append(page)
        if cursor is None:
            return pages


def test_list_jobs_pages_newest_first_without_dupes_or_gaps(
    store: Store,
    tenant: TenantRecord,
    other_tenant: TenantRecord,
    make_job: Callable[..., JobRecord],
) -> None:
    made = [make_job() for _ in range(23)]
    make_job(tenant_id=other_tenant.id)
    pages = _all_pages(store, tenant.id, limit=5)
    assert [len(p) for p in pages] == [5, 5, 5, 5, 3]
    listed = [job.id for page in pages for job in page]
    expected = [job.id for job in sorted(made, key=lambda j: (j.created_at, j.id), reverse=True)]
    assert listed == expected
    exact, cursor = store.list_jobs(tenant.id, limit=23)
    assert len(exact) == 23 and cursor is None
    assert store.list_jobs(other_tenant.id, limit=100)[0][0].tenant_id == other_tenant.id
    assert len(store.list_jobs(other_tenant.id, limit=100)[0]) == 1
    assert store.list_jobs("ten_nobody") == ([], None)


def test_list_jobs_breaks_created_at_ties_by_id(
    store: Store, tenant: TenantRecord, make_job: Callable[..., JobRecord]
) -> None:
    made = [make_job() for _ in range(9)]
    same = datetime(2025, 1, 1, tzinfo=UTC)
    with store.engine.begin() as connection:
        connection.execute(sa.update(jobs).values(created_at=same))
    listed = [job.id for page in _all_pages(store, tenant.id, limit=2) for job in page]
    assert listed == sorted((job.id for job in made), reverse=True)


def test_list_jobs_status_filter(
    store: Store, tenant: TenantRecord, make_job: Callable[..., JobRecord]
) -> None:
    cancelled = {make_job(CANCELLED).id for _ in range(7)}
    running = {make_job(RUNNING).id for _ in range(2)}
    queued = {make_job().id for _ in range(3)}
    by_status = {
        status: [
            job.id for page in _all_pages(store, tenant.id, status=status, limit=3) for job in page
        ]
        for status in (CANCELLED, RUNNING, QUEUED)
    }
    assert set(by_status[CANCELLED]) == cancelled and len(by_status[CANCELLED]) == 7
    assert set(by_status[RUNNING]) == running
    assert set(by_status[QUEUED]) == queued
    assert store.list_jobs(tenant.id, status="succeeded") == ([], None)
    with pytest.raises(ValueError):
        store.list_jobs(tenant.id, status="bogus")


def test_list_jobs_rejects_cursors_it_did_not_issue(
    store: Store, tenant: TenantRecord, make_job: Callable[..., JobRecord]
) -> None:
    for _ in range(3):
        make_job()
    _, cursor = store.list_jobs(tenant.id, limit=1)
    assert cursor is not None
    tampered = cursor[:-3] + ("AAA" if cursor[-3:] != "AAA" else "BBB")
    forged_payload = encode_cursor(datetime.now(UTC), "job_x")[:-2]
    for bad in ["", "abc", "!!!", "bm9wZQ", tampered, forged_payload, cursor + "x" * 600, "é"]:
        with pytest.raises(InvalidCursor):
            store.list_jobs(tenant.id, cursor=bad)
    with pytest.raises(ValueError):
        store.list_jobs(tenant.id, limit=0)
    page, _ = store.list_jobs(tenant.id, limit=5, cursor=cursor)
    assert len(page) == 2
