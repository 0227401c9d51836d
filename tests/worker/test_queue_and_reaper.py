"""The Celery app's delivery settings, the message `enqueue_job` sends (on real Redis and on the
file-backed broker), and the reaper requeueing jobs and evals of lost workers."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from opsd_service.settings import ServiceSettings
from tests.worker.helpers import REDIS_TEST_URL, create_job, flush_redis, wait_for
from worker.main import worker_argv
from worker.queue import (
    RUN_EVAL_TASK,
    RUN_JOB_TASK,
    class_queue,
    enqueue_eval,
    enqueue_job,
    make_celery,
    worker_queues,
)
from worker.reaper import Reaper, prune_processed, reap_once


def _task_of(payload: dict[str, Any]) -> tuple[str, list[Any], dict[str, Any]]:
    body = json.loads(base64.b64decode(payload["body"]))
    return payload["headers"]["task"], body[0], body[1]


def _fs_messages(settings: ServiceSettings) -> list[dict[str, Any]]:
    folder = settings.home / "broker" / "data"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.msg"))]


def test_safe_delivery_settings(tmp_path: Path) -> None:
    settings = ServiceSettings(home=tmp_path, broker_url=REDIS_TEST_URL, queue="q1")
    conf = make_celery(settings).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1 and conf.task_ignore_result
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.task_default_queue == "q1"
    assert conf.broker_transport_options["visibility_timeout"] >= 600


def test_enqueue_on_redis_sends_only_the_job_id(tmp_path: Path) -> None:
    import redis

    flush_redis()
    queue = f"opsd-test-{os.getpid()}"
    celery = make_celery(ServiceSettings(home=tmp_path, broker_url=REDIS_TEST_URL, queue=queue))
    enqueue_job(celery, "job_abc")

    client = redis.Redis.from_url(REDIS_TEST_URL)
    raw = client.lrange(class_queue(queue, 1), 0, -1)
    client.close()
    assert len(raw) == 1
    assert _task_of(json.loads(raw[0])) == (RUN_JOB_TASK, ["job_abc"], {"gpus": 1})


def test_messages_go_to_the_queue_of_their_resource_class(tmp_path: Path) -> None:
    """A job of N GPUs (and an eval of it) goes to `<queue>.gpuN`; a worker of N devices
    consumes every configured class up to N (largest first) and the plain queue."""
    import redis

    flush_redis()
    queue = f"opsd-route-{os.getpid()}"
    settings = ServiceSettings(
        home=tmp_path, broker_url=REDIS_TEST_URL, queue=queue, resource_classes="1,2,8"
    )
    celery = make_celery(settings)
    enqueue_job(celery, "job_two", gpus=2)
    enqueue_eval(celery, "eval_two", gpus=2)
    enqueue_job(celery, "job_one")
    client = redis.Redis.from_url(REDIS_TEST_URL)
    try:
        two = [_task_of(json.loads(m)) for m in client.lrange(f"{queue}.gpu2", 0, -1)]
        assert sorted(two) == [
            (RUN_EVAL_TASK, ["eval_two"], {}),
            (RUN_JOB_TASK, ["job_two"], {"gpus": 2}),
        ]
        assert client.llen(f"{queue}.gpu1") == 1 and client.llen(f"{queue}.gpu8") == 0
    finally:
        client.close()
    worker = settings.model_copy(update={"worker_gpus": 2})
    assert worker_queues(worker) == [f"{queue}.gpu2", f"{queue}.gpu1", queue]
    assert worker_queues(settings) == [f"{queue}.gpu1", queue]
    assert f"--queues={queue}.gpu2,{queue}.gpu1,{queue}" in worker_argv(worker)


def test_enqueue_on_the_file_broker_writes_a_durable_message(tmp_path: Path) -> None:
    settings = ServiceSettings(home=tmp_path / "home")
    assert settings.broker_url == f"filesystem://{tmp_path / 'home' / 'broker'}"
    enqueue_job(make_celery(settings), "job_abc")

    messages = _fs_messages(settings)
    assert len(messages) == 1 and _task_of(messages[0]) == (RUN_JOB_TASK, ["job_abc"], {"gpus": 1})
    # A new process (here: a new app) still sees it.
    with make_celery(settings).connection_for_read() as connection:
        queue = connection.SimpleQueue(class_queue(settings.queue, 1))
        message = queue.get(timeout=2)
        assert message.headers["task"] == RUN_JOB_TASK
        message.ack()
        queue.close()


def test_reap_once_requeues_expired_leases_and_enqueues_them(
    sqlite_database_url: str, tmp_path: Path
) -> None:
    from jobstore import Store

    settings = ServiceSettings(home=tmp_path / "home", database_url=sqlite_database_url)
    store, celery = Store(sqlite_database_url), make_celery(settings)
    lost = create_job(store, {"base_model": "m", "dataset_uri": "d"})
    alive = create_job(store, {"base_model": "m", "dataset_uri": "d"})
    store.claim_job(lost, "dead-worker", lease_seconds=0.05)
    store.claim_job(alive, "live-worker", lease_seconds=60)
    time.sleep(0.1)

    assert reap_once(store, celery) == [lost]

    job = store.get_job(lost)
    assert (job.status, job.attempt) == ("queued", 2)
    assert store.get_job(alive).status == "running"
    assert [_task_of(m)[1] for m in _fs_messages(settings)] == [[lost]]
    assert reap_once(store, celery) == []

    # The background loop does the same on its own.
    store.claim_job(lost, "dead-again", lease_seconds=0.05)
    reaper = Reaper(store, celery, interval=0.1)
    reaper.start()
    try:
        wait_for(lambda: store.get_job(lost).attempt == 3, timeout=10, what="second requeue")
    finally:
        reaper.stop()
    assert store.get_job(lost).status == "queued"
    store.close()


def test_reap_once_resends_jobs_left_queued_too_long(
    sqlite_database_url: str, tmp_path: Path
) -> None:
    """A message lost with a killed worker must not strand its job in `queued` forever."""
    from datetime import timedelta

    from jobstore import Store

    settings = ServiceSettings(home=tmp_path / "home", database_url=sqlite_database_url)
    store, celery = Store(sqlite_database_url), make_celery(settings)
    stranded = create_job(store, {"base_model": "m", "dataset_uri": "d"})
    running = create_job(store, {"base_model": "m", "dataset_uri": "d"})
    store.claim_job(running, "live-worker", lease_seconds=60)
    quiet = timedelta(seconds=2)  # far longer than the few statements between two reaps
    time.sleep(2.5)
    fresh = create_job(store, {"base_model": "m", "dataset_uri": "d"})

    assert reap_once(store, celery, stale_queued_after=quiet) == [stranded]
    assert [_task_of(m)[1] for m in _fs_messages(settings)] == [[stranded]]
    # touched: not sent again until it has been quiet for the whole period once more
    assert reap_once(store, celery, stale_queued_after=quiet) == []
    time.sleep(2.5)
    resent = reap_once(store, celery, stale_queued_after=quiet)
    assert sorted(resent) == sorted([stranded, fresh])
    assert store.get_job(stranded).status == "queued" and store.get_job(stranded).attempt == 1
    assert store.get_job(running).status == "running"
    store.close()


def test_reap_once_requeues_evals_of_lost_workers_and_resends_stale_ones(
    sqlite_database_url: str, tmp_path: Path
) -> None:
    from datetime import timedelta

    from jobstore import Store

    settings = ServiceSettings(home=tmp_path / "home", database_url=sqlite_database_url)
    store, celery = Store(sqlite_database_url), make_celery(settings)
    job = store.get_job(create_job(store, {"base_model": "m", "dataset_uri": "d"}))
    assert job is not None
    store.claim_job(job.id, "live-worker", lease_seconds=60)  # only the evals are in play
    lost = store.create_eval(job.tenant_id, job.id, config={"n": 1})
    alive = store.create_eval(job.tenant_id, job.id, config={"n": 1})
    store.claim_eval(lost.id, "dead-worker", lease_seconds=0.05)
    store.claim_eval(alive.id, "live-worker", lease_seconds=60)
    time.sleep(0.1)

    assert reap_once(store, celery) == [lost.id]
    record = store.get_eval(lost.id)
    assert record is not None and (record.status, record.attempt) == ("queued", 2)
    assert [_task_of(m)[:2] for m in _fs_messages(settings)] == [(RUN_EVAL_TASK, [lost.id])]
    assert reap_once(store, celery) == []

    # Its message lost too: once quiet for the whole period, it is sent again.
    quiet = timedelta(seconds=2)
    assert reap_once(store, celery, stale_queued_after=quiet) == []
    time.sleep(2.5)
    assert reap_once(store, celery, stale_queued_after=quiet) == [lost.id]
    assert len(_fs_messages(settings)) == 2
    store.close()


def test_prune_processed(tmp_path: Path) -> None:
    old, new = tmp_path / "1_a.opsd.msg", tmp_path / "2_b.opsd.msg"
    old.write_text("{}")
    new.write_text("{}")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert prune_processed(tmp_path, max_age_seconds=3600) == 1
    assert not old.exists() and new.exists()
    assert prune_processed(None, max_age_seconds=1) == 0


@pytest.mark.parametrize("url", ["filesystem://", "filesystem:///srv/opsd/broker"])
def test_file_broker_root(url: str, tmp_path: Path) -> None:
    from opsd_service.settings import filesystem_broker_root

    settings = ServiceSettings(home=tmp_path, broker_url=url)
    expected = tmp_path / "broker" if url == "filesystem://" else Path("/srv/opsd/broker")
    assert filesystem_broker_root(settings) == expected
