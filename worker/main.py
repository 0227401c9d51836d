"""Starting a worker process: one job at a time (`solo` pool, concurrency 1).

A worker has `OPSD_WORKER_GPUS` devices (`opsd worker --gpus N`) and consumes the queue of every
configured resource class up to N; a job of several GPUs runs as a child process group
(`worker.launcher`) while this process keeps its lease.

`run_worker()` is what `opsd worker` calls; the settings come from the environment, like
`celery -A worker.celery_app worker`, which this is equivalent to with the flags below.
"""

from __future__ import annotations

import os
import socket

from opsd_service.settings import ServiceSettings, get_settings
from worker.queue import worker_queues


def worker_argv(settings: ServiceSettings, *, loglevel: str = "INFO") -> list[str]:
    """The Celery worker command line for these settings."""
    return [
        "worker",
        "--pool=solo",
        "--concurrency=1",
        f"--queues={','.join(worker_queues(settings))}",
        f"--hostname=opsd-{os.getpid()}@{socket.gethostname()}",
        f"--loglevel={loglevel}",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]


def run_worker(*, loglevel: str = "INFO") -> None:
    """Run a worker in this process until it is told to stop (SIGTERM/SIGINT: warm shutdown)."""
    from worker.celery_app import app

    settings = get_settings()
    if settings.worker_metrics_port:  # Prometheus: steps/s, tokens/s, current job, leases, GPU
        from worker.prometheus import serve

        serve(settings.worker_metrics_host, settings.worker_metrics_port)
    app.worker_main(argv=worker_argv(settings, loglevel=loglevel))
