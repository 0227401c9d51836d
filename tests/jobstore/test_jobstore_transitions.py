"""The job state machine: every operation from every state against TRANSITIONS, terminal states
frozen, leases (claim race, heartbeat, lease loss) and requeue of expired leases."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from jobstore import (
    CANCELLED,
    CANCELLING,
    FAILED,
    JOB_STATUSES,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL_STATUSES,
    TRANSITIONS,
    JobError,
    JobRecord,
    Store,
)

OWNER = "worker-1"  # make_job's running jobs are owned by this worker
OTHER = "worker-2"
FAR_FUTURE = datetime(2999, 1, 1, tzinfo=UTC)
ERROR = JobError("out_of_memory", "CUDA out of memory", "system")

Operation = Callable[[Store, JobRecord], Any]
OPERATIONS: dict[str, Operation] = {
    "claim": lambda s, j: s.claim_job(j.id, OTHER, lease_seconds=60),
    "request_cancel": lambda s, j: s.request_cancel(j.id),
    "finish_owner": lambda s, j: s.finish_job(j.id, OWNER, adapter_uri="file:///adapter"),
    "finish_other": lambda s, j: s.finish_job(j.id, OTHER, adapter_uri="file:///adapter"),
    "fail_owner": lambda s, j: s.fail_job(j.id, error=ERROR, worker_id=OWNER),
    "fail_other": lambda s, j: s.fail_job(j.id, error=ERROR, worker_id=OTHER),
    "fail_anyone": lambda s, j: s.fail_job(j.id, error=ERROR),
    "mark_cancelled_owner": lambda s, j: s.mark_cancelled(j.id, OWNER),
    "mark_cancelled_other": lambda s, j: s.mark_cancelled(j.id, OTHER),
    "requeue_expired": lambda s, j: s.requeue_expired(now=FAR_FUTURE),
}

# The status after each operation, from each live state; terminal states never change.
EXPECTED: dict[str, dict[str, str]] = {
    QUEUED: {
        "claim": RUNNING,
        "request_cancel": CANCELLED,
        "fail_anyone": FAILED,
    },
    RUNNING: {
        "request_cancel": CANCELLING,
        "finish_owner": SUCCEEDED,
        "fail_owner": FAILED,
        "fail_anyone": FAILED,
        "mark_cancelled_owner": CANCELLED,
        "requeue_expired": QUEUED,
    },
    CANCELLING: {
        "finish_owner": SUCCEEDED,
        "fail_owner": FAILED,
        "fail_anyone": FAILED,
        "mark_cancelled_owner": CANCELLED,
        "requeue_expired": CANCELLED,
    },
}


def _expected(status: str, operation: str) -> str:
    return EXPECTED.get(status, {}).get(operation, status)


def test_expected_table_exercises_every_allowed_transition_and_nothing_else() -> None:
    exercised = {
        (status, _expected(status, op))
        for status in JOB_STATUSES
        for op in OPERATIONS
        if _expected(status, op) != status
    }
    allowed = {(src, dst) for src, targets in TRANSITIONS.items() for dst in targets}
    assert exercised == allowed


@pytest.mark.parametrize("status", JOB_STATUSES)
def test_every_operation_from_every_state(
    store: Store, make_job: Callable[..., JobRecord], status: str
) -> None:
    for name, operation in OPERATIONS.items():
        job = make_job(status)
        events_before = store.list_events(job.id)
        result = operation(store, job)
        after = store.get_job(job.id)
        assert after is not None
        expected = _expected(status, name)
        assert after.status == expected, (status, name)
        changed = expected != status
        new_events = store.list_events(job.id, after_id=events_before[-1].id)
        if changed:
            assert expected in TRANSITIONS[status]
            assert [e.kind for e in new_events] == [
                "requeued" if expected == QUEUED else expected
            ], (status, name)
            assert after.updated_at > job.updated_at
        else:
            assert after == job, (status, name)  # nothing at all changed
            assert new_events == [], (status, name)
        if name == "claim":
            assert (result is not None) == changed
        elif name == "request_cancel":
            assert result == after
        elif name == "requeue_expired":  # (jobs left running by earlier rounds come back too)
            assert (job.id in result) == (changed and expected == QUEUED)
        else:
            assert result is changed, (status, name)


@pytest.mark.parametrize("status", sorted(TERMINAL_STATUSES))
def test_terminal_states_never_change(
    store: Store, make_job: Callable[..., JobRecord], status: str
) -> None:
    job = make_job(status)
    for operation in OPERATIONS.values():
        operation(store, job)
    assert store.heartbeat(job.id, OWNER, lease_seconds=60) is None
    store.update_progress(job.id, OWNER, step=99, total_steps=100)
    assert store.get_job(job.id) == job


def test_claim_sets_the_lease_and_records_the_attempt(
    store: Store, make_job: Callable[..., JobRecord]
) -> None:
    job = make_job()
    before = datetime.now(UTC)
    claimed = store.claim_job(job.id, OTHER, lease_seconds=30)
    assert claimed is not None and claimed == store.get_job(job.id)
    assert claimed.status == RUNNING and claimed.lease_owner == OTHER
    assert claimed.started_at is not None and claimed.started_at >= before
    assert claimed.lease_expires_at is not None
    assert timedelta(seconds=29) < claimed.lease_expires_at - before < timedelta(seconds=31)
    event = store.list_events(job.id)[-1]
    assert (event.kind, event.data) == (RUNNING, {"worker_id": OTHER, "attempt": 1})
    assert store.claim_job(job.id, OWNER, lease_seconds=30) is None


def test_claim_race_has_one_winner(store: Store, make_job: Callable[..., JobRecord]) -> None:
    job = make_job()
    workers = 8
    barrier = threading.Barrier(workers)
    won: list[str] = []
    errors: list[BaseException] = []

    def claim(worker: str) -> None:
        barrier.wait()
        try:
            if store.claim_job(job.id, worker, lease_seconds=60) is not None:
                won.append(worker)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(won) == 1
    assert store.get_job(job.id).lease_owner == won[0]  # type: ignore[union-attr]
    assert [e.kind for e in store.list_events(job.id)] == [QUEUED, RUNNING]


def test_heartbeat_extends_the_lease_and_reports_cancelling(
    store: Store, make_job: Callable[..., JobRecord]
) -> None:
    job = make_job(RUNNING)
    assert store.heartbeat(job.id, OWNER, lease_seconds=600) == RUNNING
    extended = store.get_job(job.id)
    assert extended.lease_expires_at > job.lease_expires_at  # type: ignore[operator,union-attr]
    assert store.heartbeat(job.id, OTHER, lease_seconds=600) is None
    store.request_cancel(job.id)
    assert store.heartbeat(job.id, OWNER, lease_seconds=600) == CANCELLING
    assert store.heartbeat("job_missing", OWNER, lease_seconds=600) is None


def test_heartbeat_after_lease_loss(store: Store, make_job: Callable[..., JobRecord]) -> None:
    job = make_job(RUNNING)
    assert store.requeue_expired(now=FAR_FUTURE) == [job.id]
    assert store.heartbeat(job.id, OWNER, lease_seconds=60) is None
    assert store.claim_job(job.id, OTHER, lease_seconds=60) is not None
    # the old owner has lost the job for good: no heartbeat, progress or outcome
    assert store.heartbeat(job.id, OWNER, lease_seconds=60) is None
    store.update_progress(job.id, OWNER, step=50, total_steps=100)
    assert not store.finish_job(job.id, OWNER, adapter_uri="file:///stale")
    assert not store.fail_job(job.id, error=ERROR, worker_id=OWNER)
    assert not store.mark_cancelled(job.id, OWNER)
    current = store.get_job(job.id)
    assert current is not None
    assert (current.status, current.lease_owner, current.progress_step) == (RUNNING, OTHER, 0)
    assert store.heartbeat(job.id, OTHER, lease_seconds=60) == RUNNING


def test_an_expired_lease_not_yet_taken_back_is_renewed_by_its_owner(
    store: Store, make_job: Callable[..., JobRecord]
) -> None:
    job = make_job()
    store.claim_job(job.id, OWNER, lease_seconds=-1)  # already expired
    assert store.heartbeat(job.id, OWNER, lease_seconds=600) == RUNNING
    assert store.requeue_expired() == []
    assert store.get_job(job.id).status == RUNNING  # type: ignore[union-attr]


def test_update_progress(store: Store, make_job: Callable[..., JobRecord]) -> None:
    job = make_job(RUNNING)
    store.update_progress(job.id, OWNER, step=3, total_steps=100)
    store.update_progress(job.id, OWNER, step=4, total_steps=None)  # keeps the total
    store.update_progress(job.id, OTHER, step=90, total_steps=90)  # not the owner: ignored
    current = store.get_job(job.id)
    assert (current.progress_step, current.total_steps) == (4, 100)  # type: ignore[union-attr]


def test_outcomes_are_recorded(store: Store, make_job: Callable[..., JobRecord]) -> None:
    done = make_job(RUNNING)
    assert store.finish_job(done.id, OWNER, adapter_uri="s3://bucket/adapter")
    finished = store.get_job(done.id)
    assert finished.adapter_uri == "s3://bucket/adapter"  # type: ignore[union-attr]
    assert finished.finished_at is not None and finished.is_terminal  # type: ignore[union-attr]
    assert store.list_events(done.id)[-1].data == {"adapter_uri": "s3://bucket/adapter"}

    failed = make_job(RUNNING)
    assert store.fail_job(failed.id, error=ERROR, worker_id=OWNER)
    record = store.get_job(failed.id)
    assert record.error == ERROR and record.finished_at is not None  # type: ignore[union-attr]
    event = store.list_events(failed.id)[-1]
    assert (event.kind, event.data) == (FAILED, {"error": ERROR.to_dict()})

    queued = make_job()
    cancelled = store.request_cancel(queued.id)
    assert cancelled.status == CANCELLED and cancelled.finished_at is not None  # type: ignore[union-attr]


def test_requeue_expired(store: Store, make_job: Callable[..., JobRecord]) -> None:
    retry = make_job(RUNNING)
    last_try = make_job(RUNNING, max_attempts=1)
    stopping = make_job(CANCELLING)
    fresh = make_job(RUNNING)
    queued = make_job()
    # only `fresh` still holds a valid lease at `now`
    store.heartbeat(fresh.id, OWNER, lease_seconds=3600)
    now = datetime.now(UTC) + timedelta(minutes=5)
    assert store.requeue_expired(now=now) == [retry.id]

    requeued = store.get_job(retry.id)
    assert requeued is not None
    assert (requeued.status, requeued.attempt) == (QUEUED, 2)
    assert requeued.lease_owner is None and requeued.lease_expires_at is None
    assert requeued.started_at == retry.started_at and requeued.finished_at is None
    event = store.list_events(retry.id)[-1]
    assert (event.kind, event.data) == ("requeued", {"attempt": 2, "previous_owner": OWNER})

    lost = store.get_job(last_try.id)
    assert lost.status == FAILED and lost.error is not None  # type: ignore[union-attr]
    assert (lost.error.code, lost.error.category) == ("worker_lost", "system")  # type: ignore[union-attr]
    assert store.get_job(stopping.id).status == CANCELLED  # type: ignore[union-attr]
    assert store.get_job(fresh.id).status == RUNNING  # type: ignore[union-attr]
    assert store.get_job(queued.id) == queued
    assert store.requeue_expired(now=now) == []  # nothing left to take back

    # the requeued job runs again (attempt 2), and is failed once its attempts are exhausted
    store.finish_job(fresh.id, OWNER, adapter_uri="file:///adapter")
    again = store.claim_job(retry.id, OTHER, lease_seconds=60)
    assert again is not None and again.attempt == 2 and again.started_at == retry.started_at
    assert store.list_events(retry.id)[-1].data == {"worker_id": OTHER, "attempt": 2}
    assert store.requeue_expired(now=FAR_FUTURE) == [retry.id]
    store.claim_job(retry.id, OTHER, lease_seconds=60)
    assert store.requeue_expired(now=FAR_FUTURE) == []
    final = store.get_job(retry.id)
    assert (final.status, final.attempt) == (FAILED, 3)  # type: ignore[union-attr]


def test_requeue_stale_queued_touches_only_old_queued_jobs(
    store: Store, make_job: Callable[..., JobRecord]
) -> None:
    from datetime import timedelta

    old = make_job(QUEUED)
    running = make_job(RUNNING)
    done = make_job(SUCCEEDED)
    later = old.updated_at + timedelta(minutes=20)
    assert store.requeue_stale_queued(older_than=timedelta(minutes=15), now=later) == [old.id]
    assert store.requeue_stale_queued(older_than=timedelta(minutes=15), now=later) == []
    job = store.get_job(old.id)
    assert job.status == QUEUED and job.attempt == 1 and job.updated_at == later
    assert store.get_job(running.id).status == RUNNING
    assert store.get_job(done.id).status == SUCCEEDED


def test_release_job_requeues_as_the_same_attempt_for_the_owner_only(
    store: Store, make_job: Callable[..., JobRecord]
) -> None:
    job = make_job(RUNNING)
    assert not store.release_job(job.id, OTHER)
    assert store.release_job(job.id, OWNER)
    released = store.get_job(job.id)
    assert (released.status, released.attempt, released.lease_owner) == (QUEUED, job.attempt, None)
    assert store.list_events(job.id)[-1].kind == "released"
    assert not store.release_job(job.id, OWNER)  # not running any more
    done = make_job(SUCCEEDED)
    assert not store.release_job(done.id, OWNER) and store.get_job(done.id).status == SUCCEEDED
