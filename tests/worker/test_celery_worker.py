"""Real Celery workers (`opsd worker` subprocesses) on a real broker and store.

Redis (a dedicated database, flushed) + Postgres: a job runs to `succeeded`; a worker SIGKILLed
mid-run loses its lease, the reaper of a second worker requeues the job (attempt 2), which
resumes from its last checkpoint and records every step exactly once. The embedded shape (file
broker + SQLite) runs a job too.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from opsd_service.settings import ServiceSettings
from tests.worker.helpers import (
    REDIS_TEST_URL,
    ServiceProcess,
    create_job,
    flush_redis,
    service_env,
    wait_for,
    wait_status,
)
from worker.queue import enqueue_job, make_celery

FINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture
def redis_stack(pg_url: str, tmp_path: Path) -> Iterator[tuple[dict[str, Any], Any, Any]]:
    """Settings (as keyword values), the store and a sending Celery app for Redis + Postgres."""
    from jobstore import Store

    flush_redis()
    values: dict[str, Any] = {
        "home": tmp_path / "home",
        "database_url": pg_url,
        "broker_url": REDIS_TEST_URL,
        "artifacts_uri": str(tmp_path / "artifacts"),
        "queue": f"opsd-test-{uuid.uuid4().hex[:8]}",
    }
    store = Store(pg_url)
    yield values, store, make_celery(ServiceSettings(**values))
    store.close()


def test_worker_runs_an_enqueued_job_on_redis_and_postgres(
    redis_stack: tuple[dict[str, Any], Any, Any], tiny_spec_dict: Any, tmp_path: Path
) -> None:
    values, store, celery = redis_stack
    job_id = create_job(store, tiny_spec_dict(checkpoint_every=2))
    with ServiceProcess(["worker"], service_env(**values), tmp_path / "worker.log") as worker:
        enqueue_job(celery, job_id)
        job = wait_status(store, job_id, FINAL, timeout=120, worker=worker)
        assert job.status == "succeeded", job.error
        assert Path(job.adapter_uri, "adapter_config.json").is_file()
        assert [s for s, _ in store.query_metrics(job_id)["loss"]] == [1, 2, 3]

        enqueue_job(celery, job_id)  # a duplicate delivery is acknowledged and skipped
        wait_for(lambda: f"job {job_id}: skipped" in worker.output(), timeout=30, what="skip")
        assert worker.stop() == 0  # SIGTERM: warm shutdown
    assert store.get_job(job_id).status == "succeeded"


def test_sigkilled_worker_job_is_requeued_and_resumes_from_its_checkpoint(
    redis_stack: tuple[dict[str, Any], Any, Any], tiny_spec_dict: Any, tmp_path: Path
) -> None:
    values, store, celery = redis_stack
    values.update(lease_seconds=3, heartbeat_seconds=1, reaper_interval_seconds=1)
    env = service_env(**values)
    steps = 40
    job_id = create_job(store, tiny_spec_dict(checkpoint_every=5, optim={"max_steps": steps}))

    def past_a_checkpoint() -> bool:
        checkpoints = store.list_checkpoints(job_id)
        loss = store.query_metrics(job_id, names=["loss"]).get("loss", [])
        return bool(checkpoints and loss and checkpoints[-1].step < loss[-1][0] < steps)

    with ServiceProcess(["worker"], env, tmp_path / "worker1.log") as first:
        enqueue_job(celery, job_id)
        wait_for(past_a_checkpoint, timeout=120, interval=0.05, what="metrics past a checkpoint")
        first.kill()
    job = store.get_job(job_id)
    assert (job.status, job.attempt) == ("running", 1)
    recorded = store.list_checkpoints(job_id)[-1].step

    with ServiceProcess(["worker"], env, tmp_path / "worker2.log") as second:
        job = wait_status(store, job_id, FINAL, timeout=120, worker=second)
        assert job.status == "succeeded", job.error
        assert job.attempt == 2 and job.progress_step == steps

    events = store.list_events(job_id)
    kinds = [e.kind for e in events]
    assert "requeued" in kinds and kinds.count("started") == 2
    resumed = [e for e in events if e.kind == "resumed"]
    assert len(resumed) == 1 and resumed[0].data["step"] >= recorded
    metrics = store.query_metrics(job_id)
    for name, points in metrics.items():
        step_list = [s for s, _ in points]
        assert len(step_list) == len(set(step_list)), name
    assert [s for s, _ in metrics["loss"]] == list(range(1, steps + 1))
    assert [c.step for c in store.list_checkpoints(job_id)] == list(range(5, steps + 1, 5))


def test_embedded_worker_with_file_broker_and_sqlite(tiny_spec_dict: Any, tmp_path: Path) -> None:
    from jobstore import Store
    from jobstore.migrate import upgrade

    settings = ServiceSettings(home=tmp_path / "home")  # every default: SQLite + file broker
    assert settings.broker_url.startswith("filesystem://")
    settings.home.mkdir(parents=True)
    upgrade(settings.database_url)
    store = Store(settings.database_url)
    job_id = create_job(store, tiny_spec_dict())
    enqueue_job(make_celery(settings), job_id)  # sent before any worker exists: it waits

    env = service_env(home=settings.home)
    with ServiceProcess(["worker"], env, tmp_path / "worker.log") as worker:
        job = wait_status(store, job_id, FINAL, timeout=120, worker=worker)
        assert job.status == "succeeded", job.error
        assert worker.stop() == 0
    assert Path(job.adapter_uri).is_relative_to(settings.home / "artifacts")
    store.close()
