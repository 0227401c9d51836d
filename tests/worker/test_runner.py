"""The job runner without Celery: real store (SQLite and Postgres), real tiny model on the CPU."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.worker.helpers import create_job, wait_for
from worker.runner import LEASE_LOST, SKIPPED, classify_error, run_job


def _run_in_thread(**kwargs: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["result"] = run_job(**kwargs)
        except BaseException as exc:  # surfaced by the test
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def _join(thread: threading.Thread, out: dict[str, Any], timeout: float = 120) -> str:
    thread.join(timeout)
    assert not thread.is_alive(), "run_job did not return"
    if "error" in out:
        raise out["error"]
    return out["result"]


def test_job_succeeds_with_metrics_events_checkpoints_and_adapter(
    store: Any, settings: Any, tiny_spec_dict: Any, tiny_model_dir: Path
) -> None:
    job_id = create_job(store, tiny_spec_dict(checkpoint_every=2))

    assert run_job(job_id, store=store, settings=settings, worker_id="w1") == "succeeded"

    job = store.get_job(job_id)
    assert job.status == "succeeded"
    assert (job.progress_step, job.total_steps) == (3, 3)
    assert job.error is None and job.lease_expires_at is None
    metrics = store.query_metrics(job_id)
    assert [step for step, _ in metrics["loss"]] == [1, 2, 3]
    assert {"divergence", "lr", "generated_tokens", "time_step_s"} <= set(metrics)
    kinds = [event.kind for event in store.list_events(job_id)]
    for kind in ("queued", "running", "started", "checkpoint", "finished", "succeeded"):
        assert kind in kinds, kinds
    started = next(e for e in store.list_events(job_id) if e.kind == "started")
    assert started.data["total_steps"] == 3 and "spec" not in started.data

    checkpoints = store.list_checkpoints(job_id)
    assert [c.step for c in checkpoints] == [2, 3]
    for checkpoint in checkpoints:
        assert (Path(checkpoint.uri) / "adapter" / "adapter_config.json").is_file()
        assert (Path(checkpoint.uri) / "trainer_state.json").is_file()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, job.adapter_uri)
    assert any("lora_A" in name for name, _ in model.named_parameters())

    # A second delivery of the same message is harmless.
    assert run_job(job_id, store=store, settings=settings, worker_id="w2") == SKIPPED
    assert store.get_job(job_id).status == "succeeded"


def test_bad_dataset_field_fails_as_a_user_error(
    store: Any, settings: Any, tiny_spec_dict: Any
) -> None:
    spec = tiny_spec_dict()
    spec["dataset"]["problem_field"] = "question"  # the tiny dataset has "problem"
    job_id = create_job(store, spec)

    assert run_job(job_id, store=store, settings=settings, worker_id="w1") == "failed"

    job = store.get_job(job_id)
    assert job.error.code == "dataset_error" and job.error.category == "user"
    assert "question" in job.error.message


def test_missing_model_fails_with_model_load_error(
    store: Any, settings: Any, tiny_spec_dict: Any, tmp_path: Path
) -> None:
    job_id = create_job(store, tiny_spec_dict(base_model=str(tmp_path / "no-such-model")))

    assert run_job(job_id, store=store, settings=settings, worker_id="w1") == "failed"

    job = store.get_job(job_id)
    assert job.error.code == "model_load_error" and job.error.category == "user"
    assert "no-such-model" in job.error.message


def test_invalid_stored_spec_fails_naming_the_field(store: Any, settings: Any) -> None:
    job_id = create_job(store, {"base_model": "x", "optim": {"learning_rate": -1}})

    assert run_job(job_id, store=store, settings=settings, worker_id="w1") == "failed"

    error = store.get_job(job_id).error
    assert error.code == "invalid_spec" and error.category == "user"
    assert "dataset_uri" in error.message and "optim.learning_rate" in error.message


def test_cancel_while_running_keeps_a_checkpoint(
    store: Any, settings: Any, tiny_spec_dict: Any
) -> None:
    job_id = create_job(store, tiny_spec_dict(optim={"max_steps": 40}))
    thread, out = _run_in_thread(job_id=job_id, store=store, settings=settings, worker_id="w1")

    wait_for(lambda: store.query_metrics(job_id, names=["loss"]), timeout=60, what="metrics")
    assert store.request_cancel(job_id).status == "cancelling"

    assert _join(thread, out) == "cancelled"
    job = store.get_job(job_id)
    assert job.status == "cancelled" and job.progress_step < 40
    checkpoints = store.list_checkpoints(job_id)
    assert checkpoints and checkpoints[-1].step == job.progress_step
    assert (Path(checkpoints[-1].uri) / "adapter").is_dir()
    assert job.adapter_uri is None


def test_worker_shutdown_releases_the_job_as_the_same_attempt(
    sqlite_database_url: str, tiny_spec_dict: Any, tmp_path: Path
) -> None:
    from jobstore import Store
    from opsd_service.settings import ServiceSettings
    from worker import runner

    store = Store(sqlite_database_url)
    settings = ServiceSettings(
        home=tmp_path, database_url=sqlite_database_url, artifacts_uri=str(tmp_path / "a")
    )
    job_id = create_job(store, tiny_spec_dict(optim={"max_steps": 12}))
    thread, out = _run_in_thread(job_id=job_id, store=store, settings=settings, worker_id="w1")
    wait_for(lambda: store.query_metrics(job_id, names=["loss"]), timeout=60, what="metrics")
    try:
        runner.request_shutdown()  # what the worker's SIGTERM handler does
        assert _join(thread, out) == runner.RELEASED
    finally:
        runner._shutdown.clear()  # the flag is process-wide; later tests run jobs too

    job = store.get_job(job_id)
    assert (job.status, job.attempt, job.lease_owner) == ("queued", 1, None)
    assert store.list_checkpoints(job_id)[-1].step == job.progress_step
    kinds = [e.kind for e in store.list_events(job_id)]
    assert kinds[-2:] == ["interrupted", "released"] and "cancelled" not in kinds

    # another worker resumes it from the checkpoint, as the same attempt, to the end
    assert runner.run_job(job_id, store=store, settings=settings, worker_id="w2") == "succeeded"
    job = store.get_job(job_id)
    assert (job.status, job.attempt) == ("succeeded", 1)
    steps = [s for s, _ in store.query_metrics(job_id, names=["loss"])["loss"]]
    assert steps == list(range(1, 13))
    store.close()


def test_duplicate_delivery_of_a_cancelled_job_is_skipped(store: Any, settings: Any) -> None:
    job_id = create_job(store, {"base_model": "x", "dataset_uri": "y"})
    store.request_cancel(job_id)

    assert run_job(job_id, store=store, settings=settings, worker_id="w1") == SKIPPED
    assert store.get_job(job_id).status == "cancelled"


def test_lease_lost_stops_without_terminal_state_then_resumes_elsewhere(
    sqlite_database_url: str, tiny_spec_dict: Any, tmp_path: Path
) -> None:
    """Artifacts on a remote (fsspec memory://) root: the second run is on 'another machine'."""
    from datetime import UTC, datetime, timedelta

    from jobstore import Store
    from opsd_service.settings import ServiceSettings

    store = Store(sqlite_database_url)
    remote = f"memory://opsd-tests/{uuid.uuid4().hex}"

    def machine(name: str) -> Any:
        return ServiceSettings(
            home=tmp_path / name,
            database_url=sqlite_database_url,
            artifacts_uri=remote,
            lease_seconds=5.0,
            heartbeat_seconds=0.2,
        )

    job_id = create_job(store, tiny_spec_dict(checkpoint_every=2, optim={"max_steps": 12}))
    thread, out = _run_in_thread(job_id=job_id, store=store, settings=machine("a"), worker_id="a")
    wait_for(lambda: store.list_checkpoints(job_id), timeout=60, what="a checkpoint")
    # The lease is taken away (as if this worker had stalled past it): the reaper requeues.
    later = datetime.now(UTC) + timedelta(hours=1)
    assert store.requeue_expired(now=later) == [job_id]

    assert _join(thread, out) == LEASE_LOST
    job = store.get_job(job_id)
    assert (job.status, job.attempt, job.lease_owner) == ("queued", 2, None)
    assert job.finished_at is None and job.error is None
    kinds = [e.kind for e in store.list_events(job_id)]
    assert not {"failed", "cancelled", "succeeded"} & set(kinds)
    recorded = store.list_checkpoints(job_id)
    assert all(c.uri.startswith("memory://") for c in recorded)

    time.sleep(0.3)  # the first run's heartbeat thread has stopped
    assert run_job(job_id, store=store, settings=machine("b"), worker_id="b") == "succeeded"

    job = store.get_job(job_id)
    assert job.status == "succeeded" and job.adapter_uri.startswith("memory://")
    resumed = [e for e in store.list_events(job_id) if e.kind == "resumed"]
    assert resumed and resumed[0].data["step"] >= recorded[-1].step
    assert [s for s, _ in store.query_metrics(job_id)["loss"]] == list(range(1, 13))

    import fsspec

    fs, path = fsspec.core.url_to_fs(job.adapter_uri)
    assert fs.exists(f"{path}/adapter_config.json")
    assert not (tmp_path / "b" / "runs" / "jobs" / job_id).exists()  # scratch removed
    assert (tmp_path / "a" / "runs" / "jobs" / job_id).is_dir()  # machine a never finished
    store.close()


@pytest.mark.parametrize(
    ("exc", "code", "category"),
    [
        (RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), "out_of_memory", "user"),
        (RuntimeError("boom"), "internal_error", "system"),
        (KeyError("x"), "internal_error", "system"),
    ],
)
def test_classify_error(exc: Exception, code: str, category: str) -> None:
    error = classify_error(exc)
    assert (error.code, error.category) == (code, category)
    if code == "out_of_memory":
        assert "optim.batch_size" in error.message and "max_new_tokens" in error.message
        assert "gradient_checkpointing" in error.message
    else:  # a system error: a code and an error id, the exception only in the log
        assert "err_" in error.message and str(exc) not in error.message


def test_classify_torch_oom_and_engine_errors() -> None:
    import torch

    from opsd_engine.config import SpecError
    from opsd_engine.data import DatasetError
    from opsd_engine.modeling import ModelLoadError

    assert classify_error(torch.OutOfMemoryError("CUDA OOM")).code == "out_of_memory"
    assert classify_error(SpecError([("beta", "too big")])).code == "invalid_spec"
    assert classify_error(ModelLoadError("cannot load")).code == "model_load_error"
    error = classify_error(DatasetError("data.jsonl", "missing field", field="question"))
    assert (error.code, error.category) == ("dataset_error", "user")
