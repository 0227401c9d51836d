"""Checkpoint retention through the worker (the store's checkpoint list stays true, local and
remote roots), and what a running job reports while its spec's `eval` group evaluates."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.worker.helpers import create_job
from worker.runner import run_job


@pytest.mark.parametrize("root", ["local", "memory"])
def test_keep_last_removes_old_checkpoints_from_disk_store_and_artifacts(
    store: Any, settings: Any, tiny_spec_dict: Any, root: str
) -> None:
    import fsspec

    if root == "memory":  # a remote root (fsspec's in-memory filesystem): published copies
        settings = settings.model_copy(
            update={"artifacts_uri": f"memory://opsd-test-{uuid.uuid4().hex[:8]}"}
        )
    spec = tiny_spec_dict(checkpoint_every=1, checkpoint={"keep_last": 1})
    job_id = create_job(store, spec)
    assert run_job(job_id, store=store, settings=settings, worker_id="w1") == "succeeded"

    # 3 steps, a checkpoint after each: the newest periodic one (2) plus the final one (3)
    recorded = store.list_checkpoints(job_id)
    assert [c.step for c in recorded] == [2, 3]
    fs, _ = fsspec.core.url_to_fs(settings.artifacts_uri)
    for checkpoint in recorded:
        assert fs.exists(f"{checkpoint.uri}/trainer_state.json")
    published = f"{settings.artifacts_uri}/jobs/{job_id}/checkpoints"
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(published, detail=False))
    assert names == ["step-000002", "step-000003"]
    removed = [e for e in store.list_events(job_id) if e.kind == "checkpoint_removed"]
    assert [e.data["step"] for e in removed] == [1]


def test_job_activity_says_what_the_running_job_evaluates(
    store: Any, settings: Any, tiny_spec_dict: Any
) -> None:
    from api.schemas import job_out
    from worker.artifacts import ArtifactStore
    from worker.runner import LeaseKeeper, StoreCallbacks

    job_id = create_job(store, tiny_spec_dict())
    assert store.claim_job(job_id, "w1", lease_seconds=60) is not None
    lease = LeaseKeeper(store, job_id, "w1", lease_seconds=60, interval=30, status="running")
    callbacks = StoreCallbacks(store, ArtifactStore(settings.artifacts_uri), job_id, "w1", lease)

    callbacks.on_event(
        "eval_started", "evaluating", {"step": 10, "role": "adapter", "done": 0, "total": 128}
    )
    shown = job_out(store.get_job(job_id)).progress.eval
    assert shown is not None and (shown.role, shown.step, shown.done, shown.total) == (
        "adapter",
        10,
        0,
        128,
    )
    progress = {"step": 10, "role": "adapter", "done": 40, "total": 128, "samples": 320}
    callbacks.on_event(
        "eval_progress", "evaluating", {**progress, "seconds": 25.0, "samples_per_s": 12.8}
    )
    shown = job_out(store.get_job(job_id)).progress.eval
    assert (shown.done, shown.samples_per_s) == (40, 12.8)
    callbacks.on_event("eval_finished", "evaluated", {"step": 10, "role": "adapter"})
    assert job_out(store.get_job(job_id)).progress.eval is None
    kinds = [e.kind for e in store.list_events(job_id)]
    assert kinds[-3:] == ["eval_started", "eval_progress", "eval_finished"]


def test_a_training_eval_reports_started_progress_and_finished_events(
    store: Any, settings: Any, tiny_spec_dict: Any, tiny_dataset: Path
) -> None:
    spec = tiny_spec_dict(
        eval={
            "dataset_uri": str(tiny_dataset),
            "limit": 3,
            "n": 2,
            "max_new_tokens": 4,
            "include_base": True,
        }
    )
    job_id = create_job(store, spec)
    assert run_job(job_id, store=store, settings=settings, worker_id="w1") == "succeeded"
    events = [e for e in store.list_events(job_id) if e.kind.startswith("eval_")]
    # the base at step 0, then the student at the end (step 3)
    starts = [
        (e.data["role"], e.data["step"], e.data["total"])
        for e in events
        if e.kind == "eval_started"
    ]
    assert starts == [("base", 0, 3), ("adapter", 3, 3)]
    for role in ("base", "adapter"):
        last = [e for e in events if e.kind == "eval_progress" and e.data["role"] == role][-1]
        assert (last.data["done"], last.data["total"], last.data["samples"]) == (3, 3, 6)
        assert last.data["samples_per_s"] > 0
    assert [e.kind for e in events][-1] == "eval_finished"
    assert store.get_job(job_id).activity is None
