"""Issue 11, faults 7 and 8: store and broker outages, on a PostgreSQL and a Redis that these
tests start, stop and pause themselves (never the shared ones; see tests/own_servers.py).

7. A 1.5-2 s PostgreSQL restart failed a running job; outages longer than the lease cost an
   attempt; with PostgreSQL hung (SIGSTOP) the API blocked for 45 s instead of answering 503.
8. Jobs queued before a restart of a non-persistent Redis waited 15 minutes for the stale-queue
   resend.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.own_servers import OwnPostgres, OwnRedis
from tests.worker.helpers import create_job, wait_for


@pytest.fixture(scope="module")
def own_pg() -> Iterator[OwnPostgres]:
    from jobstore.migrate import upgrade

    pg = OwnPostgres()
    pg.start()
    upgrade(pg.url)
    yield pg
    pg.destroy()


@pytest.fixture
def pg_store(own_pg: OwnPostgres) -> Iterator[Any]:
    from jobstore import Store

    store = Store(own_pg.url)
    yield store
    store.close()


def _settings(url: str, tmp_path: Path, **overrides: Any) -> Any:
    from opsd_service.settings import ServiceSettings

    values: dict[str, Any] = {
        "home": tmp_path / "home",
        "database_url": url,
        "artifacts_uri": str(tmp_path / "artifacts"),
        "lease_seconds": 6.0,
        "heartbeat_seconds": 0.5,
        "store_outage_wait_seconds": 120.0,
        **overrides,
    }
    return ServiceSettings(**values)


def _run(job_id: str, **kwargs: Any) -> tuple[threading.Thread, dict[str, Any]]:
    from worker.runner import run_job

    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["result"] = run_job(job_id, **kwargs)
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def _result(thread: threading.Thread, out: dict[str, Any], timeout: float = 300) -> str:
    thread.join(timeout)
    assert not thread.is_alive(), "run_job did not return"
    if "error" in out:
        raise out["error"]
    return out["result"]


def _progress(store: Any, job_id: str) -> int:
    try:
        return store.get_job(job_id).progress_step
    except Exception:
        return 0


def test_a_short_database_restart_costs_a_running_job_nothing(
    own_pg: OwnPostgres, pg_store: Any, tiny_spec_dict: Any, tmp_path: Path
) -> None:
    settings = _settings(own_pg.url, tmp_path)
    job_id = create_job(pg_store, tiny_spec_dict(checkpoint_every=3, optim={"max_steps": 10}))
    thread, out = _run(job_id, store=pg_store, settings=settings, worker_id="w1")
    wait_for(lambda: _progress(pg_store, job_id) >= 2, timeout=300, what="two steps")
    own_pg.stop()  # a 2 s restart: connections drop, new ones are refused meanwhile
    time.sleep(2.0)
    own_pg.start()
    assert _result(thread, out) == "succeeded"
    job = pg_store.get_job(job_id)
    assert (job.status, job.attempt, job.error) == ("succeeded", 1, None)
    steps = [s for s, _ in pg_store.query_metrics(job_id, names=["loss"])["loss"]]
    assert steps == list(range(1, 11))  # every metric of the outage written, each once
    assert [c.step for c in pg_store.list_checkpoints(job_id)] == [3, 6, 9, 10]


def test_an_outage_longer_than_the_lease_requeues_without_spending_an_attempt(
    own_pg: OwnPostgres, pg_store: Any, tiny_spec_dict: Any, tmp_path: Path
) -> None:
    from worker.runner import RELEASED, run_job

    settings = _settings(own_pg.url, tmp_path, lease_seconds=2.0, heartbeat_seconds=0.25)
    # The engine never waits for the store, so the job must outlast the outage (a tiny step is
    # ~0.2 s here): 64 steps, where the outage below is 5 s from the first one.
    job_id = create_job(pg_store, tiny_spec_dict(optim={"max_steps": 64}))
    thread, out = _run(job_id, store=pg_store, settings=settings, worker_id="w1")
    wait_for(lambda: _progress(pg_store, job_id) >= 1, timeout=300, what="a step")
    own_pg.stop()
    time.sleep(settings.lease_seconds + 4)  # well past the lease
    own_pg.start()
    assert _result(thread, out) == RELEASED
    job = pg_store.get_job(job_id)
    assert (job.status, job.attempt, job.lease_owner, job.error) == ("queued", 1, None, None)
    stopped_at = job.progress_step
    assert 1 <= stopped_at < 64
    assert pg_store.list_checkpoints(job_id)[-1].step == stopped_at
    kinds = [e.kind for e in pg_store.list_events(job_id)]
    assert "released" in kinds and "failed" not in kinds and "requeued" not in kinds
    # the next worker resumes it from the checkpoint, as the same attempt, to the end
    assert run_job(job_id, store=pg_store, settings=settings, worker_id="w2") == "succeeded"
    job = pg_store.get_job(job_id)
    assert (job.status, job.attempt) == ("succeeded", 1)
    steps = [s for s, _ in pg_store.query_metrics(job_id, names=["loss"])["loss"]]
    assert steps == list(range(1, 65))


def test_the_reaper_gives_workers_a_lease_of_grace_after_a_store_outage(
    own_pg: OwnPostgres, pg_store: Any, tmp_path: Path
) -> None:
    from worker.queue import make_celery
    from worker.reaper import Reaper

    settings = _settings(own_pg.url, tmp_path)
    job_id = create_job(pg_store, {"base_model": "m", "dataset_uri": "d"})
    assert pg_store.claim_job(job_id, "w-live", lease_seconds=0.5) is not None
    reaper = Reaper(pg_store, make_celery(settings), interval=60, lease_seconds=3.0)
    own_pg.stop()
    time.sleep(1.0)  # the lease expires while the store is away
    with pytest.raises(Exception):  # noqa: B017 - any store error: the round fails
        reaper.round()
    own_pg.start()
    assert reaper.round() == []  # grace: the live worker may still renew or release
    assert pg_store.get_job(job_id).status == "running"
    assert pg_store.heartbeat(job_id, "w-live", lease_seconds=0.5) == "running"
    time.sleep(3.5)  # grace over, and the worker never came back
    assert reaper.round() == [job_id]
    assert (pg_store.get_job(job_id).status, pg_store.get_job(job_id).attempt) == ("queued", 2)


def test_the_api_answers_503_quickly_while_the_database_hangs(
    own_pg: OwnPostgres, pg_store: Any, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app

    settings = _settings(own_pg.url, tmp_path)
    key = pg_store.create_api_key("hang")
    app = create_app(
        settings, enqueue=lambda job_id: None, broker_ping=lambda: True
    )  # no broker needed: the store is the subject
    with TestClient(app, raise_server_exceptions=False) as client:
        headers = {"Authorization": f"Bearer {key}"}
        body = {"base_model": "m", "dataset_uri": "/d.jsonl"}
        job_id = client.post("/jobs", json=body, headers=headers).json()["id"]
        own_pg.pause()
        try:
            for method, path, kwargs in [
                ("get", "/readyz", {}),
                ("get", f"/jobs/{job_id}", {"headers": headers}),
                ("post", "/jobs", {"headers": headers, "json": body}),
                ("get", "/jobs", {"headers": {"Authorization": "Bearer opsd_x_y"}}),
            ]:
                started = time.monotonic()
                response = getattr(client, method)(path, **kwargs)
                elapsed = time.monotonic() - started
                assert response.status_code == 503, (path, response.text)
                # the contract: the request does not wait for the database (it used to hang
                # for 45 s); the store timeout is 1.5 s
                assert elapsed < settings.store_timeout_seconds + 3, (path, elapsed)
                if path != "/readyz":
                    assert response.json()["error"]["code"] == "store_unavailable"
        finally:
            own_pg.resume()
        assert client.get(f"/jobs/{job_id}", headers=headers).status_code == 200


# ------------------------------------------------------------------------------ 8. the broker
@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    redis = OwnRedis()
    redis.start()
    yield redis
    redis.destroy()


def _queued_ids(redis_url: str, queue: str) -> list[str]:
    import base64
    import json

    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        raw = client.lrange(queue, 0, -1)
    finally:
        client.close()
    return [json.loads(base64.b64decode(json.loads(m)["body"]))[0][0] for m in raw]


def test_jobs_queued_before_a_broker_restart_are_sent_again_at_once(
    own_redis: OwnRedis, sqlite_database_url: str, tmp_path: Path
) -> None:
    from jobstore import Store
    from opsd_service.settings import ServiceSettings
    from worker.queue import enqueue_job, make_celery
    from worker.reaper import Reaper

    settings = ServiceSettings(
        home=tmp_path, database_url=sqlite_database_url, broker_url=own_redis.url, queue="q8"
    )
    store, celery = Store(sqlite_database_url), make_celery(settings)
    job_id = create_job(store, {"base_model": "m", "dataset_uri": "d"})
    enqueue_job(celery, job_id)
    reaper = Reaper(store, celery, interval=10, stale_queued_after=timedelta(minutes=15))
    assert reaper.round() == [] and _queued_ids(own_redis.url, "q8.gpu1") == [job_id]

    own_redis.stop()  # a non-persistent Redis restarts: the message is gone
    own_redis.start()
    assert _queued_ids(own_redis.url, "q8.gpu1") == []
    assert reaper.round() == [job_id]  # one reaper interval later, not 15 minutes
    assert _queued_ids(own_redis.url, "q8.gpu1") == [job_id]

    own_redis.stop()  # down for a round, then back (and empty again)
    assert reaper.round() == []
    own_redis.start()
    assert reaper.round() == [job_id]
    assert _queued_ids(own_redis.url, "q8.gpu1") == [job_id]
    store.close()
