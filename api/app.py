"""The FastAPI application factory (`uvicorn api.app:create_app --factory`)."""

from __future__ import annotations

import gc
import logging
from collections import OrderedDict
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI

from api.deps import KeyCache, known_query_parameters
from api.errors import install_error_handlers
from api.middleware import BodySizeLimit, JsonBodyAnyContentType
from api.schemas import ErrorResponse

DESCRIPTION = """
Training-as-a-service for **On-Policy Self-Distillation** (OPSD) of LLMs.

Submit a job with `POST /jobs` (only `base_model` and `dataset_uri` are required; everything else
defaults to the paper), follow it with `GET /jobs/{id}`, `/metrics`, `/events` (JSON or a live
`text/event-stream`) and `/checkpoints`, and download the trained LoRA adapter (PEFT format) from
`/adapter` once it succeeded.

Datasets are uploaded with `POST /files` (validated; the answer's `id`, `file-...`, is what
`dataset_uri` takes); other locations only where the deployment's policy allows them.

Authenticate with `Authorization: Bearer <API key>`. Errors are
`{"error": {"code", "message", "param"}}`, where `param` names the offending field; system errors
carry an `id` instead (the details are in the service's logs). Requests are rate-limited per key
(429 with `Retry-After`).
"""


COMMON_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ErrorResponse,
        "description": "Malformed request (e.g. a body that is not JSON)",
    },
    429: {"model": ErrorResponse, "description": "Too many requests (see `Retry-After`)"},
    503: {"model": ErrorResponse, "description": "The store or queue is unavailable; retry"},
}


def create_app(
    settings: Any | None = None,
    *,
    store: Any | None = None,
    enqueue: Callable[[str], None] | None = None,
    broker_ping: Callable[[], bool] | None = None,
) -> FastAPI:
    """Build the app from settings (environment by default); parts can be injected for tests."""
    from api.routes import evals, files, health, jobs, keys, preflight, prometheus, ui, usage
    from api.throttle import Throttle
    from opsd_engine.config import JobSpec  # pure pydantic: no torch
    from opsd_service.settings import get_settings

    settings = settings or get_settings()
    if store is None:
        from jobstore import Store

        store = Store(settings.database_url)
    from worker.queue import enqueue_job, make_celery

    celery = make_celery(settings)  # connects only when used
    enqueue_routes = enqueue is None  # our sender takes the job's resource class too
    if enqueue is None or broker_ping is None:
        enqueue = enqueue or (lambda job_id, gpus=1: enqueue_job(celery, job_id, gpus=gpus))
        broker_ping = broker_ping or (lambda: _broker_ping(celery))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        # Everything loaded so far (FastAPI, pydantic, SQLAlchemy, the routes) lives as long as
        # the process: moved out of the collector's sight, a full collection no longer walks it
        # and stops the server for tens of milliseconds under load (tail latency).
        gc.freeze()
        yield
        store.close()

    app = FastAPI(
        title="OPSD training service",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        dependencies=[Depends(known_query_parameters)],
    )
    app.state.settings = settings
    app.state.store = store
    app.state.enqueue = enqueue
    app.state.enqueue_routes = enqueue_routes
    app.state.broker_ping = broker_ping
    app.state.key_cache = KeyCache(settings.auth_cache_seconds)
    app.state.revocation_mark = None  # the store's revocation mark the key cache agrees with
    app.state.revocation_checked_at = float("-inf")
    app.state.access_policy = settings.access_policy()
    app.state.file_checks = OrderedDict()  # (file, fields) -> problem, see api.datasets
    app.state.throttle = Throttle(
        settings.rate_limit, settings.failed_auth_limit, settings.rate_limit_storage_uri
    )
    app.state.metrics_cache = jobs.MetricsCache()
    app.state.prometheus = prometheus.ApiMetrics(
        store,
        lambda: prometheus.celery_queue_depths(celery),
        tenant_classes=settings.metrics_tenant_classes,
    )
    install_error_handlers(app)
    routers = [
        health.router,
        jobs.build_router(JobSpec),
        evals.build_router(),
        preflight.build_router(),
        files.router,
        usage.router,
        keys.router,
        ui.router,
        prometheus.router,
    ]
    for router in routers:
        app.include_router(router, responses=COMMON_RESPONSES)
    # Innermost first: the latency middleware sees the matched route's template.
    app.add_middleware(prometheus.RequestMetrics, metrics=lambda: app.state.prometheus)
    # Added last = outermost: the size limit counts the body before anything reads it.
    app.add_middleware(JsonBodyAnyContentType)
    # Multipart overhead on top of the largest file: boundaries and part headers.
    uploads = {("POST", "/files"): settings.max_file_bytes + 64 * 1024}
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, overrides=uploads)
    logging.getLogger("opsd.api").setLevel(logging.INFO)
    return app


def _broker_ping(celery: Any) -> bool:
    with celery.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=2)
    return True
