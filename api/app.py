"""The FastAPI application factory (`uvicorn api.app:create_app --factory`)."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from api.deps import KeyCache
from api.errors import install_error_handlers
from api.middleware import BodySizeLimit, JsonBodyAnyContentType

DESCRIPTION = """
Training-as-a-service for **On-Policy Self-Distillation** (OPSD) of LLMs.

Submit a job with `POST /jobs` (only `base_model` and `dataset_uri` are required; everything else
defaults to the paper), follow it with `GET /jobs/{id}`, `/metrics`, `/events` (JSON or a live
`text/event-stream`) and `/checkpoints`, and download the trained LoRA adapter (PEFT format) from
`/adapter` once it succeeded.

Authenticate with `Authorization: Bearer <API key>`. Errors are
`{"error": {"code", "message", "param"}}`, where `param` names the offending field.
"""


def create_app(
    settings: Any | None = None,
    *,
    store: Any | None = None,
    enqueue: Callable[[str], None] | None = None,
    broker_ping: Callable[[], bool] | None = None,
) -> FastAPI:
    """Build the app from settings (environment by default); parts can be injected for tests."""
    from api.routes import evals, health, jobs, prometheus, ui
    from opsd_engine.config import JobSpec  # pure pydantic: no torch
    from opsd_service.settings import get_settings

    settings = settings or get_settings()
    if store is None:
        from jobstore import Store

        store = Store(settings.database_url)
    from worker.queue import enqueue_job, make_celery

    celery = make_celery(settings)  # connects only when used
    if enqueue is None or broker_ping is None:
        enqueue = enqueue or (lambda job_id: enqueue_job(celery, job_id))
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
    )
    app.state.settings = settings
    app.state.store = store
    app.state.enqueue = enqueue
    app.state.broker_ping = broker_ping
    app.state.key_cache = KeyCache(settings.auth_cache_seconds)
    app.state.metrics_cache = jobs.MetricsCache()
    app.state.prometheus = prometheus.ApiMetrics(
        store,
        lambda: prometheus.celery_queue_depths(celery),
        tenant_classes=settings.metrics_tenant_classes,
    )
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(jobs.build_router(JobSpec))
    app.include_router(evals.build_router())
    app.include_router(ui.router)
    app.include_router(prometheus.router)
    # Innermost first: the latency middleware sees the matched route's template.
    app.add_middleware(prometheus.RequestMetrics, metrics=lambda: app.state.prometheus)
    # Added last = outermost: the size limit counts the body before anything reads it.
    app.add_middleware(JsonBodyAnyContentType)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    logging.getLogger("opsd.api").setLevel(logging.INFO)
    return app


def _broker_ping(celery: Any) -> bool:
    with celery.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=2)
    return True
