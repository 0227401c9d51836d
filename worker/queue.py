"""The Celery application factory and the one message this service sends (no torch here).

Delivery is at-least-once and the job row is the source of truth: a message carries only the job
id, the worker claims the row with a lease before doing anything, and a duplicate delivery of a
job that is no longer `queued` is acknowledged and skipped. Safe-delivery settings: late acks,
prefetch 1, reject (requeue) when the worker process dies, JSON only, no result backend.

Queues per resource class: a job asking for N GPUs (`resources.gpus`) is sent to
`<queue>.gpuN` (`opsd.gpu1`, `opsd.gpu8`, ...) with `gpus=N` in the message; an eval goes to the
class of the job it evaluates. A worker consumes every configured class it can serve
(:func:`worker_queues`). A message of a class is a turn to run *some* queued job of that class:
the worker claims the next one in tenant round-robin order (`Store.claim_next_job`), so one
tenant's many messages do not starve another tenant's single job. The plain `<queue>` is still
consumed (messages sent before classes existed name their job and run exactly it).

Two brokers are supported: Redis (compose/scale-out) and kombu's `filesystem://PATH` transport
for the embedded shape, whose messages are files under `PATH/data` that survive restarts. That
transport has no broadcast queues worth keeping, so remote control and events are off for it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from celery import Celery

from opsd_service.settings import ServiceSettings, filesystem_broker_root, is_filesystem_broker

RUN_JOB_TASK = "opsd.run_job"
RUN_EVAL_TASK = "opsd.run_eval"
RUN_PREFLIGHT_TASK = "opsd.run_preflight"


def filesystem_transport_options(settings: ServiceSettings) -> dict[str, Any]:
    """Folders of the file-backed broker (created here): producer and consumer share `data`."""
    root = filesystem_broker_root(settings)
    data = root / "data"
    for folder in (data, root / "processed", root / "control"):
        folder.mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(data),
        "data_folder_out": str(data),
        "store_processed": True,  # rename within one filesystem: atomic between consumers
        "processed_folder": str(root / "processed"),
        "control_folder": str(root / "control"),
        "polling_interval": 0.5,
    }


def make_celery(settings: ServiceSettings) -> Celery:
    """A Celery app for these settings (both the API, to send, and the worker, to consume)."""
    app = Celery("opsd", broker=settings.broker_url, set_as_current=False)
    conf: dict[str, Any] = {
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": settings.queue,
        "task_routes": {
            RUN_JOB_TASK: {"queue": settings.queue},
            RUN_EVAL_TASK: {"queue": settings.queue},
            RUN_PREFLIGHT_TASK: {"queue": settings.queue},
        },
        "broker_connection_retry_on_startup": True,
        # the queue of every resource class (what `opsd_queue_depth` reports besides the above)
        "opsd_class_queues": [class_queue(settings.queue, n) for n in settings.gpu_classes()],
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "enable_utc": True,
    }
    scheme = urlsplit(settings.broker_url).scheme
    if is_filesystem_broker(settings.broker_url):
        conf["broker_transport_options"] = filesystem_transport_options(settings)
        conf["worker_enable_remote_control"] = False
    elif scheme in {"redis", "rediss"}:
        conf["broker_transport_options"] = {
            "visibility_timeout": settings.broker_visibility_timeout_seconds,
        }
    app.conf.update(conf)
    return app


def class_queue(base: str, gpus: int) -> str:
    """The queue of the resource class `gpus` (`opsd.gpu8` for base `opsd`)."""
    return f"{base}.gpu{int(gpus)}"


def job_gpus(spec: Any) -> int:
    """``resources.gpus`` of a stored job spec (a dict; 1 for specs from before resources)."""
    resources = spec.get("resources") if isinstance(spec, dict) else None
    gpus = resources.get("gpus") if isinstance(resources, dict) else None
    return gpus if isinstance(gpus, int) and gpus >= 1 else 1


def worker_queues(settings: ServiceSettings) -> list[str]:
    """The queues a worker of `settings.worker_gpus` devices consumes: its classes, largest first
    (the jobs only it can run), then the plain queue of older messages."""
    classes = sorted(settings.served_gpu_classes(), reverse=True)
    return [class_queue(settings.queue, n) for n in classes] + [settings.queue]


def enqueue_job(
    celery: Celery, job_id: str, *, gpus: int = 1, countdown: float | None = None
) -> str:
    """Send `opsd.run_job(job_id, gpus=N)` to the queue of class `gpus`; returns the message id.

    `countdown` delays the delivery (seconds): a turn that found every queued job of its class
    held back by the per-tenant cap comes back later."""
    result = celery.send_task(
        RUN_JOB_TASK,
        args=[str(job_id)],
        kwargs={"gpus": int(gpus)},
        queue=class_queue(celery.conf.task_default_queue, gpus),
        retry=True,
        retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
        ignore_result=True,
    )
    return str(result.id)


def enqueue_eval(celery: Celery, eval_id: str, *, gpus: int = 1) -> str:
    """Send `opsd.run_eval(eval_id)` (the id only) to the queue of class `gpus` (that of the job
    whose adapter it evaluates); returns the message id."""
    result = celery.send_task(
        RUN_EVAL_TASK,
        args=[str(eval_id)],
        queue=class_queue(celery.conf.task_default_queue, gpus),
        retry=True,
        retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
        ignore_result=True,
    )
    return str(result.id)


def enqueue_preflight(celery: Celery, preflight_id: str) -> str:
    """Send `opsd.run_preflight(preflight_id)` (the id only); returns the message id."""
    result = celery.send_task(
        RUN_PREFLIGHT_TASK,
        args=[str(preflight_id)],
        queue=celery.conf.task_default_queue,
        retry=True,
        retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
        ignore_result=True,
    )
    return str(result.id)


def broker_identity(celery: Celery) -> str | None:
    """An id of the running broker that changes when it restarts; None for the file broker.

    Redis answers its ``run_id`` (new at every server start): a non-persistent Redis that
    restarted has lost every queued message, so the caller sends them again. Raises when the
    broker cannot be reached (within about 2 s).
    """
    if urlsplit(celery.conf.broker_url or "").scheme not in {"redis", "rediss"}:
        return None
    with celery.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=2)
        client = connection.default_channel.client
        return str(client.info("server")["run_id"])
