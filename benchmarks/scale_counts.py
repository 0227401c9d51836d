"""Benchmark: what one job costs the shared parts (store, broker), for docs/scaling.md.

Runs real jobs of the tiny model through a real Celery worker (`opsd worker --gpus 2`
subprocess, CPU) on a throw-away Postgres database and a Redis database, and reads the
servers' own counters around each job:

* Postgres (``pg_stat_database`` of that database): committed transactions, rows inserted,
  updated and deleted -- every write of the worker (claims, heartbeats, progress, metrics,
  events, checkpoints, the terminal write) and of its reaper;
* Redis (``INFO commandstats``): commands of every kind, the publish of the job's message, the
  worker's consuming, acknowledging and idle polling included.

Then the same counters over an idle period (a worker waiting for work), so the per-job numbers
can be separated from what every idle worker costs. Prints one table per job kind: a 1-GPU job
(in process) and a 2-GPU job (a torchrun group of 2 gloo processes).

    OPSD_BENCH_REDIS_URL=redis://127.0.0.1:6379/13 python benchmarks/scale_counts.py --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

REDIS_URL = os.environ.get("OPSD_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")


def _pg_counters(database_url: str) -> dict[str, int]:
    import sqlalchemy as sa

    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT pg_stat_force_next_flush()")
            row = connection.exec_driver_sql(
                "SELECT xact_commit, tup_inserted, tup_updated, tup_deleted "
                "FROM pg_stat_database WHERE datname = current_database()"
            ).one()
    finally:
        engine.dispose()
    return dict(zip(("commits", "inserted", "updated", "deleted"), map(int, row), strict=True))


def _redis_counters() -> dict[str, int]:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


def _diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {
        k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)
    }


def _settle() -> None:
    time.sleep(1.5)  # let the statistics of the last transactions reach pg_stat_database


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per job")
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()

    from jobstore import Store
    from jobstore.migrate import upgrade
    from opsd_engine.config import spec_to_dict
    from opsd_engine.tiny import build_tiny_model, write_tiny_dataset
    from opsd_service.settings import ServiceSettings
    from tests.conftest import make_tiny_spec
    from tests.service_fixtures import fresh_postgres_url
    from tests.worker.helpers import ServiceProcess, flush_redis, service_env, wait_status
    from worker.queue import enqueue_job, make_celery

    root = Path(tempfile.mkdtemp(prefix="opsd-scale-"))
    model = build_tiny_model(root / "model", seed=0)
    data = write_tiny_dataset(root / "train.jsonl", n=64, seed=0)
    database_url, drop = fresh_postgres_url()
    flush_redis(REDIS_URL)
    values: dict[str, Any] = {
        "home": root / "home",
        "database_url": database_url,
        "broker_url": REDIS_URL,
        "artifacts_uri": str(root / "artifacts"),
        "queue": f"opsd-scale-{uuid.uuid4().hex[:6]}",
        "resource_classes": "1,2",
        "launch_ports": "16430-16499",
    }
    results: dict[str, Any] = {}
    try:
        upgrade(database_url)
        store = Store(database_url)
        celery = make_celery(ServiceSettings(**values))
        tenant = store.get_or_create_tenant("bench")
        env = service_env(**values)
        with ServiceProcess(["worker", "--gpus", "2"], env, root / "worker.log") as worker:
            time.sleep(8)  # started and polling
            _settle()
            pg0, rd0 = _pg_counters(database_url), _redis_counters()
            time.sleep(args.idle_seconds)
            _settle()
            pg1, rd1 = _pg_counters(database_url), _redis_counters()
            idle = args.idle_seconds + 1.5
            results["idle_per_second"] = {
                "postgres": {k: round(v / idle, 2) for k, v in _diff(pg1, pg0).items()},
                "redis": {k: round(v / idle, 2) for k, v in _diff(rd1, rd0).items()},
            }
            for label, gpus, batch in (
                ("1 GPU (in process)", 1, 2),
                ("2 GPUs (torchrun group)", 2, 1),
            ):
                spec = make_tiny_spec(
                    model,
                    data,
                    checkpoint_every=args.checkpoint_every,
                    resources={"gpus": gpus},
                    optim={"batch_size": batch, "grad_accum": 2, "max_steps": args.steps},
                )
                _settle()
                pg0, rd0 = _pg_counters(database_url), _redis_counters()
                started = time.monotonic()
                job, _ = store.create_job(tenant.id, spec=spec_to_dict(spec))
                enqueue_job(celery, job.id, gpus=gpus)
                done = wait_status(
                    store, job.id, {"succeeded", "failed"}, timeout=900, worker=worker
                )
                seconds = time.monotonic() - started
                assert done.status == "succeeded", done.error
                _settle()
                pg1, rd1 = _pg_counters(database_url), _redis_counters()
                metric_rows = sum(len(points) for points in store.query_metrics(job.id).values())
                events = len(store.list_events(job.id))
                results[label] = {
                    "seconds": round(seconds, 1),
                    "steps": args.steps,
                    "metric_rows": metric_rows,
                    "events": events,
                    "checkpoints": len(store.list_checkpoints(job.id)),
                    "postgres": _diff(pg1, pg0),
                    "redis": _diff(rd1, rd0),
                }
            worker.stop()
        store.close()
    finally:
        drop()
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
