"""The Celery tasks `opsd.run_job(job_id)`, `opsd.run_eval(eval_id)` and
`opsd.run_preflight(preflight_id)`: as thin as web views.

Each opens (once per process) the store named by the settings and hands the id to
`worker.runner.run_job` / `worker.evals.run_eval`, which own every decision. Only a failure to
even look at the job (the database is away) leaves the task; it is then retried with backoff.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from celery import shared_task

from opsd_service.settings import get_settings
from worker.queue import RUN_EVAL_TASK, RUN_JOB_TASK, RUN_PREFLIGHT_TASK

RELEASED = "released"  # worker.runner.RELEASED (not imported here: the runner loads the engine)
REQUEUED = "requeued"  # worker.runner.REQUEUED

log = logging.getLogger("opsd.worker")

MAX_TASK_RETRIES = 8
_lock = threading.Lock()
_stores: dict[str, Any] = {}
_worker_id: list[str] = []


def process_store(database_url: str) -> Any:
    """One `jobstore.Store` per database URL per process (its engine holds the pool)."""
    with _lock:
        if database_url not in _stores:
            from jobstore import Store

            _stores[database_url] = Store(database_url)
        return _stores[database_url]


def process_worker_id() -> str:
    """This process's lease owner id, made once (`hostname:pid:random`)."""
    from worker.runner import new_worker_id

    with _lock:
        if not _worker_id:
            _worker_id.append(new_worker_id())
            # The id is opaque (tenants see it in events); the log says which process it is.
            log.info("worker id %s is %s pid %s", _worker_id[0], socket.gethostname(), os.getpid())
        return _worker_id[0]


def _run(task: Any, kind: str, record_id: str, runner: Callable[..., str]) -> str:
    """Open the process's store and hand the id to `runner`; retry only if it cannot start."""
    settings = get_settings()
    try:
        store = process_store(settings.database_url)
        outcome = runner(
            str(record_id), store=store, settings=settings, worker_id=process_worker_id()
        )
    except Exception as exc:
        log.warning("%s %s: could not be started (%s); retrying", kind, record_id, exc)
        raise task.retry(exc=exc, countdown=min(60, 2**task.request.retries)) from exc
    log.info("%s %s: %s", kind, record_id, outcome)
    return outcome


@shared_task(name=RUN_JOB_TASK, bind=True, max_retries=MAX_TASK_RETRIES, ignore_result=True)
def run_job_task(self: Any, job_id: str, gpus: int | None = None) -> str:
    """A turn to run a job of resource class ``gpus``: the next queued job of that class in
    tenant round-robin order (`worker.runner.run_next_job`); ``job_id`` names the job whose
    submission sent the message. A message without a class (sent before classes existed) runs
    exactly ``job_id`` (`worker.runner.run_job`)."""
    from worker.queue import enqueue_job

    if gpus is None:
        from worker.runner import run_job

        outcome = _run(self, "job", job_id, run_job)
        if outcome in (RELEASED, REQUEUED):  # another turn for the job, on any worker
            enqueue_job(self.app, str(job_id))
        return outcome

    from worker.runner import run_next_job

    def next_job(_: str, **kwargs: Any) -> str:
        ran, outcome = run_next_job(int(gpus), **kwargs)
        claimed.append(ran)
        if ran != job_id:
            log.info("the turn of job %s ran job %s (class gpu%s)", job_id, ran, gpus)
        return outcome

    claimed: list[str | None] = []
    outcome = _run(self, "job", job_id, next_job)  # the message's job, or a fairer one
    ran = claimed[-1] if claimed else None
    if outcome in (RELEASED, REQUEUED):  # the job is queued again: it needs another turn
        enqueue_job(self.app, str(ran or job_id), gpus=int(gpus))
    elif ran is not None and get_settings().tenant_max_running_jobs > 0:
        # With a per-tenant cap, a turn that found every queued job's tenant at its cap was
        # dropped; a job that ends frees a place, so the class gets a turn back while jobs wait.
        settings = get_settings()
        if process_store(settings.database_url).count_queued_in_class(gpus=int(gpus)) > 0:
            enqueue_job(self.app, str(ran), gpus=int(gpus))
    return outcome


@shared_task(name=RUN_EVAL_TASK, bind=True, max_retries=MAX_TASK_RETRIES, ignore_result=True)
def run_eval_task(self: Any, eval_id: str) -> str:
    """Run one eval by id (see `worker.evals.run_eval`)."""
    from worker.evals import run_eval

    return _run(self, "eval", eval_id, run_eval)


@shared_task(name=RUN_PREFLIGHT_TASK, bind=True, max_retries=MAX_TASK_RETRIES, ignore_result=True)
def run_preflight_task(self: Any, preflight_id: str) -> str:
    """Run one pre-flight by id (see `worker.preflight.run_preflight`)."""
    from worker.preflight import run_preflight

    return _run(self, "preflight", preflight_id, run_preflight)
