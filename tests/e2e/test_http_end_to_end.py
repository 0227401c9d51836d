"""The whole service through HTTP, as a user sees it, on both deployment shapes.

Postgres + Redis (`opsd api` and `opsd worker` processes) and the embedded default (`opsd up`:
SQLite + file broker): submit -> queued -> running -> succeeded for a tiny-model OPSD job with
metrics, events, checkpoints and a downloadable adapter that peft loads; cancel of a queued and
of a running job; idempotent resubmission.
"""

from __future__ import annotations

import io
import re
import socket
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.conftest import make_tiny_spec
from tests.service_fixtures import fresh_postgres_url, redis_test_url
from tests.worker.helpers import ServiceProcess, flush_redis, service_env, wait_for

REDIS_E2E_URL = redis_test_url(13)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Service:
    def __init__(self, base_url: str, key: str, processes: list[ServiceProcess]) -> None:
        self.http = httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )
        self.processes = processes

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.http.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def wait(self, job_id: str, statuses: set[str], timeout: float = 180) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            for process in self.processes:
                assert process.process.poll() is None, f"service exited:\n{process.tail()}"
            job = self.job(job_id)
            return job if job["status"] in statuses else None

        return wait_for(reached, timeout=timeout, interval=0.25, what=f"{job_id} in {statuses}")


def _wait_ready(base_url: str, processes: list[ServiceProcess]) -> None:
    def ready() -> bool:
        for process in processes:
            assert process.process.poll() is None, f"service exited:\n{process.tail()}"
        try:
            return httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout=90, interval=0.3, what="the API to be ready")


@pytest.fixture(scope="module")
def redis_postgres_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    from jobstore import Store
    from jobstore.migrate import upgrade

    root = tmp_path_factory.mktemp("stack")
    url, drop = fresh_postgres_url()
    flush_redis(REDIS_E2E_URL)
    upgrade(url)
    store = Store(url)
    key = store.create_api_key("e2e")
    store.close()
    port = _free_port()
    env = service_env(
        home=root / "home",
        database_url=url,
        broker_url=REDIS_E2E_URL,
        artifacts_uri=str(root / "artifacts"),
        queue=f"e2e-{uuid.uuid4().hex[:6]}",
    )
    api = ServiceProcess(["api", "--host", "127.0.0.1", "--port", str(port)], env, root / "api.log")
    worker = ServiceProcess(["worker"], env, root / "worker.log")
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base_url, [api, worker])
        yield Service(base_url, key, [api, worker])
    finally:
        for process in (worker, api):
            process.stop()
        drop()


@pytest.fixture(scope="module")
def embedded_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("embedded")
    port = _free_port()
    env = service_env()
    up = ServiceProcess(
        ["up", "--home", str(root / "home"), "--host", "127.0.0.1", "--port", str(port)],
        env,
        root / "up.log",
    )
    try:
        key_line = wait_for(
            lambda: re.search(r"\bopsd_[A-Za-z0-9]+_[A-Za-z0-9_\-]+", up.output()),
            timeout=90,
            what="the API key",
        )
        base_url = f"http://127.0.0.1:{port}"
        _wait_ready(base_url, [up])
        yield Service(base_url, key_line.group(0), [up])
    finally:
        assert up.stop() == 0, up.tail()


@pytest.fixture(params=["redis_postgres", "embedded"])
def service(request: pytest.FixtureRequest) -> Service:
    return request.getfixturevalue(f"{request.param}_service")


def _spec(model: Path, data: Path, **overrides: Any) -> dict[str, Any]:
    from opsd_engine.config import spec_to_dict

    return spec_to_dict(make_tiny_spec(model, data, **overrides))


def test_job_runs_to_success_with_metrics_events_checkpoints_and_adapter(
    service: Service, tiny_model_dir: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    body = _spec(tiny_model_dir, tiny_dataset, checkpoint_every=2, optim={"max_steps": 4})
    key = {"Idempotency-Key": f"e2e-{uuid.uuid4().hex}"}
    created = service.http.post("/jobs", json=body, headers=key)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    replay = service.http.post("/jobs", json=body, headers=key)
    assert replay.status_code == 200 and replay.json()["id"] == job_id

    job = service.wait(job_id, {"succeeded", "failed", "cancelled"})
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"] == {"step": 4, "total_steps": 4, "eval": None}

    kinds = [e["kind"] for e in service.http.get(f"/jobs/{job_id}/events").json()["data"]]
    assert kinds[0] == "queued" and "running" in kinds and kinds[-1] == "succeeded"
    assert {"started", "checkpoint", "finished"} <= set(kinds)

    metrics = service.http.get(
        f"/jobs/{job_id}/metrics", params={"name": ["loss", "divergence"]}
    ).json()
    assert metrics["metrics"]["loss"]["steps"] == [1, 2, 3, 4]
    assert all(v is not None and v >= 0 for v in metrics["metrics"]["divergence"]["values"])

    checkpoints = service.http.get(f"/jobs/{job_id}/checkpoints").json()["data"]
    assert [c["step"] for c in checkpoints] == [2, 4]

    archive = service.http.get(f"/jobs/{job_id}/adapter")
    assert archive.status_code == 200 and archive.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        tar.extractall(tmp_path, filter="data")
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_cancel_a_queued_and_a_running_job(
    service: Service, tiny_model_dir: Path, tiny_dataset: Path
) -> None:
    long_body = _spec(tiny_model_dir, tiny_dataset, checkpoint_every=3, optim={"max_steps": 2000})
    running_id = service.http.post("/jobs", json=long_body).json()["id"]
    # one worker runs one job at a time, so the next submission waits in the queue
    queued_id = service.http.post("/jobs", json={**long_body, "seed": 5}).json()["id"]

    service.wait(running_id, {"running"}, timeout=120)
    cancelled = service.http.post(f"/jobs/{queued_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"

    wait_for(
        lambda: len(service.http.get(f"/jobs/{running_id}/checkpoints").json()["data"]) >= 1,
        timeout=120,
        interval=0.3,
        what="a first checkpoint",
    )
    asked = time.monotonic()
    response = service.http.post(f"/jobs/{running_id}/cancel")
    assert response.status_code == 200 and response.json()["status"] in {"cancelling", "cancelled"}
    job = service.wait(running_id, {"cancelled", "succeeded", "failed"}, timeout=60)
    assert job["status"] == "cancelled"
    assert time.monotonic() - asked < 30, "cancellation took too long"
    assert job["progress"]["step"] < 2000
    assert service.http.get(f"/jobs/{running_id}/checkpoints").json()["data"], (
        "partial checkpoint kept"
    )
    assert (
        service.job(queued_id)["status"] == "cancelled"
        and service.job(queued_id)["started_at"] is None
    )
