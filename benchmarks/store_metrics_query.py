"""Benchmark: latency of the store's metrics queries on a job with 100,000 metric rows (PostgreSQL).

Owns the measurement behind the requirement "``Store.query_metrics(job, max_points=500)`` answers a
job with 100k metric rows in well under 100 ms": it creates a throw-away database (``CREATE
DATABASE opsd_bench_<random>`` on the server of ``--admin-url``, dropped at the end unless
``--keep``), migrates it, records ``--names`` x ``--steps`` metric rows for one job through
``Store.record_metrics_bulk`` (plus as many rows for each of ``--other-jobs`` jobs, so the index
has to pick the job out of a larger table), runs ``ANALYZE`` and times each query through the
public ``Store`` API (Python overhead included): ``--repeat`` timed runs after ``--warmup``
untimed ones, first on the freshly written rows (a running job), then after ``VACUUM`` (the
state autovacuum leaves an insert-only table in, where the covering primary key gives
index-only scans). Prints Markdown tables of p50 / p99 / max in milliseconds, with a plain
``count(*)`` over the job's rows as a yardstick of the machine's speed.

Usage::

    python benchmarks/store_metrics_query.py                      # 10 names x 10,000 steps
    python benchmarks/store_metrics_query.py --steps 100000 --repeat 20
    python benchmarks/store_metrics_query.py --database-url postgresql+psycopg://u@h/db

Results (2026-11-28, PostgreSQL 15, a 2-vCPU dev VM shared with other test suites, so its speed
varied ~5x during the day; the count(*) row is the yardstick). 10 names x 10,000 steps, fresh
rows, ``--other-jobs 0``, quietest run:

    | query                                      | points | p50 ms | p99 ms |
    |--------------------------------------------|-------:|-------:|-------:|
    | all 10 names, max_points=500               |  5,000 |   72.2 |  100.6 |
    | 1 name, max_points=500                     |    500 |    9.4 |   12.4 |
    | all names, steps 5000..5999, max_points=500 |  5,000 |   28.8 |   59.5 |
    | 1 name, 1,000 steps, raw                   |  1,000 |    2.9 |    8.2 |
    | all names, raw (all 100,000 rows)          | 100,000 |  215.6 |  480.5 |
    | metric_names                               |     10 |    1.5 |    7.1 |
    | reference: SELECT count(*) of the job's rows |    1 |   14.1 |   18.5 |

The downsampled query costs about 4-5 bare ``count(*)`` passes over the job's rows (it reads and
averages every row); in the quietest interleaved comparison it took 35 ms (min) / 55 ms (p50)
against 8 / 13 ms for ``count(*)``. Under heavier load (count(*) at 45-56 ms) it took 120 ms.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import secrets
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobstore import Store, upgrade

DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


def _fill(store: Store, job_id: str, names: list[str], steps: int) -> int:
    inserted = 0
    batch = 1000
    for start in range(0, steps, batch):
        rows = [
            (step, {name: math.sin(step / 100 + i) + step * 1e-4 for i, name in enumerate(names)})
            for step in range(start, min(steps, start + batch))
        ]
        inserted += store.record_metrics_bulk(job_id, rows)
    return inserted


def _count_rows(store: Store, job_id: str) -> int:
    """One plain pass over the job's rows: the floor a single-pass downsampling can reach."""
    with store.engine.connect() as connection:
        query = sa.text("SELECT count(*) FROM metrics WHERE job_id = :job_id")
        return connection.execute(query, {"job_id": job_id}).scalar_one()


def _time(fn: Callable[[], object], warmup: int, repeat: int) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--admin-url", default=os.environ.get("OPSD_BENCH_ADMIN_URL"))
    parser.add_argument("--database-url", help="use this (migrated or empty) database instead")
    parser.add_argument("--names", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--other-jobs", type=int, default=2)
    parser.add_argument("--max-points", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--keep", action="store_true", help="do not drop the created database")
    args = parser.parse_args()

    drop: Callable[[], None] = lambda: None  # noqa: E731
    url = args.database_url
    if url is None:
        admin_url = args.admin_url or DEFAULT_ADMIN_URL
        name = f"opsd_bench_{secrets.token_hex(4)}"
        admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)

        def drop() -> None:
            with admin.connect() as connection:
                connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.dispose()

    try:
        upgrade(url)
        store = Store(url)
        tenant = store.get_or_create_tenant(f"bench-{secrets.token_hex(3)}")
        names = ["loss", *(f"metric_{i:02d}" for i in range(1, args.names))][: args.names]
        started = time.perf_counter()
        for _ in range(args.other_jobs):
            other, _ = store.create_job(tenant.id, spec={"bench": True})
            _fill(store, other.id, names, args.steps)
        job, _ = store.create_job(tenant.id, spec={"bench": True})
        rows = _fill(store, job.id, names, args.steps)
        fill_s = time.perf_counter() - started
        with store.engine.begin() as connection:
            connection.exec_driver_sql("ANALYZE metrics")
            total = connection.execute(sa.text("SELECT count(*) FROM metrics")).scalar_one()
            version = connection.execute(sa.text("SHOW server_version")).scalar_one()
            plan = connection.execute(
                sa.text("EXPLAIN SELECT value FROM metrics WHERE job_id = :j AND name = 'loss'"),
                {"j": job.id},
            ).all()
            index_only = any("Index Only Scan" in row[0] for row in plan)

        mid = args.steps // 2
        queries: list[tuple[str, Callable[[], object], Callable[[object], int]]] = [
            (
                f"all {args.names} names, max_points={args.max_points}",
                lambda: store.query_metrics(job.id, max_points=args.max_points),
                lambda r: sum(len(v) for v in r.values()),  # type: ignore[attr-defined]
            ),
            (
                f"1 name, max_points={args.max_points}",
                lambda: store.query_metrics(job.id, names=["loss"], max_points=args.max_points),
                lambda r: sum(len(v) for v in r.values()),  # type: ignore[attr-defined]
            ),
            (
                f"all names, steps {mid}..{mid + 999}, max_points={args.max_points}",
                lambda: store.query_metrics(
                    job.id, step_min=mid, step_max=mid + 999, max_points=args.max_points
                ),
                lambda r: sum(len(v) for v in r.values()),  # type: ignore[attr-defined]
            ),
            (
                "1 name, 1,000 steps, raw",
                lambda: store.query_metrics(
                    job.id, names=["loss"], step_min=mid, step_max=mid + 999
                ),
                lambda r: sum(len(v) for v in r.values()),  # type: ignore[attr-defined]
            ),
            (
                f"all names, raw (all {rows:,} rows)",
                lambda: store.query_metrics(job.id),
                lambda r: sum(len(v) for v in r.values()),  # type: ignore[attr-defined]
            ),
            ("metric_names", lambda: store.metric_names(job.id), len),  # type: ignore[arg-type]
            (
                "reference: SELECT count(*) of the job's rows",
                lambda: _count_rows(store, job.id),
                lambda r: 1,
            ),
        ]

        print(
            f"PostgreSQL {version}; Python {platform.python_version()}; {os.cpu_count()} CPUs; "
            f"job with {rows:,} metric rows ({args.names} names x {args.steps:,} steps) in a "
            f"table of {total:,} rows; filled in {fill_s:.1f} s; "
            f"{args.repeat} timed runs after {args.warmup} warm-up runs; "
            f"index-only scans planned: {index_only}"
        )
        # "fresh": rows just written (a running job; index-only scans still visit the heap);
        # "vacuumed": after VACUUM, as autovacuum leaves an insert-only table (PostgreSQL 13+).
        for phase in ("fresh", "vacuumed"):
            if phase == "vacuumed":
                with store.engine.connect().execution_options(
                    isolation_level="AUTOCOMMIT"
                ) as connection:
                    connection.exec_driver_sql("VACUUM ANALYZE metrics")
            print(f"\n{phase}:\n")
            print("| query | points returned | p50 ms | p99 ms | max ms |")
            print("|---|---:|---:|---:|---:|")
            for label, fn, count in queries:
                samples = _time(fn, args.warmup, args.repeat)
                print(
                    f"| {label} | {count(fn()):,} | {statistics.median(samples):.1f} "
                    f"| {_percentile(samples, 0.99):.1f} | {max(samples):.1f} |"
                )
        store.close()
    finally:
        if not args.keep:
            drop()
        elif args.database_url is None:
            print(f"\nkept database: {url}")


if __name__ == "__main__":
    main()
