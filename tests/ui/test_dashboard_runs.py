"""The dashboard in a real headless Chromium: comparing runs (a metric overlaid, held-out accuracy
against generated tokens), a failed job's empty charts, a running eval's progress, and the
sign-in card. Jobs are made in the service's own store (a tenant of their own) and given metrics
the way a worker records them (claim, record, finish or fail), so no training is needed."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.opsd_client.service import LiveService
from tests.ui.test_dashboard import _open

SPEC = {"base_model": "Qwen/Qwen3-4B", "dataset_uri": "/data/train.jsonl"}


@pytest.fixture
def tenant(service: LiveService) -> Iterator[tuple[str, Any]]:
    from jobstore import Store

    store = Store(f"sqlite:///{service.home / 'opsd.db'}")
    key = store.create_api_key(f"ui-runs-{uuid.uuid4().hex[:6]}")
    yield key, store
    store.close()


def _job(store: Any, key: str, status: str, rows: dict[int, dict[str, float]]) -> str:
    tenant = store.authenticate(key)
    job, _ = store.create_job(tenant.id, spec=SPEC)
    assert store.claim_job(job.id, "ui-test", lease_seconds=600) is not None
    for step, metrics in sorted(rows.items()):
        store.record_metrics(job.id, step, metrics)
    if status == "succeeded":
        assert store.finish_job(job.id, "ui-test", adapter_uri="/nowhere")
    elif status == "failed":
        from jobstore import JobError

        assert store.fail_job(job.id, error=JobError("dataset_error", "no such file", "user"))
    return job.id


def _sign_in(page: Any, key: str) -> None:
    page.wait_for_selector("#login", state="visible")
    page.fill("#key-input", key)
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#app", state="visible")


def test_compare_overlays_a_metric_and_accuracy_against_generated_tokens(
    browser: Any, service: LiveService, tenant: tuple[str, Any]
) -> None:
    key, store = tenant
    runs = {}
    for name, (tokens, accuracy) in {"a": (100, 0.5), "b": (250, 0.75)}.items():
        rows = {
            0: {"eval/avg@2": 0.25},
            1: {"loss": 1.0, "generated_tokens_total": float(tokens)},
            2: {"loss": 0.5, "generated_tokens_total": float(2 * tokens), "eval/avg@2": accuracy},
        }
        runs[name] = _job(store, key, "succeeded", rows)
    context, page, watch = _open(browser, service, f"{service.base_url}/ui")
    try:
        _sign_in(page, key)
        for job_id in runs.values():
            page.check(f'.compare-box[data-id="{job_id}"]')
        page.wait_for_selector("#compare-open:not([hidden])")
        page.click("#compare-open")
        page.wait_for_selector("#compare:not([hidden])")
        page.wait_for_function("document.getElementById('chart-compare').data?.length === 2")
        overlay = page.evaluate(
            "document.getElementById('chart-compare').data.map(t => [t.name, t.x, t.y])"
        )
        assert sorted(overlay) == sorted(
            [[runs["a"], [1, 2], [1, 0.5]], [runs["b"], [1, 2], [1, 0.5]]]
        )
        assert page.input_value("#compare-metric") == "loss"
        figure3 = page.evaluate(
            "document.getElementById('chart-compare-tokens').data.map(t => [t.x, t.y])"
        )
        assert sorted(figure3) == [[[0, 200], [0.25, 0.5]], [[0, 500], [0.25, 0.75]]]
        assert watch.errors == [] and watch.foreign_requests() == []
    finally:
        context.close()


def test_a_failed_job_says_it_recorded_no_metrics(
    browser: Any, service: LiveService, tenant: tuple[str, Any]
) -> None:
    key, store = tenant
    job_id = _job(store, key, "failed", {})
    context, page, _ = _open(browser, service, f"{service.base_url}/ui#job={job_id}")
    try:
        _sign_in(page, key)
        page.wait_for_selector("#job-status.s-failed")
        page.wait_for_selector("#charts-empty:not([hidden])")
        text = page.inner_text("#charts-empty")
        assert "failed before recording any metrics" in text and "No metrics yet" not in text
    finally:
        context.close()


def test_the_sign_in_card_says_where_opsd_up_saves_the_key(service: LiveService) -> None:
    import httpx

    page = httpx.get(f"{service.base_url}/ui", timeout=30).text
    card = page[page.index('id="key-form"') : page.index("</form>")]
    assert "--home" in card and "$OPSD_HOME" in card and "opsd keys create" in card


def test_the_job_view_shows_the_preflight_report_with_badges(
    browser: Any, service: LiveService, tenant: tuple[str, Any]
) -> None:
    """A pre-flight's report as the worker stores it (the engine's `to_dict()` shape): the
    verdict badge, the gap summary and one row per check with its badge and fix."""
    key, store = tenant
    job_id = _job(store, key, "succeeded", {0: {"preflight/gap": 0.05}})
    owner = store.authenticate(key)
    record = store.create_preflight(owner.id, job_id, config={"sample_size": 16})
    assert store.claim_preflight(record.id, "ui-test") is not None
    checks = [
        ("generation_prompt_state", "fail", "student prompt ends '<think>…'", "leave it unset"),
        ("rollout_tokenization", "pass", "4 rollouts tokenize identically", None),
        ("teacher_first_tokens", "pass", "teacher entropy 2.1 nats", None),
        ("privileged_gap", "warn", "gap too small for self-distillation to help", "harder data"),
    ]
    report = {
        "status": "fail",
        "checks": [
            {"name": n, "status": s, "message": m, "fix": f, "details": {}} for n, s, m, f in checks
        ],
        "n_problems": 16,
        "samples_per_problem": 1,
        "student_accuracy": 0.375,
        "teacher_accuracy": 0.4375,
        "gap": 0.0625,
        "divergence": "jsd",
        "divergence_profile": [0.5, 0.25],
        "profile_counts": [4, 4],
    }
    assert store.finish_preflight(record.id, report=report, worker_id="ui-test")
    context, page, watch = _open(browser, service, f"{service.base_url}/ui#job={job_id}")
    try:
        _sign_in(page, key)
        page.wait_for_selector("#preflight-section:not([hidden])")
        page.wait_for_selector("#preflight-status.s-fail")
        summary = page.inner_text("#preflight-summary")
        assert "37.5%" in summary and "43.8%" in summary and "6.3%" in summary
        rows = page.evaluate(
            "[...document.querySelectorAll('#preflight-checks tbody tr')].map(r => "
            "[r.dataset.check, r.querySelector('.badge').className, r.cells[3].textContent])"
        )
        assert rows == [
            ["generation_prompt_state", "badge s-fail", "leave it unset"],
            ["rollout_tokenization", "badge s-pass", ""],
            ["teacher_first_tokens", "badge s-pass", ""],
            ["privileged_gap", "badge s-warn", "harder data"],
        ]
        assert watch.errors == []
    finally:
        context.close()


def test_the_report_of_a_preflight_run_before_training_shows_from_its_event(
    browser: Any, service: LiveService, tenant: tuple[str, Any]
) -> None:
    """`preflight.run_first` reports through the job's `preflight_finished` event (no
    pre-flight row): the job view shows that report."""
    key, store = tenant
    job_id = _job(store, key, "succeeded", {})
    report = {
        "status": "pass",
        "checks": [{"name": "privileged_gap", "status": "pass", "message": "gap +51.6%"}],
        "n_problems": 64,
        "samples_per_problem": 1,
        "student_accuracy": 0.296875,
        "teacher_accuracy": 0.8125,
        "gap": 0.515625,
        "divergence": "jsd",
        "divergence_profile": [0.27],
    }
    store.add_event(job_id, "preflight_finished", "pre-flight: pass", {"report": report})
    context, page, watch = _open(browser, service, f"{service.base_url}/ui#job={job_id}")
    try:
        _sign_in(page, key)
        page.wait_for_selector("#preflight-status.s-pass")
        assert "51.6%" in page.inner_text("#preflight-summary")
        assert page.inner_text("#preflight-checks tbody").startswith("privileged_gap")
        assert watch.errors == []
    finally:
        context.close()
