"""Pre-flight through the shared real service (`opsd up`: API, worker, SQLite, file broker):
the SDK (sync and async), `opsd jobs preflight` and the HTTP errors (422 naming the field, 404
for another tenant's job, 409 while one runs)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from opsd_cli import app
from opsd_client import (
    AsyncClient,
    Client,
    ConflictError,
    NotFoundError,
    UnprocessableEntityError,
)
from tests.opsd_client.service import LiveService, tiny_body

OPTIONS = {"sample_size": 3, "profile_rollouts": 2, "max_new_tokens": 6}


@pytest.fixture(scope="module")
def preflighted(service: LiveService, tiny_model_dir: Path, tiny_dataset: Path) -> dict[str, Any]:
    """A one-step job of its own (the shared finished job's events stay as they are) and its
    pre-flight, run once through the SDK while the job is queued or running."""
    body = tiny_body(tiny_model_dir, tiny_dataset, optim={"max_steps": 1})
    with Client(base_url=service.base_url, api_key=service.api_key, timeout=30) as client:
        job = client.jobs.create(spec=body)
        started = client.jobs.preflight(job.id, **OPTIONS)
        assert started.status in ("queued", "running") and started.job_id == job.id
        with pytest.raises(ConflictError) as info:  # one at a time per job
            client.jobs.preflight(job.id)
        assert info.value.code == "preflight_in_progress"
        finished = started.wait(timeout=180)
        return {"job": job.model_dump(mode="json"), "preflight": finished}


def test_the_sdk_runs_a_preflight_and_reads_its_report(
    preflighted: dict[str, Any], client: Client
) -> None:
    found, job_id = preflighted["preflight"], preflighted["job"]["id"]
    assert found.status == "succeeded", found.error
    report = found.report
    assert report is not None and report.n_problems == 3 and report.samples_per_problem == 1
    assert [c.name for c in report.checks] == [
        "generation_prompt_state",
        "rollout_tokenization",
        "teacher_first_tokens",
        "privileged_gap",
    ]
    assert report.check("generation_prompt_state").status == "pass"
    assert report.check("privileged_gap").status == "warn"  # a random model: no gap
    assert report.gap == 0.0 and report.divergence_profile and report.profile_counts[0] == 2
    assert found.config["sample_size"] == 3

    again = client.jobs.retrieve_preflight(job_id)
    assert again.id == found.id and again.report == report
    assert [p.id for p in client.jobs.list_preflights(job_id)] == [found.id]
    metrics = client.jobs.metrics(job_id, names=["preflight/gap", "preflight/status"])
    assert metrics["preflight/gap"].values == [0.0] and metrics["preflight/status"].values == [1.0]
    kinds = [e.kind for e in client.jobs.events(job_id)]
    assert "preflight_started" in kinds and "preflight_finished" in kinds


def test_the_async_sdk_reads_the_same_report(
    preflighted: dict[str, Any], service: LiveService
) -> None:
    async def read() -> Any:
        async with AsyncClient(base_url=service.base_url, api_key=service.api_key) as client:
            return await client.jobs.retrieve_preflight(preflighted["job"]["id"])

    found = asyncio.run(read())
    assert found.id == preflighted["preflight"].id and found.report.status == "warn"


def test_bad_requests_and_other_tenants(
    preflighted: dict[str, Any],
    service: LiveService,
    client: Client,
    tiny_model_dir: Path,
    tiny_dataset: Path,
) -> None:
    job_id = preflighted["job"]["id"]
    for options, field in (({"sample_size": 0}, "sample_size"), ({"min_gap": 2.0}, "min_gap")):
        with pytest.raises(UnprocessableEntityError) as info:
            client.jobs.preflight(job_id, **options)
        assert info.value.param == field
    with service.http() as http:
        response = http.post(f"/jobs/{job_id}/preflight", json={"bogus": 1})
        assert response.status_code == 422 and response.json()["error"]["param"] == "bogus"
        # a job without a pre-flight yet
        other_job = http.post("/jobs", json=tiny_body(tiny_model_dir, tiny_dataset)).json()
        missing = http.get(f"/jobs/{other_job['id']}/preflight")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "preflight_not_found"
        listed = http.get(f"/jobs/{other_job['id']}/preflights")
        assert listed.status_code == 200 and listed.json()["data"] == []
        http.post(f"/jobs/{other_job['id']}/cancel")
    stranger = service.new_key("stranger-preflight")
    with Client(base_url=service.base_url, api_key=stranger) as theirs:
        with pytest.raises(NotFoundError):
            theirs.jobs.retrieve_preflight(job_id)
        with pytest.raises(NotFoundError):
            theirs.jobs.preflight(job_id)
        with pytest.raises(NotFoundError):
            theirs.jobs.list_preflights(job_id)


def test_opsd_jobs_preflight_shows_the_report(
    preflighted: dict[str, Any], service: LiveService
) -> None:
    env = {"OPSD_BASE_URL": service.base_url, "OPSD_API_KEY": service.api_key}
    job_id = preflighted["job"]["id"]
    result = CliRunner().invoke(app, ["jobs", "preflight", job_id, "--show"], env=env)
    assert result.exit_code == 0, result.output
    assert "[PASS] generation_prompt_state" in result.stdout
    assert "[WARN] privileged_gap" in result.stdout and "fix:" in result.stdout
    result = CliRunner().invoke(app, ["jobs", "preflight", job_id, "--show", "--json"], env=env)
    assert json.loads(result.stdout)["id"] == preflighted["preflight"].id
    result = CliRunner().invoke(app, ["jobs", "preflight", "job_nope", "--show"], env=env)
    assert result.exit_code == 3
