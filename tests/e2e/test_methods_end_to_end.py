"""SFT and GRPO jobs through the whole service (embedded `opsd up`, HTTP), on the tiny model.

The same job spec as OPSD with another `method`: each job goes queued -> running -> succeeded,
reports its method's metrics (and the shared token accounting) through `GET /jobs/{id}/metrics`,
and publishes an adapter that peft loads.
"""

from __future__ import annotations

import io
import json
import re
import socket
import tarfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import make_tiny_spec
from tests.worker.helpers import ServiceProcess, service_env, wait_for


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, Any]]:
    root = tmp_path_factory.mktemp("methods")
    port = _free_port()
    up = ServiceProcess(
        ["up", "--home", str(root / "home"), "--host", "127.0.0.1", "--port", str(port)],
        service_env(),
        root / "up.log",
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        key = wait_for(
            lambda: re.search(r"\bopsd_[A-Za-z0-9]+_[A-Za-z0-9_\-]+", up.output()),
            timeout=90,
            what="the API key",
        ).group(0)

        def ready() -> bool:
            assert up.process.poll() is None, f"opsd up exited:\n{up.tail()}"
            try:
                return httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout=90, interval=0.3, what="the API to be ready")
        client = httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )
        yield client, up
        client.close()
    finally:
        assert up.stop() == 0, up.tail()


METHOD_METRICS = {
    "sft": {"loss", "nll", "token_accuracy", "train_tokens", "train_tokens_total"},
    "grpo": {
        "loss",
        "reward_mean",
        "reward_std",
        "zero_variance_group_frac",
        "completion_len_mean",
        "completion_len_max",
        "clip_frac",
    },
}


@pytest.mark.parametrize("method", ["sft", "grpo"])
def test_method_job_runs_to_success_through_the_service(
    service: tuple[httpx.Client, Any],
    method: str,
    tiny_model_dir: Path,
    tiny_dataset: Path,
    tmp_path: Path,
) -> None:
    from opsd_engine.config import spec_to_dict

    http, up = service
    overrides: dict[str, Any] = {"method": method, "optim": {"max_steps": 3}}
    if method == "grpo":
        overrides["generation"] = {"num_generations": 4}
    body = spec_to_dict(make_tiny_spec(tiny_model_dir, tiny_dataset, **overrides))
    created = http.post("/jobs", json=body)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]

    def finished() -> dict[str, Any] | None:
        assert up.process.poll() is None, f"opsd up exited:\n{up.tail()}"
        job = http.get(f"/jobs/{job_id}").json()
        return job if job["status"] in {"succeeded", "failed", "cancelled"} else None

    job = wait_for(finished, timeout=180, interval=0.25, what=f"the {method} job to finish")
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"] == {"step": 3, "total_steps": 3, "eval": None}

    metrics = http.get(f"/jobs/{job_id}/metrics").json()["metrics"]
    names = METHOD_METRICS[method] | {"grad_norm", "lr", "generated_tokens"}
    names |= {"generated_tokens_total", "time_step_s", "time_device_s", "student_scored_tokens"}
    assert names <= metrics.keys(), sorted(metrics)
    assert metrics["loss"]["steps"] == [1, 2, 3]
    tokens = metrics["generated_tokens"]["values"]
    total = metrics["generated_tokens_total"]["values"]
    assert total == [sum(tokens[: i + 1]) for i in range(len(tokens))]
    if method == "sft":
        assert total[-1] == 0  # SFT samples nothing
    else:
        assert tokens[0] >= 2 * 2 * 4  # batch 2 x accumulation 2 x 4 completions, >= 1 token

    # the job's usage is the sum of its per-step metrics, whatever the method
    (usage,) = [j for j in http.get("/usage").json()["jobs"] if j["job_id"] == job_id]
    assert usage["steps"] == 3 and usage["generated_tokens"] == total[-1]
    scored = sum(metrics["student_scored_tokens"]["values"])
    assert usage["student_scored_tokens"] == scored > 0
    assert usage["device_seconds"] == pytest.approx(sum(metrics["time_device_s"]["values"]))

    archive = http.get(f"/jobs/{job_id}/adapter")
    assert archive.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        tar.extractall(tmp_path, filter="data")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_official_recipe_job_runs_end_to_end_with_its_usage(
    service: tuple[httpx.Client, Any], tiny_model_dir: Path, tiny_dataset: Path
) -> None:
    """`recipe: official-2026-04` through the SDK and the API on the tiny task: the recipe's
    values reach the stored spec (forward KL, the per-vocabulary clip, lr, grad-norm clip,
    sampling, thinking off), explicit fields (shapes small enough for the CPU) override it, and
    the job trains to success reporting the clip's activity. Its usage (`GET /usage`, the SDK and
    `opsd usage`) adds up to its per-step metrics; bad ranges are 422s."""
    from opsd_client import Client

    http, up = service
    key = http.headers["Authorization"].split()[1]
    with Client(base_url=str(http.base_url), api_key=key) as client:
        job = client.jobs.create(
            base_model=str(tiny_model_dir),
            dataset_uri=str(tiny_dataset),
            recipe="official-2026-04",
            max_new_tokens=8,
            lora={"r": 4, "alpha": 8, "dropout": 0.0},
            optim={"batch_size": 2, "grad_accum": 1, "max_steps": 2, "warmup_ratio": 0.0},
            runtime={"dtype": "float32", "device": "cpu", "gradient_checkpointing": False},
            extra_body={
                "eval": {
                    "dataset_uri": str(tiny_dataset),
                    "limit": 2,
                    "n": 1,
                    "max_new_tokens": 4,
                    "every_steps": 1,
                }
            },
        )
        spec = job.spec
        assert spec["recipe"] == "official-2026-04"
        assert (spec["divergence"], spec["beta"]) == ("jsd", 0.0)
        assert spec["loss"]["vocab_clip"] == 0.05
        assert spec["optim"]["learning_rate"] == 5e-6 and spec["optim"]["max_grad_norm"] == 0.1
        assert spec["optim"]["max_steps"] == 2 and spec["max_new_tokens"] == 8
        assert spec["generation"] == {
            "temperature": 1.1,
            "top_p": 0.95,
            "top_k": 20,
            "num_generations": 1,
        }
        assert spec["prompts"]["student_thinking"] is False
        assert spec["teacher"] == "initial"

        def finished() -> dict[str, Any] | None:
            assert up.process.poll() is None, f"opsd up exited:\n{up.tail()}"
            current = http.get(f"/jobs/{job.id}").json()
            return current if current["status"] in {"succeeded", "failed", "cancelled"} else None

        done = wait_for(finished, timeout=180, interval=0.25, what="the recipe job to finish")
        assert done["status"] == "succeeded", done["error"]
        metrics = client.jobs.metrics(job.id).metrics
        assert metrics["loss"].steps == [1, 2]
        assert {"vocab_clip_frac", "vocab_clip_token_frac"} <= metrics.keys()
        assert all(0.0 <= v <= 1.0 for v in metrics["vocab_clip_frac"].values)

        # Usage: the job's ledger adds up to its per-step metrics.
        def total(name: str) -> float:
            return sum(metrics[name].values) if name in metrics else 0.0

        now = datetime.now(UTC)
        report = client.usage.retrieve(start=now - timedelta(hours=1), end=now + timedelta(1))
        (mine,) = [j for j in report.jobs if j.job_id == job.id]
        assert mine.steps == 2
        assert mine.generated_tokens == total("generated_tokens") > 0
        assert mine.teacher_scored_tokens == total("teacher_scored_tokens")
        assert mine.student_scored_tokens == total("student_scored_tokens")
        # the teacher's prompt holds the reference solution: it scores more than the student
        assert mine.teacher_scored_tokens > mine.student_scored_tokens > mine.generated_tokens
        assert mine.eval_tokens == total("eval_tokens") > 0  # evals at steps 1 and 2
        device = total("time_device_s") + total("time_eval_device_s")
        assert mine.device_seconds == pytest.approx(device, rel=1e-9)
        assert report.totals.generated_tokens == sum(j.generated_tokens for j in report.jobs)
        # a range that ends before the job ran holds none of it
        before = client.usage.retrieve(end=now - timedelta(hours=2))
        assert job.id not in {j.job_id for j in before.jobs}

    # bad ranges are 422s naming the parameter
    for params, param in (
        ({"start": "2026-11-02T00:00:00Z", "end": "2026-11-01T00:00:00Z"}, "start"),
        ({"start": "2025-01-01T00:00:00Z", "end": "2026-11-01T00:00:00Z"}, "end"),
        ({"start": "yesterday"}, "start"),
        ({"end": "0001-01-01T00:00:00"}, "start"),
    ):
        response = http.get("/usage", params=params)
        assert response.status_code == 422, (params, response.text)
        assert response.json()["error"]["param"] == param, response.text

    # the CLI prints the same numbers
    from typer.testing import CliRunner

    from opsd_cli import app

    env = {"OPSD_BASE_URL": str(http.base_url), "OPSD_API_KEY": key}
    shown = CliRunner().invoke(app, ["usage", "--json"], env=env)
    assert shown.exit_code == 0, shown.output
    printed = json.loads(shown.stdout)
    assert {j["job_id"]: j["generated_tokens"] for j in printed["jobs"]}[job.id] == total(
        "generated_tokens"
    )
    table = CliRunner().invoke(app, ["usage"], env=env)
    assert table.exit_code == 0 and job.id in table.stdout and "total" in table.stdout
