"""The HTTP contract on a real store: submission, validation, auth, isolation, paging, errors."""

from __future__ import annotations

import json

import pytest

from tests.api.conftest import auth

BODY = {"base_model": "Qwen/Qwen3-4B", "dataset_uri": "/data/train.jsonl"}


def _submit(client, key, body=None, **headers):
    return client.post("/jobs", json=body or BODY, headers={**auth(key), **headers})


def test_minimal_submission_gets_paper_defaults_and_is_queued(client, tenant_keys) -> None:
    response = _submit(client, tenant_keys["a"])
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["status"] == "queued" and job["attempt"] == 1 and job["id"].startswith("job_")
    spec = job["spec"]
    assert spec["divergence"] == "jsd" and spec["beta"] == 0.5 and spec["teacher"] == "initial"
    assert spec["lora"]["r"] == 64 and spec["optim"]["learning_rate"] == 2e-5
    assert spec["max_new_tokens"] == 2048 and spec["generation"]["temperature"] == 1.2
    fetched = client.get(f"/jobs/{job['id']}", headers=auth(tenant_keys["a"]))
    assert fetched.status_code == 200 and fetched.json()["id"] == job["id"]
    events = client.get(f"/jobs/{job['id']}/events", headers=auth(tenant_keys["a"])).json()["data"]
    assert [e["kind"] for e in events] == ["queued"]


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"divergence": "kl"}, "divergence"),
        ({"optim": {"learning_rate": -1}}, "optim.learning_rate"),
        ({"beta": "half"}, "beta"),
        ({"lora": {"r": "sixty-four"}}, "lora.r"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"optim": {"lr": 1e-5}}, "optim.lr"),
        ({"dataset_uri": "nosuchscheme://bucket/x.jsonl"}, "dataset_uri"),
        ({"lora": {"r": 100000}}, "lora.r"),
        ({"base_model": None}, "base_model"),
        ({"max_new_tokens": 1.5}, "max_new_tokens"),
        ({"metadata": {"note": "a\x00b"}}, "metadata.note"),
        ({"base_model": "m\x00"}, "base_model"),
        (
            {"prompts": {"student_thinking": False, "teacher_thinking": True}},
            "prompts.teacher_thinking",
        ),
        ({"dataset": {"answer_field": "reward_model..gt"}}, "dataset.answer_field"),
    ],
)
def test_bad_specs_answer_422_naming_the_field(client, tenant_keys, patch, param) -> None:
    response = _submit(client, tenant_keys["a"], {**BODY, **patch})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["code"] == "invalid_request" and param.split(".")[0] in error["message"]


def test_missing_required_field(client, tenant_keys) -> None:
    response = _submit(client, tenant_keys["a"], {"base_model": "m"})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "dataset_uri"


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [
        (b'{"base_model": "m", ', 400, "invalid_json"),
        (b"[1, 2, 3]", 422, "invalid_request"),
        (b'"just a string"', 422, "invalid_request"),
        (b"", 422, "invalid_request"),
    ],
)
def test_malformed_bodies_never_500(client, tenant_keys, content, status, code) -> None:
    response = client.post(
        "/jobs",
        content=content,
        headers={**auth(tenant_keys["a"]), "Content-Type": "application/json"},
    )
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_huge_bodies_answer_413(client, tenant_keys) -> None:
    body = {**BODY, "metadata": {"blob": "x" * 200_000}}
    response = _submit(client, tenant_keys["a"], body)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"

    def chunks():
        yield b'{"base_model": "m", "dataset_uri": "d.jsonl", "metadata": {"x": "'
        for _ in range(100):
            yield b"y" * 4096
        yield b'"}}'

    streamed = client.post(
        "/jobs",
        content=chunks(),
        headers={**auth(tenant_keys["a"]), "Content-Type": "application/json"},
    )
    assert streamed.status_code == 413


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"Authorization": "Bearer opsd_nope_nope"}, "invalid_api_key"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "invalid_api_key"),
        ({"Authorization": "Bearer "}, "invalid_api_key"),
        ({"Authorization": "Bearer " + "z" * 5000}, "invalid_api_key"),
    ],
)
def test_bad_keys_answer_401(client, headers, code) -> None:
    for method, path in [("get", "/jobs"), ("post", "/jobs"), ("get", "/jobs/job_x/metrics")]:
        response = getattr(client, method)(path, headers=headers)
        assert response.status_code == 401, (path, response.text)
        assert response.json()["error"]["code"] == code


def test_idempotent_resubmission(client, tenant_keys) -> None:
    first = _submit(client, tenant_keys["a"], **{"Idempotency-Key": "k-1"})
    again = _submit(client, tenant_keys["a"], **{"Idempotency-Key": "k-1"})
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    other = _submit(client, tenant_keys["a"], {**BODY, "seed": 3}, **{"Idempotency-Key": "k-1"})
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"
    # keys are per tenant
    tenant_b = _submit(client, tenant_keys["b"], **{"Idempotency-Key": "k-1"})
    assert tenant_b.status_code == 201 and tenant_b.json()["id"] != first.json()["id"]


def test_tenant_isolation_on_every_job_endpoint(client, tenant_keys) -> None:
    job_id = _submit(client, tenant_keys["a"]).json()["id"]
    other = auth(tenant_keys["b"])
    for method, path in [
        ("get", f"/jobs/{job_id}"),
        ("post", f"/jobs/{job_id}/cancel"),
        ("get", f"/jobs/{job_id}/metrics"),
        ("get", f"/jobs/{job_id}/events"),
        ("get", f"/jobs/{job_id}/checkpoints"),
        ("get", f"/jobs/{job_id}/adapter"),
    ]:
        response = getattr(client, method)(path, headers=other)
        assert response.status_code == 404, (path, response.text)
        assert response.json()["error"]["code"] == "job_not_found"
    assert all(j["id"] != job_id for j in client.get("/jobs", headers=other).json()["data"])
    assert (
        client.get(f"/jobs/{job_id}", headers=auth(tenant_keys["a"])).json()["status"] == "queued"
    )


def test_unknown_ids_answer_404(client, tenant_keys) -> None:
    for path in ["/jobs/job_does_not_exist", "/jobs/%00weird", "/jobs/" + "x" * 600 + "/events"]:
        response = client.get(path, headers=auth(tenant_keys["a"]))
        assert response.status_code == 404, response.text
    assert (
        client.get("/nope", headers=auth(tenant_keys["a"])).json()["error"]["code"] == "not_found"
    )


def test_pagination_over_several_pages(client, tenant_keys) -> None:
    key = tenant_keys["a"]
    created = [_submit(client, key, {**BODY, "seed": i}).json()["id"] for i in range(7)]
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = client.get("/jobs", params=params, headers=auth(key)).json()
        seen += [j["id"] for j in page["data"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == list(reversed(created))  # newest first, no gaps, no duplicates
    bad = client.get("/jobs", params={"cursor": "garbage"}, headers=auth(key))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "cursor"
    wrong = client.get("/jobs", params={"status": "done"}, headers=auth(key))
    assert wrong.status_code == 422 and wrong.json()["error"]["param"] == "status"
    too_many = client.get("/jobs", params={"limit": 1000}, headers=auth(key))
    assert too_many.status_code == 422 and too_many.json()["error"]["param"] == "limit"


def test_status_filter_and_cancel_of_a_queued_job(client, tenant_keys) -> None:
    key = tenant_keys["a"]
    keep = _submit(client, key).json()["id"]
    drop = _submit(client, key, {**BODY, "seed": 1}).json()["id"]
    cancelled = client.post(f"/jobs/{drop}/cancel", headers=auth(key))
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    again = client.post(f"/jobs/{drop}/cancel", headers=auth(key))
    assert again.json()["status"] == "cancelled"  # terminal: unchanged
    queued = client.get("/jobs", params={"status": "queued"}, headers=auth(key)).json()["data"]
    assert keep in [j["id"] for j in queued] and drop not in [j["id"] for j in queued]
    kinds = [
        e["kind"] for e in client.get(f"/jobs/{drop}/events", headers=auth(key)).json()["data"]
    ]
    assert kinds[0] == "queued" and "cancelled" in kinds


def test_metrics_filters_and_downsampling(client, store, tenant_keys) -> None:
    key = tenant_keys["a"]
    job_id = _submit(client, key).json()["id"]
    for step in range(1, 201):
        store.record_metrics(job_id, step, {"loss": 1.0 / step, "lr": 1e-5})
    everything = client.get(f"/jobs/{job_id}/metrics", headers=auth(key)).json()["metrics"]
    assert set(everything) == {"loss", "lr"} and everything["loss"]["steps"] == list(range(1, 201))
    window = client.get(
        f"/jobs/{job_id}/metrics",
        params={"name": "loss", "step_min": 10, "step_max": 19},
        headers=auth(key),
    ).json()["metrics"]
    assert list(window) == ["loss"] and window["loss"]["steps"] == list(range(10, 20))
    small = client.get(
        f"/jobs/{job_id}/metrics", params={"name": "loss", "max_points": 20}, headers=auth(key)
    )
    series = small.json()["metrics"]["loss"]
    assert 2 <= len(series["steps"]) <= 20
    assert series["steps"][0] == 1 and series["steps"][-1] == 200
    bad = client.get(
        f"/jobs/{job_id}/metrics", params={"step_min": 5, "step_max": 1}, headers=auth(key)
    )
    assert bad.status_code == 422


def test_adapter_of_an_unfinished_job_is_409(client, tenant_keys) -> None:
    job_id = _submit(client, tenant_keys["a"]).json()["id"]
    response = client.get(f"/jobs/{job_id}/adapter", headers=auth(tenant_keys["a"]))
    assert response.status_code == 409 and response.json()["error"]["code"] == "adapter_not_ready"


def test_sse_stream_replays_events_and_ends_with_the_job(client, store, tenant_keys) -> None:
    from jobstore import JobError

    key = tenant_keys["a"]
    job_id = _submit(client, key).json()["id"]
    store.add_event(job_id, "note", "hello")
    store.fail_job(job_id, error=JobError("dataset_error", "bad line 3", "user"))
    with client.stream(
        "GET", f"/jobs/{job_id}/events", headers={**auth(key), "Accept": "text/event-stream"}
    ) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        text = "".join(s.iter_text())
    kinds = [line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("event: ")]
    assert kinds[:2] == ["queued", "note"] and kinds[-1] == "end" and "failed" in kinds
    ids = [int(line.split(": ")[1]) for line in text.splitlines() if line.startswith("id: ")]
    resumed_headers = {**auth(key), "Accept": "text/event-stream", "Last-Event-ID": str(ids[0])}
    with client.stream("GET", f"/jobs/{job_id}/events", headers=resumed_headers) as s:
        again = "".join(s.iter_text())
    assert "event: queued" not in again and "event: note" in again
    job = client.get(f"/jobs/{job_id}", headers=auth(key)).json()
    assert job["status"] == "failed" and job["error"] == {
        "code": "dataset_error",
        "message": "bad line 3",
        "category": "user",
    }


def test_health_readiness_and_openapi(client) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "checks": {}}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"store": "ok", "broker": "ok"}
    schema = client.get("/openapi.json").json()
    post = schema["paths"]["/jobs"]["post"]
    examples = post["requestBody"]["content"]["application/json"]["examples"]
    assert {"minimal", "full"} <= examples.keys()
    for path in [
        "/jobs/{job_id}/metrics",
        "/jobs/{job_id}/events",
        "/jobs/{job_id}/checkpoints",
        "/jobs/{job_id}/adapter",
        "/jobs/{job_id}/cancel",
        "/readyz",
    ]:
        assert path in schema["paths"]
    assert json.dumps(schema)  # serialisable


def test_readyz_reports_an_unreachable_broker(settings) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app

    broken = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(broken)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503 and response.json()["checks"]["broker"] == "unreachable"


def test_importing_the_api_loads_neither_torch_nor_the_engine() -> None:
    import subprocess
    import sys

    code = (
        "import sys, api.app, api.routes.jobs; "
        "bad = [m for m in ('torch', 'transformers', 'opsd_engine') if m in sys.modules]; "
        "assert not bad, bad; "
        "from opsd_engine.config import JobSpec; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_unreachable_queue_fails_the_job_visibly(settings) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app

    broken = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    app = create_app(broken)
    key = app.state.store.create_api_key("queue-down")
    with TestClient(app) as client:
        headers = {**auth(key), "Idempotency-Key": "retry-me"}
        response = client.post("/jobs", json=BODY, headers=headers)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "queue_unavailable"
        retried = client.post("/jobs", json=BODY, headers=headers)
        assert retried.status_code == 503, "a retry submits anew instead of replaying the failure"
        jobs = client.get("/jobs", headers=auth(key)).json()["data"]
    assert len(jobs) == 2 and {j["status"] for j in jobs} == {"failed"}
    assert (
        jobs[0]["error"]["code"] == "queue_unavailable" and jobs[0]["error"]["category"] == "system"
    )


def test_metrics_reads_see_every_new_step_of_a_running_job(client, store, tenant_keys) -> None:
    """Answers are cached per job version; a worker's write (metrics, then progress) is seen."""
    key = tenant_keys["a"]
    job_id = _submit(client, key).json()["id"]
    assert store.claim_job(job_id, "w1", lease_seconds=60) is not None
    for step in (1, 2, 3):
        store.record_metrics(job_id, step, {"loss": 1.0 / step})
        store.update_progress(job_id, "w1", step=step, total_steps=3)
        series = client.get(f"/jobs/{job_id}/metrics", headers=auth(key)).json()["metrics"]
        assert series["loss"]["steps"] == list(range(1, step + 1))
        again = client.get(f"/jobs/{job_id}/metrics", headers=auth(key)).json()["metrics"]
        assert again == series


def test_an_unreachable_store_answers_503_with_retry_after(settings) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app
    from tests.opsd_client.service import closed_port

    down = f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/opsd"
    with TestClient(create_app(settings.model_copy(update={"database_url": down}))) as client:
        for response in (
            client.get("/jobs", headers=auth("opsd_abc_def")),
            client.post("/jobs", json=BODY, headers=auth("opsd_abc_def")),
        ):
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "store_unavailable"
            assert response.headers["retry-after"] == "1"
