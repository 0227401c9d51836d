"""`worker.preflight.run_preflight` without Celery, on a real store (SQLite and Postgres) and the
real tiny model: the report on the row, `preflight/*` metrics and `preflight_*` events on the job,
a second delivery skipped, and the failures a user can fix (a dataset that is not there, a
dataset outside the tenant's policy) as readable errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jobstore import Store
from worker.preflight import run_preflight

CONFIG = {"sample_size": 3, "samples_per_problem": 1, "profile_rollouts": 2, "max_new_tokens": 6}


def _job(store: Any, spec: dict[str, Any], tenant: str = "acme") -> tuple[str, str]:
    owner = store.get_or_create_tenant(tenant)
    job, _ = store.create_job(owner.id, spec=spec)
    return owner.id, job.id


def test_a_preflight_stores_its_report_metrics_and_events(
    store: Any, settings: Any, tiny_spec_dict: Callable[..., dict[str, Any]]
) -> None:
    tenant_id, job_id = _job(store, tiny_spec_dict(prompts={"student_thinking": False}))
    record = store.create_preflight(tenant_id, job_id, config=CONFIG)
    assert store.latest_preflight(job_id, tenant_id=tenant_id).id == record.id
    assert store.latest_preflight(job_id, tenant_id="other") is None

    outcome = run_preflight(record.id, store=store, settings=settings, worker_id="w1")
    assert outcome == "succeeded"
    done = store.get_preflight(record.id)
    assert done.status == "succeeded" and done.finished_at is not None
    report = done.report
    assert report["n_problems"] == 3 and report["settings"]["max_new_tokens"] == 6
    checks = {c["name"]: c["status"] for c in report["checks"]}
    assert checks["generation_prompt_state"] == "pass"
    assert checks["privileged_gap"] == "warn"  # a random model: no gap
    assert done.progress == {"phase": "profile", "done": 2, "total": 2}

    series = store.query_metrics(job_id)
    assert {"preflight/gap", "preflight/divergence_mean", "preflight/status"} <= series.keys()
    assert series["preflight/check/privileged_gap"] == [(0, 1.0)]  # step 0: before training
    assert series["preflight/gap"] == [(0, 0.0)]

    kinds = [e.kind for e in store.list_events(job_id)]
    assert kinds.count("preflight_started") == 1 and kinds[-1] == "preflight_finished"
    assert kinds.count("preflight_progress") == 3  # student, teacher, profile
    finished = store.list_events(job_id)[-1]
    assert finished.data["status"] == report["status"] and finished.data["gap"] == 0.0
    assert "privileged_gap: warn" in finished.message

    # a duplicate delivery of a finished pre-flight changes nothing
    assert run_preflight(record.id, store=store, settings=settings, worker_id="w2") == "skipped"


def test_user_errors_fail_the_preflight_with_a_readable_error(
    sqlite_database_url: str, tmp_path: Path, tiny_spec_dict: Callable[..., dict[str, Any]]
) -> None:
    from opsd_service.settings import ServiceSettings

    store = Store(sqlite_database_url)
    try:
        settings = ServiceSettings(
            home=tmp_path / "home",
            database_url=sqlite_database_url,
            artifacts_uri=str(tmp_path / "artifacts"),
            dataset_uri_policy=json.dumps({"*": [str(tmp_path / "allowed")]}),
        )
        missing = tiny_spec_dict(dataset_uri=str(tmp_path / "allowed" / "gone.jsonl"))
        tenant_id, job_id = _job(store, missing)
        record = store.create_preflight(tenant_id, job_id, config=CONFIG)
        assert run_preflight(record.id, store=store, settings=settings, worker_id="w") == "failed"
        failed = store.get_preflight(record.id)
        assert failed.error.code == "dataset_error" and failed.error.category == "user"
        assert "gone.jsonl" in failed.error.message
        assert [e.kind for e in store.list_events(job_id)][-1] == "preflight_failed"

        outside = tiny_spec_dict()  # the tiny dataset is not under the allowed root
        tenant_id, job_id = _job(store, outside)
        record = store.create_preflight(tenant_id, job_id, config=CONFIG)
        assert run_preflight(record.id, store=store, settings=settings, worker_id="w") == "failed"
        error = store.get_preflight(record.id).error
        assert (error.code, error.category) == ("dataset_error", "user")
        assert "not allowed" in error.message
    finally:
        store.close()


def test_the_reaper_takes_back_a_lost_preflight_and_resends_a_stale_one(
    store: Any, tiny_spec_dict: Callable[..., dict[str, Any]]
) -> None:
    from datetime import UTC, datetime, timedelta

    tenant_id, job_id = _job(store, tiny_spec_dict())
    lost = store.create_preflight(tenant_id, job_id, config=CONFIG)
    assert store.claim_preflight(lost.id, "dead-worker", lease_seconds=0.01) is not None
    later = datetime.now(UTC) + timedelta(seconds=5)
    assert store.requeue_lost_preflights(now=later) == [lost.id]
    again = store.get_preflight(lost.id)
    assert (again.status, again.attempt) == ("queued", 2)
    # a redelivered message claims it; lost on its last attempt, it fails with worker_lost
    for attempt in (2, 3):
        claimed = store.claim_preflight(lost.id, f"worker-{attempt}", lease_seconds=0.01)
        assert claimed is not None and claimed.attempt == attempt
        requeued = store.requeue_lost_preflights(now=later, max_attempts=3)
        assert requeued == ([lost.id] if attempt < 3 else [])
    final = store.get_preflight(lost.id)
    assert final.status == "failed" and final.error.code == "worker_lost"

    stale = store.create_preflight(tenant_id, job_id, config=CONFIG)
    assert store.resend_stale_queued_preflights(older_than=timedelta(seconds=1)) == []
    assert store.resend_stale_queued_preflights(older_than=timedelta(0), now=later) == [stale.id]
    # marked re-sent: not returned again within the window
    assert store.resend_stale_queued_preflights(older_than=timedelta(seconds=1), now=later) == []


def test_a_job_with_run_first_fails_before_training_on_a_bad_preflight(
    sqlite_database_url: str, tmp_path: Path, tiny_spec_dict: Callable[..., dict[str, Any]]
) -> None:
    from opsd_service.settings import ServiceSettings
    from tests.worker.helpers import create_job
    from worker.runner import run_job

    store = Store(sqlite_database_url)
    try:
        settings = ServiceSettings(
            home=tmp_path / "home",
            database_url=sqlite_database_url,
            artifacts_uri=str(tmp_path / "artifacts"),
        )
        first = {"run_first": True, "stop_on": "warn", "sample_size": 3, "max_new_tokens": 6}
        job_id = create_job(store, tiny_spec_dict(preflight=first))
        assert run_job(job_id, store=store, settings=settings, worker_id="w1") == "failed"
        job = store.get_job(job_id)
        assert (job.error.code, job.error.category) == ("preflight_failed", "user")
        assert "privileged_gap: warn" in job.error.message
        finished = [e for e in store.list_events(job_id) if e.kind == "preflight_finished"]
        assert finished and finished[0].data["report"]["n_problems"] == 3
        metrics = store.query_metrics(job_id)
        assert metrics["preflight/status"] == [(0, 1.0)] and "loss" not in metrics
    finally:
        store.close()
