"""`worker.subtasks.TaskLease` on a real store (SQLite and Postgres): it keeps an eval's and a
pre-flight's lease alive past its first expiry, notices a lease that is not held any more, and
rides out a store it cannot reach; and how a failed task is logged."""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from jobstore import JobError, Store
from tests.service_fixtures import sqlite_url
from worker.subtasks import TaskLease, log_failure

LEASE = 0.9  # seconds: a renewal every 0.3 s


def _wait_for(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.parametrize("kind", ["eval", "preflight"])
def test_the_lease_is_renewed_then_lost_when_the_task_is_not_held(store: Any, kind: str) -> None:
    tenant = store.get_or_create_tenant("acme")
    job, _ = store.create_job(tenant.id, spec={"base_model": "tiny"})
    create, claim, renew, get, fail = (
        getattr(store, name.format(kind))
        for name in ("create_{}", "claim_{}", "renew_{}_lease", "get_{}", "fail_{}")
    )
    task = create(tenant.id, job.id, config={})
    claimed = claim(task.id, "w1", lease_seconds=LEASE)
    first_expiry = claimed.lease_expires_at if kind == "eval" else None
    outcomes: list[str] = []
    lease = TaskLease(
        kind,
        task.id,
        partial(renew, task.id, "w1", lease_seconds=LEASE),
        LEASE,
        on_renewal=outcomes.append,
    )
    with lease:
        _wait_for(lambda: outcomes.count("ok") >= 3)  # 0.9 s and more: past the first expiry
        assert not lease.lost.is_set()
        assert get(task.id).status == "running"
        if first_expiry is not None:
            assert get(task.id).lease_expires_at > first_expiry
        # another worker could not take it over: the lease is live
        assert claim(task.id, "w2", lease_seconds=LEASE) is None
        fail(task.id, error=JobError("cancelled", "gone", "user"))  # not held any more
        _wait_for(lease.lost.is_set)
    assert outcomes[-1] == "lost" and set(outcomes) == {"ok", "lost"}


def test_a_store_it_cannot_reach_is_retried_not_taken_for_a_lost_lease(tmp_path: Path) -> None:
    away = Store(sqlite_url(tmp_path / "no-such-dir" / "opsd.db"))  # every statement fails
    outcomes: list[str] = []
    try:
        lease = TaskLease(
            "eval",
            "eval_x",
            partial(away.renew_eval_lease, "eval_x", "w1", lease_seconds=LEASE),
            LEASE,
            on_renewal=outcomes.append,
        )
        with lease:
            _wait_for(lambda: len(outcomes) >= 2)
        assert set(outcomes) == {"error"} and not lease.lost.is_set()
    finally:
        away.close()


def test_a_system_failure_is_logged_with_its_traceback_a_user_one_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="opsd.worker")
    try:
        raise MemoryError("boom")
    except MemoryError:
        log_failure("eval", "eval_1", JobError("out_of_memory", "ran out", "system"))
        log_failure("preflight", "pf_1", JobError("dataset_error", "no such file", "user"))
    system, user = caplog.records
    assert (system.levelno, system.getMessage()) == (logging.ERROR, "eval eval_1 failed: ran out")
    assert system.exc_info is not None and system.exc_info[0] is MemoryError
    assert (user.levelno, user.getMessage()) == (
        logging.INFO,
        "preflight pf_1 failed: no such file",
    )
    assert not user.exc_info
