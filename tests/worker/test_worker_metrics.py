"""A worker's Prometheus metrics while it trains a real tiny job: steps and tokens, the current
job, lease renewals; and the HTTP endpoint `serve` opens, scraped and parsed as Prometheus does."""

from __future__ import annotations

import socket
import threading
from typing import Any

import httpx
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.worker.helpers import create_job
from worker.runner import run_job


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _now() -> dict:
    return _samples(generate_latest(REGISTRY).decode())


def test_a_job_moves_the_worker_metrics(store: Any, settings: Any, tiny_spec_dict: Any) -> None:
    job_id = create_job(store, tiny_spec_dict())
    before = _now()
    seen_running: list[bool] = []
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.02):
            samples = _now()
            if _value(samples, "opsd_worker_current_job", job_id=job_id, kind="job") == 1:
                seen_running.append(_value(samples, "opsd_worker_busy") == 1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        assert run_job(job_id, store=store, settings=settings, worker_id="w1") == "succeeded"
    finally:
        done.set()
        watcher.join(5)
    after = _now()

    assert seen_running and all(seen_running)  # the job was shown while it ran
    assert _value(after, "opsd_worker_busy") == 0
    assert _value(after, "opsd_worker_current_job", job_id=job_id, kind="job") == 0
    assert _value(after, "opsd_worker_steps_total") - _value(before, "opsd_worker_steps_total") == 3
    tokens = store.query_metrics(job_id, names=["generated_tokens"])["generated_tokens"]
    added = _value(after, "opsd_worker_generated_tokens_total") - _value(
        before, "opsd_worker_generated_tokens_total"
    )
    assert added == sum(value for _, value in tokens) > 0
    renewed = _value(after, "opsd_worker_lease_renewals_total", result="ok") - _value(
        before, "opsd_worker_lease_renewals_total", result="ok"
    )
    assert renewed >= 1  # heartbeats every 0.2 s during the run


def test_serve_answers_a_prometheus_scrape() -> None:
    from worker.prometheus import serve

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve("127.0.0.1", port)
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200
    names = {family.name for family in text_string_to_metric_families(response.text)}
    assert {"opsd_worker_steps", "opsd_worker_busy", "opsd_worker_lease_renewals"} <= names
