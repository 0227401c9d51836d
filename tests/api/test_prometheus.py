"""`GET /metrics` scraped and parsed as Prometheus does (prometheus-client's own text parser):
jobs by status and tenant class, queue depth of the real Redis broker, request latency by route
template, and store/broker errors counted when the real dependencies are unreachable."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.api.conftest import auth
from worker.queue import class_queue

BODY = {"base_model": "Qwen/Qwen3-4B", "dataset_uri": "/data/train.jsonl"}
# nothing listens on these loopback ports (this test module's own range): connections are refused
DEAD_POSTGRES = "postgresql+psycopg://opsd@127.0.0.1:16611/nothing?connect_timeout=2"
DEAD_REDIS = "redis://127.0.0.1:16612/0"


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_scrape_counts_jobs_by_status_and_tenant_class_and_queue_depth(settings: Any) -> None:
    from api.app import create_app

    big = f"acme-{uuid.uuid4().hex[:6]}"
    settings = settings.model_copy(update={"metrics_tenant_classes": {big: "enterprise"}})
    app = create_app(settings)
    with TestClient(app) as client:
        store = app.state.store
        keys = {"big": store.create_api_key(big), "small": store.create_api_key(f"s-{big}")}
        before = scrape(client)
        queued = value(before, "opsd_queue_depth", queue=class_queue(settings.queue, 1))
        for key, count in (("big", 2), ("small", 1)):
            for _ in range(count):
                response = client.post("/jobs", json=BODY, headers=auth(keys[key]))
                assert response.status_code == 201, response.text
        job = client.get("/jobs", headers=auth(keys["small"])).json()["data"][0]
        assert client.post(f"/jobs/{job['id']}/cancel", headers=auth(keys["small"])).is_success
        after = scrape(client)

    assert value(after, "opsd_jobs", status="queued", tenant_class="enterprise") == 2
    assert value(after, "opsd_jobs", status="cancelled", tenant_class="default") == (
        value(before, "opsd_jobs", status="cancelled", tenant_class="default") + 1
    )
    assert value(after, "opsd_queue_depth", queue=class_queue(settings.queue, 1)) == queued + 3
    assert value(after, "opsd_store_up") == 1 and value(after, "opsd_broker_up") == 1
    # latency by route template: the ids never become labels
    posts = value(
        after,
        "opsd_http_request_duration_seconds_count",
        method="POST",
        route="/jobs",
        status="201",
    )
    assert posts == 3
    cancels = value(
        after,
        "opsd_http_request_duration_seconds_count",
        method="POST",
        route="/jobs/{job_id}/cancel",
        status="200",
    )
    assert cancels == 1
    assert not any(job["id"] in str(labels) for (_, labels) in after)
    assert value(after, "opsd_api_store_errors_total") == 0
    assert value(after, "opsd_api_broker_errors_total") == 0


def test_store_and_broker_errors_are_counted(settings: Any, tmp_path: Path) -> None:
    from api.app import create_app
    from jobstore import Store

    # the broker is down: submitting answers 503 queue_unavailable, scrapes say broker down
    app = create_app(settings.model_copy(update={"broker_url": DEAD_REDIS}))
    with TestClient(app, raise_server_exceptions=False) as client:
        key = app.state.store.create_api_key(f"t-{uuid.uuid4().hex[:6]}")
        response = client.post("/jobs", json=BODY, headers=auth(key))
        assert response.status_code == 503 and response.json()["error"]["code"] == (
            "queue_unavailable"
        )
        assert client.get("/readyz").status_code == 503
        samples = scrape(client)
    assert value(samples, "opsd_api_broker_errors_total") == 3  # the POST, readyz, the scrape
    assert value(samples, "opsd_broker_up") == 0 and value(samples, "opsd_store_up") == 1

    # the store is down: requests answer 503 store_unavailable, scrapes say store down
    dead = Store(DEAD_POSTGRES)
    app = create_app(settings, store=dead, enqueue=lambda job_id: None, broker_ping=lambda: True)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/jobs", headers=auth("opsd_x_y"))
        assert response.status_code == 503, response.text
        samples = scrape(client)
    assert value(samples, "opsd_api_store_errors_total") == 2  # the request and the scrape
    assert value(samples, "opsd_store_up") == 0
