"""The worker process's Celery app (`celery -A worker.celery_app worker`), built from settings.

Besides the task, it wires the worker's lifecycle: when the worker is ready a `Reaper` thread
starts requeueing jobs of lost workers; when a shutdown is requested the running job is asked to
stop at its next step (it keeps its checkpoint and is requeued when its lease expires).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

from opsd_service.settings import ServiceSettings, filesystem_broker_root, get_settings
from opsd_service.settings import is_filesystem_broker as _is_fs_broker
from worker import tasks as _tasks  # registers opsd.run_job
from worker.queue import make_celery, worker_queues

log = logging.getLogger("opsd.worker")


def create_worker_app(settings: ServiceSettings) -> Celery:
    """The Celery app plus the worker-process hooks (reaper thread, graceful stop)."""
    app = make_celery(settings)
    reapers: list[Any] = []

    def start_reaper(sender: Any = None, **_: Any) -> None:
        from worker.reaper import Reaper

        processed = (
            filesystem_broker_root(settings) / "processed"
            if _is_fs_broker(settings.broker_url)
            else None
        )
        reaper = Reaper(
            _tasks.process_store(settings.database_url),
            app,
            interval=settings.reaper_interval_seconds,
            processed_folder=processed,
            stale_queued_after=timedelta(seconds=settings.requeue_queued_after_seconds),
            lease_seconds=settings.lease_seconds,
        )
        reaper.start()
        reapers.append(reaper)
        log.info(
            "worker %s ready on queues %s (reaper every %ss)",
            _tasks.process_worker_id(),
            ",".join(worker_queues(settings)),
            settings.reaper_interval_seconds,
        )

    def stop_running_job(sender: Any = None, **_: Any) -> None:
        from worker.runner import request_shutdown

        request_shutdown()

    def stop_reaper(sender: Any = None, **_: Any) -> None:
        while reapers:
            reapers.pop().stop()

    worker_ready.connect(start_reaper, weak=False)
    worker_shutting_down.connect(stop_running_job, weak=False)
    worker_shutdown.connect(stop_reaper, weak=False)
    return app


app = create_worker_app(get_settings())
