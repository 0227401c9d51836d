"""The usage ledger (`jobstore.usage`): rows written with the metrics, sums per job and tenant
over a time range, on both dialects."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from jobstore import JobRecord, Store, TenantRecord


def test_usage_sums_the_recorded_step_metrics_per_job(
    store: Store,
    tenant: TenantRecord,
    other_tenant: TenantRecord,
    make_job: Callable[..., JobRecord],
) -> None:
    start = datetime.now(UTC) - timedelta(seconds=1)
    job, second = make_job(), make_job()
    foreign = make_job(tenant_id=other_tenant.id)
    train = {
        "loss": 0.3,
        "generated_tokens": 40.0,
        "teacher_scored_tokens": 300.0,
        "student_scored_tokens": 120.0,
        "time_device_s": 1.5,
    }
    store.record_metrics_bulk(
        job.id,
        [
            (1, train),
            (1, {"eval/avg@2": 0.5, "eval_tokens": 16.0, "time_eval_device_s": 0.25}),
            (2, {**train, "generated_tokens": 10.0, "time_device_s": float("nan")}),
        ],
    )
    store.record_metrics(job.id, 2, train)  # a replayed step keeps its first record
    store.record_metrics(second.id, 1, {"loss": 1.0, "time_device_s": 2.0})
    store.record_metrics(second.id, 2, {"loss": 1.0})  # no usage in these metrics
    store.record_metrics(foreign.id, 1, train)
    end = datetime.now(UTC) + timedelta(seconds=1)

    usage = {u.job_id: u for u in store.usage(tenant.id, start=start, end=end)}
    assert set(usage) == {job.id, second.id}
    mine = usage[job.id]
    assert mine.steps == 2
    assert mine.generated_tokens == 50
    assert mine.teacher_scored_tokens == 600 and mine.student_scored_tokens == 240
    assert mine.eval_tokens == 16
    assert mine.device_seconds == 1.5 + 0.25  # a non-finite time counts as 0
    assert usage[second.id].device_seconds == 2.0 and usage[second.id].steps == 1
    assert store.usage(tenant.id, start=end, end=end + timedelta(hours=1)) == []
    assert [u.job_id for u in store.usage(other_tenant.id, start=start, end=end)] == [foreign.id]
