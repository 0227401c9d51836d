"""`resources` and `runtime.distributed` at `POST /jobs` (issue 14): a job asking for a GPU count
no worker class offers (`OPSD_RESOURCE_CLASSES`) is a 422 naming `resources.gpus`; an accepted
job's message goes to the queue of its class, and an eval of it follows (real app, store, Redis).
"""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import REDIS_TEST_URL, auth
from worker.queue import class_queue

BODY = {"base_model": "Qwen/Qwen3-4B", "dataset_uri": "/data/train.jsonl"}


@pytest.fixture
def routed(settings):
    from api.app import create_app

    settings = settings.model_copy(
        update={"resource_classes": "1,2,8", "queue": f"res-{uuid.uuid4().hex[:8]}"}
    )
    app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield app, client


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"resources": {"gpus": 4}}, "resources.gpus"),  # no worker class of 4
        ({"resources": {"gpus": 0}}, "resources.gpus"),
        ({"resources": {"gpus": "two"}}, "resources.gpus"),
        ({"resources": {"nodes": 2}}, "resources.nodes"),
        ({"resources": {"cpus": 2}}, "resources.cpus"),
        ({"runtime": {"distributed": "deepspeed"}}, "runtime.distributed"),
        ({"runtime": {"distributed": "fsdp"}}, "runtime.distributed"),  # on one GPU
        (
            {"resources": {"gpus": 2}, "runtime": {"fsdp_config": {"fsdp_offload_params": True}}},
            "runtime.fsdp_config",
        ),
        (
            {
                "resources": {"gpus": 2},
                "runtime": {"distributed": "fsdp", "fsdp_config": {"sharding_strategy": "X"}},
            },
            "runtime.fsdp_config.sharding_strategy",
        ),
    ],
)
def test_resources_the_deployment_cannot_run_answer_422_naming_the_field(
    routed, tenant_keys, patch, param
) -> None:
    _, client = routed
    response = client.post("/jobs", json={**BODY, **patch}, headers=auth(tenant_keys["a"]))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == param


def test_a_job_and_its_eval_go_to_the_queue_of_its_class(routed, tenant_keys) -> None:
    import redis

    app, client = routed
    body = {
        **BODY,
        "resources": {"gpus": 8},
        "runtime": {
            "distributed": "fsdp",
            "fsdp_config": {"fsdp_sharding_strategy": "SHARD_GRAD_OP"},
        },
    }
    response = client.post("/jobs", json=body, headers=auth(tenant_keys["a"]))
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["spec"]["resources"] == {"gpus": 8, "nodes": 1}
    assert job["spec"]["runtime"]["fsdp_config"]["fsdp_sharding_strategy"] == "SHARD_GRAD_OP"
    store = app.state.store
    assert store.claim_job(job["id"], "w", lease_seconds=60)
    assert store.finish_job(job["id"], "w", adapter_uri="/artifacts/a")
    created = client.post(
        f"/jobs/{job['id']}/evals",
        json={"dataset_uri": "/data/bench.jsonl", "n": 1},
        headers=auth(tenant_keys["a"]),
    )
    assert created.status_code == 201, created.text
    broker = redis.Redis.from_url(REDIS_TEST_URL)
    try:
        queue = app.state.settings.queue
        assert broker.llen(class_queue(queue, 8)) == 2  # the job's message and its eval's
        assert broker.llen(class_queue(queue, 1)) == 0
    finally:
        broker.close()
