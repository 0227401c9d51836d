"""Fair dispatch through a real Celery worker (`opsd worker` subprocess) on Redis and Postgres
(issue 14): two tenants and one worker; the messages of a class are turns, and each turn runs the
next job in tenant round-robin order, so the single job of one tenant runs second although
another tenant queued four jobs before it. (A worker of the 2-GPU class: test_multiprocess_jobs.)

The jobs fail at once (their base model is a folder that does not exist), which keeps the tests
fast: what is checked is the order in which the worker claimed them. A second test runs the task
itself (`apply`) under a per-tenant cap of one running job.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from opsd_service.settings import ServiceSettings
from tests.worker.helpers import (
    REDIS_TEST_URL,
    ServiceProcess,
    flush_redis,
    service_env,
    wait_status,
)
from worker.queue import enqueue_job, make_celery

FINAL = {"succeeded", "failed", "cancelled"}


def _claimed_at(store: Any, job_id: str) -> Any:
    return next(e.created_at for e in store.list_events(job_id) if e.kind == "running")


def test_one_worker_serves_two_tenants_in_turn(
    pg_url: str, tiny_spec_dict: Any, tmp_path: Path
) -> None:
    from jobstore import Store

    flush_redis()
    values: dict[str, Any] = {
        "home": tmp_path / "home",
        "database_url": pg_url,
        "broker_url": REDIS_TEST_URL,
        "artifacts_uri": str(tmp_path / "artifacts"),
        "queue": f"opsd-fair-{uuid.uuid4().hex[:8]}",
    }
    store, celery = Store(pg_url), make_celery(ServiceSettings(**values))
    try:
        missing = str(tmp_path / "no-such-model")
        spec = tiny_spec_dict(base_model=missing)
        many, single = store.get_or_create_tenant("many"), store.get_or_create_tenant("single")
        order = [store.create_job(many.id, spec=spec)[0].id for _ in range(4)]
        order.append(store.create_job(single.id, spec=spec)[0].id)
        for job_id in order:  # one message per job, in submission order: four of A, then B's
            enqueue_job(celery, job_id)

        env = service_env(**values)
        with ServiceProcess(["worker"], env, tmp_path / "worker.log") as worker:
            jobs = [wait_status(store, j, FINAL, timeout=120, worker=worker) for j in order]
            assert worker.stop() == 0
        assert all(job.status == "failed" for job in jobs)
        claimed = sorted(order, key=lambda job_id: _claimed_at(store, job_id))
        assert claimed == [order[0], order[4], *order[1:4]]  # B's single job ran second
    finally:
        store.close()


def test_a_turn_skips_a_tenant_at_its_cap_and_a_finished_job_gives_the_class_a_turn(
    pg_url: str, tiny_spec_dict: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`OPSD_TENANT_MAX_RUNNING_JOBS=1`: the Celery task `opsd.run_job` (run here with
    `apply`, on the real Redis queue) passes over a tenant that already runs a job, drops a turn
    that finds only capped tenants, and sends its class a new turn when its job ended while
    jobs still wait."""
    import redis

    from jobstore import Store
    from worker.queue import RUN_JOB_TASK, class_queue

    flush_redis()
    values: dict[str, Any] = {
        "home": tmp_path / "home",
        "database_url": pg_url,
        "broker_url": REDIS_TEST_URL,
        "artifacts_uri": str(tmp_path / "artifacts"),
        "queue": f"opsd-cap-{uuid.uuid4().hex[:8]}",
        "tenant_max_running_jobs": 1,
    }
    for name, value in values.items():  # the task reads its settings from the environment
        monkeypatch.setenv(f"OPSD_{name.upper()}", str(value))
    import worker.tasks  # noqa: F401 - registers the task

    celery = make_celery(ServiceSettings(**values))
    celery.set_current()
    task = celery.tasks[RUN_JOB_TASK]
    store, broker = Store(pg_url), redis.Redis.from_url(REDIS_TEST_URL)
    queue = class_queue(values["queue"], 1)
    try:
        spec = tiny_spec_dict(base_model=str(tmp_path / "no-such-model"))  # fails at once
        busy, other = store.get_or_create_tenant("busy"), store.get_or_create_tenant("other")
        elsewhere, _ = store.create_job(busy.id, spec=spec)
        assert store.claim_job(elsewhere.id, "another-worker", lease_seconds=600)
        waiting, _ = store.create_job(busy.id, spec=spec)
        single, _ = store.create_job(other.id, spec=spec)

        # the turn sent for `waiting` runs `single`: `busy` is at its cap
        assert task.apply(args=[waiting.id], kwargs={"gpus": 1}).get() == "failed"
        assert store.get_job(single.id).status == "failed"
        assert store.get_job(waiting.id).status == "queued"
        assert broker.llen(queue) == 1  # the class got a turn back: `waiting` still waits
        broker.delete(queue)
        # a turn while `busy` is still at its cap is dropped (no claim, no new message)
        assert task.apply(args=[waiting.id], kwargs={"gpus": 1}).get() == "skipped"
        assert store.get_job(waiting.id).status == "queued" and broker.llen(queue) == 0
        # once `busy`'s other job ended, a turn runs `waiting`
        assert store.finish_job(elsewhere.id, "another-worker", adapter_uri="file:///a")
        assert task.apply(args=[waiting.id], kwargs={"gpus": 1}).get() == "failed"
        assert store.get_job(waiting.id).error.code == "model_load_error"
    finally:
        broker.close()
        store.close()
