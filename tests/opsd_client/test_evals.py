"""Evaluations through the SDK and the CLI (`client.evals`, `opsd evals ...`), on the real service.

These tests exist for as long as the service has an evals route module (`api/routes/evals.py`):
then the routes must be in the server's OpenAPI document (a missing route fails, it does not
skip), the SDK's `Eval` model must agree with their schemas, and an eval of a finished tiny job
must run to its results.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from opsd_cli import app
from opsd_client import AsyncClient, Client, ConflictError, Eval, NotFoundError
from opsd_client.cli import EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE
from opsd_client.models import EvalList
from tests.opsd_client.service import LiveService, tiny_body
from tests.opsd_client.test_openapi_agreement import disagreements
from tests.worker.helpers import REPO

pytestmark = pytest.mark.skipif(
    not (REPO / "api" / "routes" / "evals.py").exists(),
    reason="the service has no evals routes (api/routes/evals.py) in this checkout",
)

EVAL_OPERATIONS: list[tuple[str, str, str, type]] = [
    ("post", "/jobs/{job_id}/evals", "201", Eval),
    ("get", "/jobs/{job_id}/evals", "200", EvalList),
    ("get", "/evals/{eval_id}", "200", Eval),
]
SMALL_EVAL = {"limit": 2, "n": 2, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def openapi(service: LiveService) -> dict[str, Any]:
    return httpx.get(f"{service.base_url}/openapi.json", timeout=10).json()


def test_eval_routes_exist_and_agree_with_the_sdk_models(openapi: dict[str, Any]) -> None:
    for method, path, status, model in EVAL_OPERATIONS:
        assert method in openapi["paths"].get(path, {}), f"{method.upper()} {path} is missing"
        assert disagreements(openapi, method, path, status, model) == []


def test_sdk_evaluates_a_finished_job(
    client: Client, done_job: dict[str, Any], tiny_dataset: Path
) -> None:
    job_id = done_job["id"]
    created = client.evals.create(
        job_id, dataset_uri=str(tiny_dataset), include_base=True, **SMALL_EVAL
    )
    assert created.id.startswith("eval_") and created.job_id == job_id
    assert created.status in {"queued", "running", "succeeded"}
    assert created.config["n"] == 2 and created.config["include_base"] is True

    finished = created.wait(timeout=180, poll=0.3)
    assert finished.status == "succeeded" and finished.is_terminal and finished.results
    adapter, base = finished.results.adapter, finished.results.base
    assert adapter is not None and base is not None
    assert 0.0 <= adapter["avg_at_n"] <= 1.0 and adapter["n_problems"] == 2
    assert client.evals.retrieve(created.id).model_dump() == finished.model_dump()
    assert created.id in [e.id for e in client.evals.list(job_id)]

    with pytest.raises(NotFoundError) as missing:
        client.evals.retrieve("eval_nothere")
    assert missing.value.code == "eval_not_found"


def test_async_evals_and_an_eval_of_an_unfinished_job(
    service: LiveService,
    done_job: dict[str, Any],
    tiny_model_dir: Path,
    tiny_dataset: Path,
) -> None:
    async def scenario() -> None:
        async with AsyncClient(base_url=service.base_url, api_key=service.api_key) as client:
            evaluation = await client.evals.create(
                done_job["id"], dataset_uri=str(tiny_dataset), **SMALL_EVAL
            )
            finished = await evaluation.wait(timeout=180, poll=0.3)
            assert finished.status == "succeeded" and finished.results
            assert finished.results.base is None
            assert evaluation.id in [e.id for e in await client.evals.list(done_job["id"])]

            job = await client.jobs.create(
                spec=tiny_body(tiny_model_dir, tiny_dataset), optim={"max_steps": 500}
            )
            await client.jobs.cancel(job.id)
            with pytest.raises(ConflictError) as conflict:
                await client.evals.create(job.id, dataset_uri=str(tiny_dataset))
            assert conflict.value.code == "adapter_not_ready"

    asyncio.run(scenario())


def test_evals_commands(service: LiveService, done_job: dict[str, Any], tiny_dataset: Path) -> None:
    runner = CliRunner()
    env = {"OPSD_BASE_URL": service.base_url, "OPSD_API_KEY": service.api_key}
    job_id = done_job["id"]
    small = ["--limit", "2", "--n", "2", "--max-new-tokens", "8"]
    created = runner.invoke(
        app,
        ["evals", "create", job_id, "--dataset-uri", str(tiny_dataset), *small, "--wait", "--json"],
        env=env,
    )
    assert created.exit_code == EXIT_OK, (created.output, created.stderr)
    evaluation = json.loads(created.stdout)
    assert evaluation["status"] == "succeeded" and evaluation["results"]["adapter"]
    # the sampling progress stays on the eval: 2 problems of 2, adapter only
    progress = evaluation["progress"]
    assert (progress["role"], progress["done"], progress["total"]) == ("adapter", 2, 2)
    assert progress["samples_per_s"] > 0
    seen: list = []
    with Client(base_url=service.base_url, api_key=service.api_key) as client:
        final = client.evals.wait(evaluation["id"], on_update=seen.append)
    assert seen and seen[-1].id == final.id and final.progress.done == 2
    assert final.progress.describe().startswith("evaluating the adapter: 2/2 problems")
    waited_text = runner.invoke(app, ["evals", "wait", evaluation["id"]], env=env)
    assert (
        waited_text.exit_code == EXIT_OK and f"{evaluation['id']}: succeeded" in waited_text.stderr
    )

    shown = runner.invoke(app, ["evals", "show", evaluation["id"]], env=env)
    assert shown.exit_code == EXIT_OK and "avg_at_n" in shown.stdout and "succeeded" in shown.stdout
    waited = runner.invoke(app, ["evals", "wait", evaluation["id"], "--json"], env=env)
    assert json.loads(waited.stdout)["id"] == evaluation["id"]
    listed = runner.invoke(app, ["evals", "list", job_id], env=env)
    assert listed.exit_code == EXIT_OK and evaluation["id"] in listed.stdout

    missing = runner.invoke(app, ["evals", "show", "eval_nothere"], env=env)
    assert missing.exit_code == EXIT_NOT_FOUND
    no_dataset = runner.invoke(app, ["evals", "create", job_id], env=env)
    assert no_dataset.exit_code == EXIT_USAGE and "dataset_uri" in no_dataset.stderr
