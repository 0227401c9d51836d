"""Benchmark: the fair claim (`Store.claim_next_job`) on Postgres with many queued jobs.

Queues ``--jobs`` jobs over ``--tenants`` tenants (one resource class) in a throw-away database,
then claims them one by one with a per-tenant cap, as workers would, and prints the claim
latency (p50/p99/max, ms) and claims per second of one client. Claims are serialized by a
transaction-level advisory lock, so this is also the class's claim throughput.

    python benchmarks/claim_latency.py --jobs 2000 --tenants 50
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--tenants", type=int, default=50)
    parser.add_argument("--cap", type=int, default=4, help="running jobs per tenant")
    args = parser.parse_args()

    from jobstore import Store
    from jobstore.migrate import upgrade
    from tests.service_fixtures import fresh_postgres_url

    url, drop = fresh_postgres_url()
    try:
        upgrade(url)
        store = Store(url)
        tenants = [store.get_or_create_tenant(f"t{i}").id for i in range(args.tenants)]
        spec = {"base_model": "Qwen/Qwen3-8B", "dataset_uri": "file-x", "resources": {"gpus": 8}}
        for i in range(args.jobs):  # tenant 0 queues half of all jobs first
            tenant = tenants[0] if i < args.jobs // 2 else tenants[i % args.tenants]
            store.create_job(tenant, spec=spec)
        timings, claimed = [], 0
        while True:
            start = time.perf_counter()
            job = store.claim_next_job(
                f"w{claimed}", gpus=8, lease_seconds=60, max_running_per_tenant=args.cap
            )
            timings.append((time.perf_counter() - start) * 1000)
            if job is None:
                break
            claimed += 1
            if claimed % args.cap == 0:  # some jobs end, as they would
                store.finish_job(job.id, f"w{claimed - 1}", adapter_uri="file:///a")
        ordered = sorted(timings)
        p99 = ordered[int(0.99 * (len(ordered) - 1))]
        print(
            f"{claimed} claims of {args.jobs} queued jobs ({args.tenants} tenants, cap "
            f"{args.cap}): p50 {statistics.median(ordered):.2f} ms, p99 {p99:.2f} ms, "
            f"max {ordered[-1]:.2f} ms, {1000 * len(ordered) / sum(ordered):.0f} claims/s"
        )
        store.close()
    finally:
        drop()


if __name__ == "__main__":
    main()
