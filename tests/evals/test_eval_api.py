"""`POST /jobs/{id}/evals`, `GET /jobs/{id}/evals`, `GET /evals/{id}` on the real app, a real store
(PostgreSQL and SQLite) and a real Redis broker: validation (422 naming the field), 409 without
an adapter or checkpoint, tenant isolation, defaults from the job's `eval` group, the message
on the queue, and no eval left behind when the broker is down."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.service_fixtures import fresh_postgres_url, redis_test_url, sqlite_url
from tests.worker.helpers import flush_redis
from worker.queue import class_queue

REDIS_URL = redis_test_url(14)
SPEC: dict[str, Any] = {"base_model": "m", "dataset_uri": "/data/train.jsonl"}


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    url, drop = fresh_postgres_url()
    yield url
    drop()


@pytest.fixture(params=["postgres", "sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    from jobstore.migrate import upgrade

    if request.param == "postgres":
        return request.getfixturevalue("postgres_url")
    url = sqlite_url(tmp_path / "opsd.db")
    upgrade(url)
    return url


def _app(database_url: str, tmp_path: Path, broker_url: str = REDIS_URL) -> Any:
    from api.app import create_app
    from opsd_service.settings import ServiceSettings

    settings = ServiceSettings(
        home=tmp_path / "home",
        database_url=database_url,
        broker_url=broker_url,
        artifacts_uri=str(tmp_path / "artifacts"),
        queue=f"evals-{uuid.uuid4().hex[:8]}",
    )
    return create_app(settings)


@pytest.fixture
def app(database_url: str, tmp_path: Path) -> Any:
    flush_redis(REDIS_URL)
    return _app(database_url, tmp_path)


@pytest.fixture
def client(app: Any) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def _auth(store: Any, tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {store.create_api_key(f'{tenant}-{uuid.uuid4().hex[:6]}')}"}


def _job(store: Any, headers: dict[str, str], *, status: str, spec: dict | None = None) -> str:
    tenant = store.authenticate(headers["Authorization"].split()[1])
    job, _ = store.create_job(tenant.id, spec=spec or SPEC)
    if status in ("running", "succeeded"):
        assert store.claim_job(job.id, "w", lease_seconds=60)
    if status == "succeeded":
        assert store.finish_job(job.id, "w", adapter_uri=f"/artifacts/jobs/{job.id}/adapter")
    return job.id


def test_create_and_get_an_eval(client: TestClient, app: Any) -> None:
    import redis

    store = app.state.store
    alice, bob = _auth(store, "alice"), _auth(store, "bob")
    job_id = _job(store, alice, status="succeeded")
    body = {"dataset_uri": "/data/bench.jsonl", "n": 4, "max_new_tokens": 64, "thinking": False}
    created = client.post(f"/jobs/{job_id}/evals", json=body, headers=alice)
    assert created.status_code == 201, created.text
    out = created.json()
    assert out["id"].startswith("eval_") and out["object"] == "eval"
    assert (out["job_id"], out["status"], out["results"], out["error"]) == (
        job_id,
        "queued",
        None,
        None,
    )
    assert out["config"] == {
        "dataset_uri": "/data/bench.jsonl",
        "problem_field": "problem",
        "answer_field": "answer",
        "limit": None,
        "n": 4,
        "max_new_tokens": 64,
        "temperature": 0.6,
        "top_p": 0.95,
        "top_k": 0,
        "thinking": False,
        "include_base": False,
        "checkpoint_step": None,
    }
    assert out["created_at"] and out["finished_at"] is None
    # the worker's message is on the queue: the eval id only
    broker = redis.Redis.from_url(REDIS_URL)
    assert broker.llen(class_queue(app.state.settings.queue, 1)) == 1
    broker.close()

    got = client.get(f"/evals/{out['id']}", headers=alice)
    assert got.status_code == 200 and got.json() == out
    listed = client.get(f"/jobs/{job_id}/evals", headers=alice).json()
    assert [e["id"] for e in listed["data"]] == [out["id"]]

    for response in (
        client.get(f"/evals/{out['id']}", headers=bob),
        client.get("/evals/eval_nosuch", headers=alice),
        client.get("/evals/not-an-id", headers=alice),
    ):
        assert response.status_code == 404 and response.json()["error"]["code"] == "eval_not_found"
    other = client.post(f"/jobs/{job_id}/evals", json=body, headers=bob)
    assert other.status_code == 404 and other.json()["error"]["code"] == "job_not_found"
    assert client.get(f"/jobs/{job_id}/evals", headers=bob).status_code == 404
    assert client.get(f"/evals/{out['id']}").status_code == 401


def test_idempotency_key_makes_a_retried_request_return_the_same_eval(
    client: TestClient, app: Any
) -> None:
    import redis

    store = app.state.store
    alice, bob = _auth(store, "alice"), _auth(store, "bob")
    job_id = _job(store, alice, status="succeeded")
    other_job = _job(store, alice, status="succeeded")
    body = {"dataset_uri": "/data/bench.jsonl", "n": 4}
    keyed = {**alice, "Idempotency-Key": "retry-1"}
    first = client.post(f"/jobs/{job_id}/evals", json=body, headers=keyed)
    again = client.post(f"/jobs/{job_id}/evals", json=body, headers=keyed)
    assert (first.status_code, again.status_code) == (201, 200), again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    queue = redis.Redis.from_url(REDIS_URL)
    # the replay sent no second message
    assert queue.llen(class_queue(app.state.settings.queue, 1)) == 1
    queue.close()

    for path, changed in ((job_id, {**body, "n": 8}), (other_job, body)):
        conflict = client.post(f"/jobs/{path}/evals", json=changed, headers=keyed)
        assert conflict.status_code == 409, conflict.text
        error = conflict.json()["error"]
        assert (error["code"], error["param"]) == ("idempotency_conflict", "Idempotency-Key")
        assert first.json()["id"] in error["message"]

    # keys are per tenant, and requests without one are never merged
    bob_job = _job(store, bob, status="succeeded")
    theirs = client.post(
        f"/jobs/{bob_job}/evals", json=body, headers={**bob, "Idempotency-Key": "retry-1"}
    )
    assert theirs.status_code == 201 and theirs.json()["id"] != first.json()["id"]
    plain = [client.post(f"/jobs/{job_id}/evals", json=body, headers=alice) for _ in range(2)]
    assert [r.status_code for r in plain] == [201, 201]
    assert len({r.json()["id"] for r in plain} | {first.json()["id"]}) == 3


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"dataset_uri": "/b.jsonl", "bogus": 1}, "bogus"),
        ({"n": 4}, "dataset_uri"),
        ({"dataset_uri": "/b.jsonl", "n": 0}, "n"),
        ({"dataset_uri": "/b.jsonl", "top_p": 1.5}, "top_p"),
        ({"dataset_uri": "nosuchscheme://x/b.jsonl"}, "dataset_uri"),
        ({"dataset_uri": "/b\x00.jsonl"}, "dataset_uri"),
    ],
)
def test_invalid_bodies_are_422_naming_the_field(
    client: TestClient, app: Any, body: dict[str, Any], param: str
) -> None:
    store = app.state.store
    headers = _auth(store, "alice")
    job_id = _job(store, headers, status="succeeded")
    response = client.post(f"/jobs/{job_id}/evals", json=body, headers=headers)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == param
    assert store.list_evals(job_id) == []


def test_no_adapter_or_no_checkpoint_is_409(client: TestClient, app: Any) -> None:
    store = app.state.store
    headers = _auth(store, "alice")
    body = {"dataset_uri": "/b.jsonl"}
    running = _job(store, headers, status="running")
    response = client.post(f"/jobs/{running}/evals", json=body, headers=headers)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "adapter_not_ready"
    missing = client.post(
        f"/jobs/{running}/evals", json={**body, "checkpoint_step": 2}, headers=headers
    )
    assert missing.status_code == 409
    assert missing.json()["error"] | {"message": ""} == {
        "code": "checkpoint_not_found",
        "message": "",
        "param": "checkpoint_step",
    }
    store.add_checkpoint(running, 2, f"/artifacts/jobs/{running}/checkpoints/step-000002")
    ok = client.post(f"/jobs/{running}/evals", json={**body, "checkpoint_step": 2}, headers=headers)
    assert ok.status_code == 201 and ok.json()["config"]["checkpoint_step"] == 2


def test_unset_fields_come_from_the_jobs_eval_group(client: TestClient, app: Any) -> None:
    store = app.state.store
    headers = _auth(store, "alice")
    spec = {**SPEC, "eval": {"dataset_uri": "/data/aime.jsonl", "n": 2, "include_base": True}}
    job_id = _job(store, headers, status="succeeded", spec=spec)
    inherited = client.post(f"/jobs/{job_id}/evals", json={}, headers=headers).json()["config"]
    assert (inherited["dataset_uri"], inherited["n"], inherited["include_base"]) == (
        "/data/aime.jsonl",
        2,
        True,
    )
    explicit = client.post(f"/jobs/{job_id}/evals", json={"n": 8}, headers=headers).json()
    assert explicit["config"]["n"] == 8 and explicit["config"]["dataset_uri"] == "/data/aime.jsonl"


def test_broker_down_answers_503_and_leaves_no_eval_behind(
    database_url: str, tmp_path: Path
) -> None:
    """Issue 11, fault 8 (the kind): a 503 left a `failed` eval behind."""
    app = _app(database_url, tmp_path, broker_url="redis://127.0.0.1:1/0")
    with TestClient(app, raise_server_exceptions=False) as client:
        store = app.state.store
        headers = _auth(store, "alice")
        job_id = _job(store, headers, status="succeeded")
        response = client.post(
            f"/jobs/{job_id}/evals", json={"dataset_uri": "/b.jsonl"}, headers=headers
        )
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "queue_unavailable"
        assert store.list_evals(job_id) == []
