"""Per-job records: events (ordered, resumable), metrics (de-duplicated on replay, filtered,
downsampled in SQL), checkpoints (upserted per step), each scoped to its tenant."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import pytest

from jobstore import JobNotFound, JobRecord, Store, TenantRecord

Points = list[tuple[int, float]]


def test_events_are_ordered_and_resumable(store: Store, make_job: Callable[..., JobRecord]) -> None:
    job = make_job()
    other = make_job()
    ids = [store.add_event(job.id, "log", f"line {i}", {"i": i}) for i in range(5)]
    store.add_event(other.id, "log", "elsewhere")
    assert ids == sorted(ids) and len(set(ids)) == 5
    events = store.list_events(job.id)
    assert [e.kind for e in events] == ["queued"] + ["log"] * 5
    assert [e.id for e in events[1:]] == ids
    assert events[3].message == "line 2" and events[3].data == {"i": 2}
    assert events[3].created_at is not None and events[3].created_at.tzinfo is not None
    assert [e.id for e in store.list_events(job.id, after_id=ids[1])] == ids[2:]
    assert [e.id for e in store.list_events(job.id, after_id=ids[1], limit=2)] == ids[2:4]
    assert store.list_events(job.id, after_id=ids[-1]) == []
    assert store.add_event(job.id, "note", "no data") > ids[-1]
    assert store.list_events(job.id)[-1].data == {}
    with pytest.raises(JobNotFound):
        store.add_event("job_missing", "log", "x")


def test_polling_after_the_last_seen_id_misses_no_event(
    store: Store, make_job: Callable[..., JobRecord]
) -> None:
    """Writers race; a reader that only ever asks for ``id > last seen`` still sees them all."""
    job = make_job()
    writers, per_writer = 4, 40
    done = threading.Event()
    seen: list[int] = []

    def write(w: int) -> None:
        for i in range(per_writer):
            store.add_event(job.id, "log", f"{w}-{i}")

    def read() -> None:
        last = 0
        while True:
            finished = done.is_set()
            batch = store.list_events(job.id, after_id=last)
            seen.extend(e.id for e in batch)
            last = batch[-1].id if batch else last
            if finished and not batch:
                return

    reader = threading.Thread(target=read)
    reader.start()
    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    reader.join()
    assert seen == [e.id for e in store.list_events(job.id)]
    assert len(seen) == 1 + writers * per_writer


def test_per_job_records_are_tenant_scoped(
    store: Store,
    tenant: TenantRecord,
    other_tenant: TenantRecord,
    make_job: Callable[..., JobRecord],
) -> None:
    job = make_job()
    store.record_metrics(job.id, 1, {"loss": 1.0})
    store.add_checkpoint(job.id, 1, "file:///ckpt/1")
    assert store.list_events(job.id, tenant_id=other_tenant.id) == []
    assert store.query_metrics(job.id, tenant_id=other_tenant.id) == {}
    assert store.query_metrics(job.id, tenant_id=other_tenant.id, max_points=10) == {}
    assert store.metric_names(job.id, tenant_id=other_tenant.id) == []
    assert store.list_checkpoints(job.id, tenant_id=other_tenant.id) == []
    assert len(store.list_events(job.id, tenant_id=tenant.id)) == 1
    assert store.query_metrics(job.id, tenant_id=tenant.id) == {"loss": [(1, 1.0)]}
    assert store.metric_names(job.id, tenant_id=tenant.id) == ["loss"]
    assert len(store.list_checkpoints(job.id, tenant_id=tenant.id)) == 1


def test_metrics_replayed_steps_are_not_duplicated(
    store: Store, make_job: Callable[..., JobRecord]
) -> None:
    job = make_job()
    assert store.record_metrics(job.id, 1, {"loss": 2.0, "lr": 1e-5}) == 2
    assert store.record_metrics(job.id, 2, {"loss": 1.5, "lr": 2e-5}) == 2
    # a resumed run replays step 2 (other values) and adds a new metric at that step
    assert store.record_metrics(job.id, 2, {"loss": 9.9, "lr": 9.9, "kl": 0.1}) == 1
    assert store.record_metrics(job.id, 2, {"loss": 9.9}) == 0
    assert store.query_metrics(job.id) == {
        "kl": [(2, 0.1)],
        "loss": [(1, 2.0), (2, 1.5)],  # the first value recorded stays
        "lr": [(1, 1e-5), (2, 2e-5)],
    }
    assert store.record_metrics(job.id, 3, {}) == 0
    with pytest.raises(JobNotFound):
        store.record_metrics("job_missing", 1, {"loss": 1.0})


def test_non_finite_metric_values_are_skipped(
    store: Store, make_job: Callable[..., JobRecord]
) -> None:
    job = make_job()
    inserted = store.record_metrics(
        job.id, 1, {"loss": math.nan, "grad_norm": math.inf, "neg": -math.inf, "ok": 3}
    )
    assert inserted == 1
    assert store.query_metrics(job.id) == {"ok": [(1, 3.0)]}
    assert store.metric_names(job.id) == ["ok"]


def test_query_metrics_filters(store: Store, make_job: Callable[..., JobRecord]) -> None:
    job = make_job()
    other = make_job()
    for step in range(1, 21):
        store.record_metrics(job.id, step, {"loss": 1.0 / step, "reward": float(step), "b": 0.0})
    store.record_metrics(other.id, 1, {"loss": 123.0})
    assert store.metric_names(job.id) == ["b", "loss", "reward"]
    everything = store.query_metrics(job.id)
    assert set(everything) == {"b", "loss", "reward"}
    assert [s for s, _ in everything["loss"]] == list(range(1, 21))
    only = store.query_metrics(job.id, names=["reward", "absent"], step_min=5, step_max=8)
    assert only == {"reward": [(5, 5.0), (6, 6.0), (7, 7.0), (8, 8.0)]}
    assert store.query_metrics(job.id, names=[]) == {}
    assert store.query_metrics(job.id, step_min=21) == {}
    assert store.query_metrics(job.id, step_max=1)["loss"] == [(1, 1.0)]
    assert store.query_metrics("job_missing") == {}
    assert store.metric_names("job_missing") == []


def reference_downsample(points: Points, max_points: int) -> Points:
    """The algorithm documented in jobstore.store, in Python."""
    if len(points) <= max_points:
        return points
    first, last = points[0], points[-1]
    if max_points == 2:
        return [first, last]
    buckets: dict[int, list[tuple[int, float]]] = {}
    for step, value in points[1:-1]:
        index = (step - first[0] - 1) * (max_points - 2) // (last[0] - first[0] - 1)
        buckets.setdefault(index, []).append((step, value))
    middle = [
        (max(s for s, _ in group), sum(v for _, v in group) / len(group))
        for _, group in sorted(buckets.items())
    ]
    return [first, *middle, last]


def _assert_points_equal(actual: Points, expected: Points) -> None:
    assert [s for s, _ in actual] == [s for s, _ in expected]
    for (_, a), (_, e) in zip(actual, expected, strict=True):
        assert a == pytest.approx(e, rel=1e-12, abs=1e-12)


def test_query_metrics_downsamples_in_sql(store: Store, make_job: Callable[..., JobRecord]) -> None:
    job = make_job()
    long_run: Points = [(step, math.sin(step / 50.0) + step / 1000.0) for step in range(0, 3000)]
    sparse: Points = [(step, float(step % 7)) for step in range(0, 3000, 97)]  # 31 points
    gappy: Points = [(s, float(s)) for s in [*range(5, 400), *range(2000, 2100)]]
    rows: list[tuple[int, dict[str, float]]] = []
    for step, value in long_run:
        rows.append((step, {"loss": value}))
        if step % 97 == 0:
            rows.append((step, {"eval_acc": float(step % 7)}))
    rows += [(step, {"gappy": value}) for step, value in gappy]
    assert store.record_metrics_bulk(job.id, rows) == len(long_run) + len(sparse) + len(gappy)
    assert store.record_metrics_bulk(job.id, rows) == 0

    for max_points in (2, 3, 10, 100, 499, 2999, 3000, 5000):
        result = store.query_metrics(job.id, max_points=max_points)
        for name, points in (("loss", long_run), ("eval_acc", sparse), ("gappy", gappy)):
            got = result[name]
            assert len(got) <= max_points
            assert got[0] == points[0] and got[-1] == points[-1]  # first and last kept exactly
            assert [s for s, _ in got] == sorted({s for s, _ in got})  # ascending, unique
            _assert_points_equal(got, reference_downsample(points, max_points))
    assert len(store.query_metrics(job.id, max_points=100)["loss"]) == 100
    assert store.query_metrics(job.id, max_points=2)["loss"] == [long_run[0], long_run[-1]]
    assert store.query_metrics(job.id, max_points=5000)["loss"] == long_run  # nothing to do

    ranged = store.query_metrics(
        job.id, names=["loss"], step_min=1000, step_max=1999, max_points=50
    )
    window = [p for p in long_run if 1000 <= p[0] <= 1999]
    assert set(ranged) == {"loss"}
    _assert_points_equal(ranged["loss"], reference_downsample(window, 50))
    assert ranged["loss"][0][0] == 1000 and ranged["loss"][-1][0] == 1999
    with pytest.raises(ValueError):
        store.query_metrics(job.id, max_points=1)


def test_checkpoints_upsert_per_step(store: Store, make_job: Callable[..., JobRecord]) -> None:
    job = make_job()
    for step in (20, 5, 10):
        store.add_checkpoint(job.id, step, f"file:///ckpt/{step}")
    store.add_checkpoint(job.id, 10, "file:///ckpt/10-retry")
    listed = store.list_checkpoints(job.id)
    assert [(c.step, c.uri) for c in listed] == [
        (5, "file:///ckpt/5"),
        (10, "file:///ckpt/10-retry"),
        (20, "file:///ckpt/20"),
    ]
    assert all(c.job_id == job.id and c.created_at.tzinfo is not None for c in listed)
    assert store.list_checkpoints(make_job().id) == []
    with pytest.raises(JobNotFound):
        store.add_checkpoint("job_missing", 1, "file:///x")


def test_many_metric_names(store: Store, make_job: Callable[..., JobRecord]) -> None:
    job = make_job()
    names = [f"layer_{i:03d}/grad_norm" for i in range(250)]  # more than one query's worth
    rows = [(step, {name: float(step * i) for i, name in enumerate(names)}) for step in range(5)]
    assert store.record_metrics_bulk(job.id, rows) == 250 * 5
    assert store.metric_names(job.id) == sorted(names)
    result = store.query_metrics(job.id, max_points=3)
    assert sorted(result) == sorted(names)
    for i, name in enumerate(names):
        assert result[name] == [(0, 0.0), (3, 2.0 * i), (4, 4.0 * i)]
    assert store.query_metrics(job.id, names=names[:3], step_min=4) == {
        names[0]: [(4, 0.0)],
        names[1]: [(4, 4.0)],
        names[2]: [(4, 8.0)],
    }
