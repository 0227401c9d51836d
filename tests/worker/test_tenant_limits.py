"""The worker's side of issue 11 on a real store and the tiny model: the policy at open time,
the per-job wall-time limit, and the cleaning of interrupted checkpoint writes (fault 9)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.worker.helpers import create_job
from worker.runner import clean_interrupted_writes, run_job


def test_a_job_cannot_read_what_its_tenant_may_not(
    store: Any, settings: Any, tiny_spec_dict: Any, tmp_path: Path
) -> None:
    """A spec that reached the store without the API's check (or before a policy change) is
    still refused when the worker opens the data; nothing of the file reaches the job."""
    secret = tmp_path / "other-tenant" / "train.csv"
    secret.parent.mkdir()
    secret.write_text("problem,solution\nTOP SECRET,x\n")
    confined = settings.model_copy(
        update={"dataset_uri_policy": json.dumps({"*": [str(tmp_path / "mine")]})}
    )
    job_id = create_job(store, tiny_spec_dict(dataset_uri=str(secret)))
    assert run_job(job_id, store=store, settings=confined, worker_id="w1") == "failed"
    job = store.get_job(job_id)
    assert (job.error.code, job.error.category) == ("dataset_error", "user")
    assert "not allowed" in job.error.message and "TOP SECRET" not in job.error.message
    assert all("TOP SECRET" not in e.message for e in store.list_events(job_id))


def test_a_base_model_outside_the_policy_is_refused_before_it_is_loaded(
    store: Any, settings: Any, tiny_spec_dict: Any
) -> None:
    hub_only = settings.model_copy(update={"base_model_policy": '{"*": ["Qwen/*"]}'})
    job_id = create_job(store, tiny_spec_dict())
    assert run_job(job_id, store=store, settings=hub_only, worker_id="w1") == "failed"
    error = store.get_job(job_id).error
    assert (error.code, error.category) == ("access_denied", "user")


def test_the_wall_time_limit_stops_a_job_with_a_clear_error(
    store: Any, settings: Any, tiny_spec_dict: Any
) -> None:
    limited = settings.model_copy(update={"max_job_seconds": 0.001})
    job_id = create_job(store, tiny_spec_dict(optim={"max_steps": 50}))
    assert run_job(job_id, store=store, settings=limited, worker_id="w1") == "failed"
    job = store.get_job(job_id)
    assert (job.error.code, job.error.category) == ("time_limit_exceeded", "user")
    assert "0.001 s" in job.error.message and job.progress_step < 50
    checkpoints = store.list_checkpoints(job_id)
    assert checkpoints and checkpoints[-1].step == job.progress_step  # the work is kept


def test_interrupted_checkpoint_writes_are_cleaned_before_a_resume(
    store: Any, settings: Any, tiny_spec_dict: Any
) -> None:
    from worker.artifacts import ArtifactStore

    job_id = create_job(store, tiny_spec_dict(checkpoint_every=1, optim={"max_steps": 2}))
    checkpoints = ArtifactStore(settings.artifacts_uri).run_dir(job_id) / "checkpoints"
    # what a worker killed mid-save leaves: a half-written checkpoint and a half-fetched one
    (checkpoints / ".tmp-step-000001-abcd1234" / "adapter").mkdir(parents=True)
    (checkpoints / ".fetch-step-000001-abcd1234").mkdir()
    assert run_job(job_id, store=store, settings=settings, worker_id="w1") == "succeeded"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000001", "step-000002"]


def test_an_interrupted_replacement_puts_the_last_complete_copy_back(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    (folder / ".old-step-000004-1a2b3c4d").mkdir(parents=True)  # renamed away, then killed
    (folder / ".old-step-000004-1a2b3c4d" / "trainer_state.json").write_text("{}")
    (folder / "step-000002").mkdir()
    (folder / ".old-step-000002-99999999").mkdir()  # its replacement completed
    (folder / ".tmp-step-000006-00000000").mkdir()
    fixed = clean_interrupted_writes(folder)
    assert sorted(fixed) == [
        ".old-step-000002-99999999",
        ".old-step-000004-1a2b3c4d",
        ".tmp-step-000006-00000000",
    ]
    assert sorted(p.name for p in folder.iterdir()) == ["step-000002", "step-000004"]
    assert (folder / "step-000004" / "trainer_state.json").is_file()
