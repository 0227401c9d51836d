"""Benchmark: the HTTP API under sustained mixed load on the Postgres backend.

Starts `opsd api` (uvicorn) as its own process on a throw-away Postgres database with a Redis
broker (nothing consumes the queue: this measures the API, not training), seeds a job with
100,000 metric rows, then drives an open-loop load from this (second) process at a fixed rate:

    POST /jobs (25%), GET /jobs/{id} (35%), GET /jobs/{id}/metrics?max_points=200 (25%),
    GET /jobs?limit=20 (15%)

Requests start on a fixed schedule whatever the server's latency (open loop, so a slow server
shows up as latency instead of as a lower request rate). Prints one table per phase: achieved
throughput, p50/p99/max latency and error count per endpoint, plus the metrics query on the
100,000-row job with downsampling.

    python benchmarks/api_load.py --rate 200 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

REDIS_URL = "redis://127.0.0.1:6379/14"
BODY = {
    "base_model": "Qwen/Qwen3-4B",
    "dataset_uri": "/data/train.jsonl",
    "optim": {"max_steps": 100},
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _start_api(database_url: str, port: int, workers: int) -> subprocess.Popen:
    env = dict(os.environ)
    env.update(
        OPSD_DATABASE_URL=database_url,
        OPSD_BROKER_URL=REDIS_URL,
        OPSD_HOME=str(Path("/tmp") / f"opsd-bench-{uuid.uuid4().hex[:6]}"),
        PYTHONPATH=str(REPO),
    )
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "api.app:create_app",
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    return subprocess.Popen(command, env=env, cwd=str(REPO))


def _wait_ready(base_url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"api exited with {process.returncode}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit("api did not become ready")


async def _drive(
    base_url: str, key: str, job_ids: list[str], rate: float, seconds: float, seed: int
):
    """Open-loop load: request i starts at t0 + i / rate."""
    rng = random.Random(seed)
    latencies: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, limits=limits, timeout=10
    ) as client:

        async def one(kind: str) -> None:
            start = time.perf_counter()
            try:
                if kind == "POST /jobs":
                    response = await client.post(
                        "/jobs", json={**BODY, "seed": rng.randrange(10**6)}
                    )
                    ok = response.status_code == 201
                    if ok:
                        job_ids.append(response.json()["id"])
                elif kind == "GET /jobs/{id}":
                    response = await client.get(f"/jobs/{rng.choice(job_ids)}")
                    ok = response.status_code == 200
                elif kind == "GET /jobs/{id}/metrics":
                    response = await client.get(
                        f"/jobs/{job_ids[0]}/metrics", params={"name": "loss", "max_points": 200}
                    )
                    ok = response.status_code == 200
                else:
                    response = await client.get("/jobs", params={"limit": 20})
                    ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies[kind].append((time.perf_counter() - start) * 1000)
            if not ok:
                errors[kind] += 1

        kinds = ["POST /jobs"] * 25 + ["GET /jobs/{id}"] * 35 + ["GET /jobs/{id}/metrics"] * 25
        kinds += ["GET /jobs"] * 15
        total = int(rate * seconds)
        tasks = []
        t0 = time.perf_counter()
        for i in range(total):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(rng.choice(kinds))))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
    return latencies, errors, elapsed


def _table(
    title: str, latencies: dict[str, list[float]], errors: dict[str, int], elapsed: float
) -> str:
    lines = [
        f"### {title}",
        "",
        "| endpoint | requests | throughput (req/s) | p50 (ms) | p99 (ms) | max (ms) | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    everything: list[float] = []
    for kind in sorted(latencies):
        values = latencies[kind]
        everything += values
        lines.append(
            f"| {kind} | {len(values)} | {len(values) / elapsed:.1f} | "
            f"{_percentile(values, 0.5):.1f} | "
            f"{_percentile(values, 0.99):.1f} | {max(values):.1f} | {errors.get(kind, 0)} |"
        )
    lines.append(
        f"| **all** | {len(everything)} | {len(everything) / elapsed:.1f} | "
        f"{_percentile(everything, 0.5):.1f} | {_percentile(everything, 0.99):.1f} | "
        f"{max(everything):.1f} | {sum(errors.values())} |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second (open loop)")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    parser.add_argument("--metric-steps", type=int, default=10_000, help="x 10 names = metric rows")
    args = parser.parse_args()

    from jobstore import Store
    from jobstore.migrate import upgrade
    from tests.service_fixtures import fresh_postgres_url

    database_url, drop = fresh_postgres_url()
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    api = None
    try:
        upgrade(database_url)
        store = Store(database_url)
        key = store.create_api_key("bench")
        tenant = store.authenticate(key)
        big, _ = store.create_job(tenant.id, spec=BODY)
        names = [
            "loss",
            "divergence",
            "student_entropy",
            "teacher_entropy",
            "grad_norm",
            "lr",
            "rollout_len_mean",
            "generated_tokens",
            "generated_tokens_total",
            "tokens_per_s",
        ]
        print(f"seeding {len(names) * args.metric_steps:,} metric rows ...", flush=True)
        for start in range(1, args.metric_steps + 1, 1000):
            rows = {
                step: {n: random.random() for n in names}
                for step in range(start, min(start + 1000, args.metric_steps + 1))
            }
            if hasattr(store, "record_metrics_bulk"):
                store.record_metrics_bulk(big.id, list(rows.items()))
            else:
                for step, values in rows.items():
                    store.record_metrics(big.id, step, values)
        store.close()

        api = _start_api(database_url, port, args.workers)
        _wait_ready(base_url, api)
        job_ids = [big.id]
        for _ in range(20):
            job_ids.append(
                httpx.post(
                    f"{base_url}/jobs", json=BODY, headers={"Authorization": f"Bearer {key}"}
                ).json()["id"]
            )

        # 1. the metrics read on the 100k-row job, sequentially
        with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}) as client:
            timings = []
            for repeat in range(60):
                start = time.perf_counter()
                response = client.get(f"/jobs/{big.id}/metrics", params={"max_points": 500})
                assert response.status_code == 200, response.text
                if repeat >= 10:
                    timings.append((time.perf_counter() - start) * 1000)
            points = sum(len(s["steps"]) for s in response.json()["metrics"].values())
        print(
            f"\n### GET /jobs/{{id}}/metrics?max_points=500 on "
            f"{len(names) * args.metric_steps:,} rows ({len(names)} series, {points} points)\n\n"
            f"| requests | p50 (ms) | p99 (ms) | mean (ms) |\n|---:|---:|---:|---:|\n"
            f"| {len(timings)} | {_percentile(timings, 0.5):.1f} | "
            f"{_percentile(timings, 0.99):.1f} | "
            f"{statistics.mean(timings):.1f} |",
            flush=True,
        )

        # 2. sustained mixed load
        latencies, errors, elapsed = asyncio.run(
            _drive(base_url, key, job_ids, args.rate, args.seconds, seed=0)
        )
        print()
        print(
            _table(
                f"Mixed load: {args.rate:.0f} req/s target for {args.seconds:.0f} s "
                f"(uvicorn workers: {args.workers}, Postgres store, Redis broker)",
                latencies,
                errors,
                elapsed,
            )
        )
    finally:
        if api is not None:
            api.terminate()
            api.wait(timeout=20)
        drop()


if __name__ == "__main__":
    main()
