"""`worker.evals.run_eval` without Celery, on a real store and a trained tiny adapter: in-process
(no inference server) with the base model alongside, over HTTP against a real adapter server
(a checkpoint's adapter, loaded under `<job>-step<N>`), and the failures users can fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from jobstore import Store
from jobstore.migrate import upgrade
from tests.conftest import make_tiny_spec
from tests.evals.helpers import serve_in_thread, trained_adapter, write_benchmark
from tests.service_fixtures import sqlite_url
from worker.evals import run_eval


@pytest.fixture(scope="module")
def adapter_dir(
    tiny_model_dir: Path, tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return trained_adapter(tiny_model_dir, tiny_dataset, tmp_path_factory.mktemp("adapter"))


@pytest.fixture
def store(tmp_path: Path) -> Any:
    url = sqlite_url(tmp_path / "opsd.db")
    upgrade(url)
    instance = Store(url)
    yield instance
    instance.close()


def _settings(tmp_path: Path, store: Store, inference_url: str | None = None) -> Any:
    from opsd_service.settings import ServiceSettings

    return ServiceSettings(
        home=tmp_path / "home",
        database_url=str(store.engine.url),
        artifacts_uri=str(tmp_path / "artifacts"),
        inference_url=inference_url,
    )


def _finished_job(store: Store, model: Path, data: Path, adapter: Path) -> tuple[str, str]:
    from opsd_engine.config import spec_to_dict

    tenant = store.get_or_create_tenant("acme")
    job, _ = store.create_job(tenant.id, spec=spec_to_dict(make_tiny_spec(model, data)))
    store.claim_job(job.id, "trainer", lease_seconds=60)
    store.update_progress(job.id, "trainer", step=3, total_steps=3)
    store.add_checkpoint(job.id, 3, str(adapter.parent / "checkpoints" / "step-000003"))
    assert store.finish_job(job.id, "trainer", adapter_uri=str(adapter))
    return tenant.id, job.id


def _config(bench: Path, **overrides: Any) -> dict[str, Any]:
    config = {
        "dataset_uri": str(bench),
        "problem_field": "problem",
        "answer_field": "answer",
        "limit": None,
        "n": 2,
        "max_new_tokens": 6,
        "temperature": 0.6,
        "top_p": 0.95,
        "top_k": 0,
        "thinking": None,
        "include_base": False,
        "checkpoint_step": None,
    }
    return {**config, **overrides}


def _check_summary(summary: dict[str, Any], problems: int, n: int) -> None:
    assert (summary["n_problems"], summary["n_samples"]) == (problems, n)
    assert set(summary["pass_at_k"]) == {str(k) for k in range(1, n + 1)}
    assert len(summary["problems"]) == problems
    for row in summary["problems"]:
        assert row["problem"] and row["answer"]
        assert [s["index"] for s in row["samples"]] == list(range(n))
        assert sum(s["correct"] for s in row["samples"]) == row["c"]
        assert all(len(s["text"]) <= 2000 and "extracted" in s for s in row["samples"])


def test_in_process_eval_with_the_base_model(
    store: Store, tmp_path: Path, tiny_model_dir: Path, tiny_dataset: Path, adapter_dir: Path
) -> None:
    tenant_id, job_id = _finished_job(store, tiny_model_dir, tiny_dataset, adapter_dir)
    bench = write_benchmark(tmp_path / "bench.jsonl", n=3, solution_only=1)
    record = store.create_eval(tenant_id, job_id, config=_config(bench, include_base=True))
    settings = _settings(tmp_path, store)
    assert run_eval(record.id, store=store, settings=settings, worker_id="w") == "succeeded"
    done = store.get_eval(record.id)
    assert done.status == "succeeded" and done.error is None and done.finished_at
    results = done.results
    assert (results["backend"], results["step"], results["adapter_uri"]) == (
        "in_process",
        3,
        str(adapter_dir),
    )
    _check_summary(results["adapter"], 3, 2)
    _check_summary(results["base"], 3, 2)
    assert (
        results["adapter"]["problems"][2]["answer"]
        == json.loads(bench.read_text().splitlines()[2])["solution"]
        .rsplit("\\boxed{", 1)[1]
        .split("}")[0]
    )
    # a duplicate delivery of the same message finds nothing to do
    assert run_eval(record.id, store=store, settings=settings, worker_id="w2") == "skipped"


def test_http_eval_of_a_checkpoint_through_the_adapter_server(
    store: Store, tmp_path: Path, tiny_model_dir: Path, tiny_dataset: Path, adapter_dir: Path
) -> None:
    from adapter_server.app import create_app
    from adapter_server.engine import AdapterEngine
    from worker.inference_client import InferenceClient

    tenant_id, job_id = _finished_job(store, tiny_model_dir, tiny_dataset, adapter_dir)
    bench = write_benchmark(tmp_path / "bench.jsonl", n=2)
    config = _config(bench, n=3, checkpoint_step=3, include_base=True, thinking=False)
    record = store.create_eval(tenant_id, job_id, config=config)
    engine = AdapterEngine(str(tiny_model_dir), device="cpu", dtype="float32")
    with serve_in_thread(create_app(engine, allow_runtime_lora=True)) as url:
        settings = _settings(tmp_path, store, inference_url=url)
        assert run_eval(record.id, store=store, settings=settings, worker_id="w") == "succeeded"
        with InferenceClient(url) as client:
            assert f"{job_id}-step3" in client.model_ids()
        # a second eval of the same adapter reuses the loaded name
        again = store.create_eval(tenant_id, job_id, config=config)
        assert run_eval(again.id, store=store, settings=settings, worker_id="w") == "succeeded"
    results = store.get_eval(record.id).results
    assert results["backend"] == "http" and results["step"] == 3
    assert results["adapter_uri"].endswith("checkpoints/step-000003/adapter")
    _check_summary(results["adapter"], 2, 3)
    _check_summary(results["base"], 2, 3)
    samples = [s for row in results["adapter"]["problems"] for s in row["samples"]]
    assert all(0 < s["num_tokens"] <= 8 for s in samples if s["text"])


def test_user_errors_fail_the_eval_with_a_readable_message(
    store: Store, tmp_path: Path, tiny_model_dir: Path, tiny_dataset: Path, adapter_dir: Path
) -> None:
    tenant_id, job_id = _finished_job(store, tiny_model_dir, tiny_dataset, adapter_dir)
    settings = _settings(tmp_path, store)
    no_answers = tmp_path / "no_answers.jsonl"
    no_answers.write_text('{"problem": "1+1?"}\n{"problem": "2+2?", "answer": "4"}\n')
    cases = [
        (_config(no_answers), "dataset_error", "row index 0"),
        (_config(tmp_path / "missing.jsonl"), "dataset_error", "not found"),
        (_config(no_answers, checkpoint_step=9), "checkpoint_not_found", "step 9"),
    ]
    for config, code, words in cases:
        record = store.create_eval(tenant_id, job_id, config=config)
        assert run_eval(record.id, store=store, settings=settings, worker_id="w") == "failed"
        failed = store.get_eval(record.id)
        assert failed.error.code == code and failed.error.category == "user"
        assert words in failed.error.message
