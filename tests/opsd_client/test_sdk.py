"""The blocking SDK (`opsd_client.Client`) against the real running service.

Every resource method, the typed models, the error classes, retries (a refused port, and a
faulty proxy in front of the real service), the automatic Idempotency-Key, event streaming with
reconnection by `Last-Event-ID`, and a downloaded adapter that peft loads.
"""

from __future__ import annotations

import gzip
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

import opsd_client
from opsd_client import (
    APIConnectionError,
    AuthenticationError,
    Checkpoint,
    Client,
    ConflictError,
    Event,
    Job,
    JobCancelledError,
    JobFailedError,
    Metrics,
    NotFoundError,
    RateLimitError,
    ServiceUnavailableError,
    UnprocessableEntityError,
    WaitTimeoutError,
)
from tests.opsd_client.faults import Fault, FaultProxy
from tests.opsd_client.service import FINISHED_JOB_STEPS, LiveService, closed_port, tiny_body


def _counting_client(**kwargs: Any) -> tuple[Client, list[httpx.Request]]:
    sent: list[httpx.Request] = []
    http = httpx.Client(timeout=10, event_hooks={"request": [sent.append]})
    return Client(http_client=http, **kwargs), sent


# ------------------------------------------------------------------------------ configuration
def test_client_reads_base_url_and_key_from_the_environment(
    service: LiveService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPSD_BASE_URL", service.base_url + "/")
    monkeypatch.setenv("OPSD_API_KEY", service.api_key)
    with Client() as client:
        assert client.base_url == service.base_url
        assert service.api_key not in repr(client)
        list(client.jobs.list(max_items=1))  # authenticated: no AuthenticationError
    with Client(api_key="opsd_wrong_key") as client, pytest.raises(AuthenticationError):
        list(client.jobs.list())


# ---------------------------------------------------------------------------- reading a job
def test_retrieve_metrics_events_checkpoints_match_the_http_api(
    client: Client, service: LiveService, done_job: dict[str, Any]
) -> None:
    job_id = done_job["id"]
    job = client.jobs.retrieve(job_id)
    assert isinstance(job, Job) and job.status == "succeeded" and job.is_terminal
    assert job.progress.step == FINISHED_JOB_STEPS and job.progress.fraction == 1.0
    assert job.model_dump(mode="json") == done_job
    assert job.metadata == {"purpose": "finished-job"} and job.adapter_uri

    with service.http() as http:
        raw_metrics = http.get(f"/jobs/{job_id}/metrics").json()
        raw_events = http.get(f"/jobs/{job_id}/events").json()["data"]
        raw_checkpoints = http.get(f"/jobs/{job_id}/checkpoints").json()["data"]

    metrics = client.jobs.metrics(job_id)
    assert isinstance(metrics, Metrics) and metrics.model_dump(mode="json") == raw_metrics
    assert metrics["loss"].steps == [1, 2, 3, 4] and len(metrics["loss"]) == 4
    assert {"loss", "divergence", "student_entropy", "lr", "grad_norm"} <= set(metrics.names)

    some = client.jobs.metrics(job_id, names=["loss", "lr"], step_min=2, step_max=3)
    assert some.names == ["loss", "lr"] and some["lr"].steps == [2, 3]
    assert some["loss"].values == metrics["loss"].values[1:3]
    assert [step for step, _ in some.rows()] == [2, 3]
    assert len(client.jobs.metrics(job_id, names=["loss"], max_points=2)["loss"]) <= 2

    events = client.jobs.events(job_id)
    assert all(isinstance(e, Event) for e in events)
    assert [e.model_dump(mode="json") for e in events] == raw_events
    # the job's own lifecycle ends in `succeeded`; evals other tests ran on this shared finished
    # job add their eval_* events after it
    lifecycle = [e.kind for e in events if not e.kind.startswith("eval_")]
    assert lifecycle[0] == "queued" and lifecycle[-1] == "succeeded"
    assert client.jobs.events(job_id, after_id=events[2].id) == events[3:]
    assert client.jobs.events(job_id, limit=2) == events[:2]

    checkpoints = client.jobs.checkpoints(job_id)
    assert all(isinstance(c, Checkpoint) for c in checkpoints)
    assert [c.step for c in checkpoints] == [2, 4]
    assert [c.model_dump(mode="json") for c in checkpoints] == raw_checkpoints


def test_list_follows_cursors_across_pages(
    client: Client, service: LiveService, done_job: dict[str, Any]
) -> None:
    with service.http() as http:
        every = http.get("/jobs", params={"limit": 100}).json()["data"]
    assert len(every) >= 1
    ids = [job.id for job in client.jobs.list(limit=1)]
    assert ids == [j["id"] for j in every]
    assert [j.id for j in client.jobs.list(limit=1, max_items=1)] == ids[:1]
    pages = list(client.jobs.list(limit=1).pages())
    assert len(pages) == len(every) and all(len(p.data) == 1 for p in pages)
    assert done_job["id"] in {j.id for j in client.jobs.list(status="succeeded")}
    assert all(j.status == "succeeded" for j in client.jobs.list(status="succeeded"))


# ------------------------------------------------------------------- the life of a new job
def test_create_streams_live_events_and_waits_to_success(
    client: Client, tiny_model_dir: Path, tiny_dataset: Path
) -> None:
    spec = tiny_body(tiny_model_dir, tiny_dataset)
    job = client.jobs.create(
        spec=spec, optim={"max_steps": 2}, metadata={"test": "sdk-create"}, seed=3
    )
    assert job.status in {"queued", "running"} and job.spec["optim"]["max_steps"] == 2
    assert job.spec["seed"] == 3 and job.metadata == {"test": "sdk-create"}
    assert job.spec["optim"]["learning_rate"] == spec["optim"]["learning_rate"]  # merged group

    streamed = list(client.jobs.stream_events(job.id))
    kinds = [e.kind for e in streamed]
    assert kinds[0] == "queued" and kinds[-1] == "succeeded" and "started" in kinds
    assert [e.id for e in streamed] == sorted({e.id for e in streamed})

    seen: list[str] = []
    final = job.wait(timeout=120, poll=0.2, on_update=lambda j: seen.append(j.status))
    assert final.status == "succeeded" and final.progress.step == 2
    assert seen[-1] == "succeeded"
    assert final.refresh().model_dump() == final.model_dump()
    assert client.jobs.events(job.id) == streamed


def test_wait_raises_the_servers_reason_for_failed_and_cancelled_jobs(
    client: Client, tiny_model_dir: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.jsonl"
    failing = client.jobs.create(
        spec=tiny_body(tiny_model_dir, tiny_dataset), dataset_uri=str(missing)
    )
    with pytest.raises(JobFailedError) as failed:
        failing.wait(timeout=120, poll=0.2)
    assert failed.value.category == "user" and failed.value.job.status == "failed"
    assert "missing.jsonl" in failed.value.reason and failed.value.code

    queued = client.jobs.create(
        spec=tiny_body(tiny_model_dir, tiny_dataset), optim={"max_steps": 500}
    )
    with pytest.raises(WaitTimeoutError) as timed_out:
        queued.wait(timeout=0.3, poll=0.1)
    assert timed_out.value.last.id == queued.id
    cancelled = client.jobs.cancel(queued.id)
    assert cancelled.status in {"cancelled", "cancelling"}
    with pytest.raises(JobCancelledError) as stopped:
        client.jobs.wait(queued.id, timeout=60, poll=0.2)
    assert stopped.value.reason and stopped.value.job.status == "cancelled"
    assert client.jobs.cancel(queued.id).status == "cancelled"  # cancelling again: no change
    with pytest.raises(ConflictError) as not_ready:
        client.jobs.download_adapter(queued.id, tmp_path / "nothing")
    assert not_ready.value.code == "adapter_not_ready" and not_ready.value.status == 409


# ------------------------------------------------------------------------------ the adapter
def test_download_adapter_loads_with_peft(
    client: Client, done_job: dict[str, Any], tiny_model_dir: Path, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = client.jobs.download_adapter(done_job["id"], tmp_path / "adapter")
    assert folder == tmp_path / "adapter"
    assert (folder / "adapter_config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(folder))
    assert any("lora_A" in name for name, _ in model.named_parameters())

    archive = client.jobs.download_adapter(done_job["id"], tmp_path, extract=False)
    assert archive == tmp_path / f"{done_job['id']}-adapter.tar.gz"
    assert gzip.decompress(archive.read_bytes())  # a complete gzip stream
    with pytest.raises(FileExistsError):
        client.jobs.download_adapter(done_job["id"], folder)  # never overwrites a folder


# ---------------------------------------------------------------------------------- errors
def test_error_statuses_map_to_exception_classes(
    client: Client,
    service: LiveService,
    done_job: dict[str, Any],
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(NotFoundError) as missing:
        client.jobs.retrieve("job_doesnotexist")
    error = missing.value
    assert (error.status, error.code, error.param) == (404, "job_not_found", "job_id")
    assert isinstance(error, opsd_client.APIStatusError) and "job_doesnotexist" in error.message

    other_tenant = Client(base_url=service.base_url, api_key=service.new_key("sdk-other"))
    with other_tenant, pytest.raises(NotFoundError):
        other_tenant.jobs.metrics(done_job["id"])

    with Client(base_url=service.base_url, api_key="opsd_nope_nope") as bad:
        with pytest.raises(AuthenticationError) as rejected:
            bad.jobs.retrieve(done_job["id"])
        assert rejected.value.status == 401 and rejected.value.code == "invalid_api_key"
    monkeypatch.delenv("OPSD_API_KEY", raising=False)
    with Client(base_url=service.base_url) as anonymous:
        with pytest.raises(AuthenticationError) as no_key:
            anonymous.jobs.retrieve(done_job["id"])
        assert no_key.value.code == "missing_api_key"

    with pytest.raises(UnprocessableEntityError) as invalid:
        client.jobs.create(
            base_model=str(tiny_model_dir),
            dataset_uri="/data/train.jsonl",
            optim={"learning_rate": -1},
        )
    assert invalid.value.status == 422 and invalid.value.param == "optim.learning_rate"
    with pytest.raises(UnprocessableEntityError) as unknown:
        client.jobs.create(spec={"dataset_uri": "/x.jsonl"})
    assert unknown.value.param == "base_model"
    with pytest.raises(UnprocessableEntityError) as no_class:  # no worker class of 16 GPUs
        client.jobs.create(
            base_model=str(tiny_model_dir), dataset_uri="/data/train.jsonl", resources={"gpus": 16}
        )
    assert no_class.value.param == "resources.gpus"


def test_an_idempotency_key_replays_and_a_reused_key_with_another_body_conflicts(
    client: Client, tiny_model_dir: Path, tiny_dataset: Path
) -> None:
    key = f"test-{uuid.uuid4().hex}"
    body = tiny_body(tiny_model_dir, tiny_dataset, optim={"max_steps": 1})
    first = client.jobs.create(spec=body, idempotency_key=key)
    again = client.jobs.create(spec=body, idempotency_key=key)
    assert again.id == first.id
    with pytest.raises(ConflictError) as conflict:
        client.jobs.create(spec=body, seed=99, idempotency_key=key)
    assert conflict.value.code == "idempotency_conflict"
    assert conflict.value.param == "Idempotency-Key"
    client.jobs.cancel(first.id)


# --------------------------------------------------------------------------------- retries
def test_a_refused_connection_is_retried_a_bounded_number_of_times() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    client, sent = _counting_client(base_url=url, api_key="k", max_retries=2)
    started = time.monotonic()
    with client, pytest.raises(APIConnectionError) as refused:
        client.jobs.retrieve("job_x")
    assert len(sent) == 3 and time.monotonic() - started < 10
    assert "127.0.0.1" in str(refused.value)
    once, sent_once = _counting_client(base_url=url, api_key="k", max_retries=0)
    with once, pytest.raises(APIConnectionError):
        once.jobs.create(base_model="m", dataset_uri="d")  # nothing reached a server: retried too
    assert len(sent_once) == 1


def test_safe_calls_are_retried_on_503_and_429(
    service: LiveService, done_job: dict[str, Any]
) -> None:
    job_id = done_job["id"]
    with FaultProxy(service.base_url) as proxy:
        proxy.plan = [
            Fault("GET", f"/jobs/{job_id}", status=503, retry_after="0"),
            Fault("GET", f"/jobs/{job_id}", status=429, retry_after="0"),
        ]
        with Client(base_url=proxy.url, api_key=service.api_key, max_retries=2) as client:
            assert client.jobs.retrieve(job_id).id == job_id
            assert len(proxy.requests_to("GET", f"/jobs/{job_id}")) == 3

            proxy.plan = [Fault("GET", "/jobs", status=429, retry_after="0") for _ in range(3)]
            with pytest.raises(RateLimitError) as limited:
                list(client.jobs.list())
            assert limited.value.status == 429 and not proxy.plan  # 1 try + 2 retries

            proxy.plan = [Fault("GET", f"/jobs/{job_id}", status=503, retry_after="0")] * 3
            with pytest.raises(ServiceUnavailableError):
                client.jobs.retrieve(job_id)
            assert not proxy.plan

            # an eval whose answer was lost: resent with the same key, one eval made
            before = {e.id for e in client.evals.list(job_id)}
            proxy.plan = [
                Fault(
                    "POST",
                    f"/jobs/{job_id}/evals",
                    status=503,
                    forward_first=True,
                    retry_after="0",
                )
            ]
            evaluation = client.evals.create(job_id, dataset_uri="/x.jsonl")
            posts = proxy.requests_to("POST", f"/jobs/{job_id}/evals")
            assert len(posts) == 2 and not proxy.plan
            assert posts[0].headers["Idempotency-Key"] == posts[1].headers["Idempotency-Key"]
            assert {e.id for e in client.evals.list(job_id)} - before == {evaluation.id}


def test_a_create_whose_answer_was_lost_is_retried_without_a_second_job(
    service: LiveService, tiny_model_dir: Path, tiny_dataset: Path
) -> None:
    marker = uuid.uuid4().hex
    body = tiny_body(tiny_model_dir, tiny_dataset, optim={"max_steps": 1})
    with FaultProxy(service.base_url) as proxy:
        # the service creates the job, but the client only sees a 503
        proxy.plan = [Fault("POST", "/jobs", status=503, forward_first=True, retry_after="0")]
        with Client(base_url=proxy.url, api_key=service.api_key) as client:
            job = client.jobs.create(spec=body, metadata={"marker": marker})
            other = client.jobs.create(spec=body, metadata={"marker": marker + "-2"})
        posts = proxy.requests_to("POST", "/jobs")
    keys = [p.headers.get("Idempotency-Key") for p in posts]
    assert len(posts) == 3 and keys[0] == keys[1] and keys[2] != keys[0]
    assert all(k and k.startswith("opsd-py-") for k in keys)
    with service.http() as http:
        jobs = http.get("/jobs", params={"limit": 100}).json()["data"]
        mine = [j for j in jobs if j["metadata"].get("marker") == marker]
        assert [j["id"] for j in mine] == [job.id]
        for job_id in (job.id, other.id):
            http.post(f"/jobs/{job_id}/cancel")


# -------------------------------------------------------------------------------- streaming
def test_stream_events_resumes_after_a_given_event_id(
    client: Client, done_job: dict[str, Any]
) -> None:
    job_id = done_job["id"]
    every = list(client.jobs.stream_events(job_id))
    assert every == client.jobs.events(job_id)
    middle = every[2].id
    assert list(client.jobs.stream_events(job_id, last_event_id=middle)) == every[3:]
    assert list(client.jobs.stream_events(job_id, after_id=middle)) == every[3:]


def test_a_dropped_event_stream_reconnects_with_last_event_id(
    service: LiveService, done_job: dict[str, Any]
) -> None:
    job_id = done_job["id"]
    with FaultProxy(service.base_url) as proxy:
        proxy.plan = [
            Fault("GET", f"/jobs/{job_id}/events", cut_after_events=2),
            Fault("GET", f"/jobs/{job_id}/events", cut_after_events=1),
        ]
        with Client(base_url=proxy.url, api_key=service.api_key) as client:
            events = list(client.jobs.stream_events(job_id, retry_delay=0.05))
            expected = client.jobs.events(job_id)
        resumed = [
            s.headers.get("Last-Event-ID")
            for s in proxy.requests_to("GET", f"/jobs/{job_id}/events")
            if s.headers.get("Accept") == "text/event-stream"
        ]
    assert events == expected  # nothing lost, nothing twice
    assert resumed == [None, str(expected[1].id), str(expected[2].id)]

    dead = Client(base_url=f"http://127.0.0.1:{closed_port()}", api_key="k", max_retries=0)
    with dead, pytest.raises(APIConnectionError):
        list(dead.jobs.stream_events(job_id, retry_delay=0.01, max_reconnects=2))
