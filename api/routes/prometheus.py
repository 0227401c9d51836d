"""Prometheus metrics of the API: `GET /metrics` in the text exposition format (prometheus-client).

What an operator scrapes (each name as exported):

* ``opsd_http_request_duration_seconds{method,route,status}``: request latency histogram, by the
  route's template (`/jobs/{job_id}`, never the id itself; `(unmatched)` for unknown paths);
* ``opsd_jobs{status,tenant_class}``: jobs by status, read from the store at scrape time. A
  tenant's class comes from ``OPSD_METRICS_TENANT_CLASSES`` (a JSON object of tenant name to
  class, e.g. ``{"acme": "enterprise"}``); tenants not in it are ``default``, so the number of
  series stays bounded by the classes, whatever the number of tenants;
* ``opsd_queue_depth{queue}``: messages waiting in each broker queue the service sends to;
* ``opsd_api_store_errors_total`` and ``opsd_api_broker_errors_total``: requests (and scrapes)
  that found the store or the broker unavailable; ``opsd_store_up`` / ``opsd_broker_up``: whether
  the last scrape reached them.

With ``PROMETHEUS_MULTIPROC_DIR`` set (several `opsd api --workers`), the counters and histograms
of every process are aggregated by prometheus-client's multiprocess collector.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool

log = logging.getLogger("opsd.api")

router = APIRouter(tags=["health"])
DEFAULT_TENANT_CLASS = "default"
UNMATCHED = "(unmatched)"
# error codes of the API's JSON error bodies that mean a dependency was unavailable
STORE_CODES = frozenset({"store_unavailable"})
BROKER_CODES = frozenset({"queue_unavailable"})
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ApiMetrics:
    """The API's metrics: one registry per app (so several apps in one process do not clash)."""

    def __init__(
        self,
        store: Any,
        queue_depths: Callable[[], dict[str, int]],
        tenant_classes: dict[str, str] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # first: a scrape that finds a dependency down counts it in its own error counters
        self._state = _ServiceState(self, store, queue_depths, dict(tenant_classes or {}))
        self.registry.register(self._state)
        self.latency = Histogram(
            "opsd_http_request_duration_seconds",
            "HTTP request latency by method, route template and status code.",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.store_errors = Counter(
            "opsd_api_store_errors",
            "Requests and scrapes that found the job store unavailable.",
            registry=self.registry,
        )
        self.broker_errors = Counter(
            "opsd_api_broker_errors",
            "Requests and scrapes that found the broker unavailable.",
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        """The scrape answer (reads the store and the broker: call it off the event loop)."""
        registry = self.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            registry.register(self._state)
        return generate_latest(registry)

    def count_error_body(self, status: int, body: bytes) -> None:
        """Count a dependency failure named in a 5xx JSON answer (error code or readyz checks)."""
        try:
            document = json.loads(body)
        except ValueError:
            return
        if not isinstance(document, dict):
            return
        code = (document.get("error") or {}).get("code") if status >= 500 else None
        checks = document.get("checks") if isinstance(document.get("checks"), dict) else {}
        if code in STORE_CODES or checks.get("store") == "unreachable":
            self.store_errors.inc()
        if code in BROKER_CODES or checks.get("broker") == "unreachable":
            self.broker_errors.inc()


class _ServiceState(Collector):
    """Gauges read at scrape time: jobs by status and tenant class, queue depths, up-ness."""

    def __init__(
        self,
        metrics: ApiMetrics,
        store: Any,
        queue_depths: Callable[[], dict[str, int]],
        tenant_classes: dict[str, str],
    ) -> None:
        self.metrics, self.store, self.queue_depths = metrics, store, queue_depths
        self.tenant_classes = tenant_classes

    def describe(self) -> list[Metric]:
        return []  # collected only when scraped (never at registration)

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily(
            "opsd_jobs", "Jobs by status and tenant class.", labels=["status", "tenant_class"]
        )
        store_up = 1
        try:
            counts: dict[tuple[str, str], int] = {}
            for tenant, status, count in self.store.count_jobs_by_tenant_and_status():
                key = (status, self.tenant_classes.get(tenant, DEFAULT_TENANT_CLASS))
                counts[key] = counts.get(key, 0) + count
            for (status, tenant_class), count in sorted(counts.items()):
                jobs.add_metric([status, tenant_class], count)
        except Exception as exc:
            log.warning("metrics: the store is unavailable: %s", exc)
            self.metrics.store_errors.inc()
            store_up = 0
        yield jobs
        yield _gauge("opsd_store_up", "Whether the last scrape reached the job store.", store_up)

        depth = GaugeMetricFamily(
            "opsd_queue_depth", "Messages waiting in each broker queue.", labels=["queue"]
        )
        broker_up = 1
        try:
            for queue, count in sorted(self.queue_depths().items()):
                depth.add_metric([queue], count)
        except Exception as exc:
            log.warning("metrics: the broker is unavailable: %s", exc)
            self.metrics.broker_errors.inc()
            broker_up = 0
        yield depth
        yield _gauge("opsd_broker_up", "Whether the last scrape reached the broker.", broker_up)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, documentation)
    gauge.add_metric([], value)
    return gauge


def celery_queue_depths(celery: Any) -> dict[str, int]:
    """Messages waiting per queue the app routes to (default queue, routes, declared queues)."""
    from kombu.exceptions import ChannelError

    conf = celery.conf
    names = {conf.task_default_queue}
    routes = conf.task_routes or {}
    if isinstance(routes, dict):
        names |= {r["queue"] for r in routes.values() if isinstance(r, dict) and r.get("queue")}
    names |= {queue.name for queue in (conf.task_queues or [])}
    names |= set(conf.get("opsd_class_queues") or [])
    depths: dict[str, int] = {}
    with celery.connection_for_read() as connection:
        connection.ensure_connection(max_retries=1, timeout=2)
        channel = connection.default_channel
        for name in sorted(n for n in names if n):
            try:
                depths[name] = int(channel.queue_declare(queue=name, passive=True).message_count)
            except ChannelError:  # never declared (nothing was ever sent to it): empty
                depths[name] = 0
    return depths


class RequestMetrics:
    """ASGI middleware timing every HTTP request into `opsd_http_request_duration_seconds` and
    counting store/broker failures from the error bodies of 5xx answers (and /readyz's 503)."""

    def __init__(self, app: Any, metrics: Callable[[], ApiMetrics | None]) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        metrics = self.metrics() if scope["type"] == "http" else None
        if metrics is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]
        error_body: list[bytes] = []

        async def observing_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif (
                message["type"] == "http.response.body"
                and status[0] >= 500
                and sum(map(len, error_body)) < 65536
            ):
                error_body.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, observing_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED
            metrics.latency.labels(scope.get("method", ""), template, str(status[0])).observe(
                time.perf_counter() - started
            )
            if error_body:
                metrics.count_error_body(status[0], b"".join(error_body))


@router.get(
    "/metrics",
    summary="Prometheus metrics (text exposition format)",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}},
)
async def prometheus_metrics(request: Request) -> Response:
    """Jobs by status and tenant class, queue depths, request latency, store/broker errors."""
    metrics: ApiMetrics = request.app.state.prometheus
    body = await run_in_threadpool(metrics.exposition)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
