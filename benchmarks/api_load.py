"""Benchmark: the HTTP API under sustained mixed load on the Postgres backend.

Starts `opsd api` (uvicorn) as its own process on a throw-away Postgres database (durable
commits) with a Redis broker (nothing consumes the queue: this measures the API, not training),
seeds a job with 100,000 metric rows, then drives an open-loop load from this (second) process at
a fixed rate over a few keep-alive connections:

    POST /jobs (25%), GET /jobs/{id} (35%), GET /jobs/{id}/metrics?max_points=200 (25%),
    GET /jobs?limit=20 (15%)

Request i is due at i / rate and its latency counts from then, whether or not a connection was
free (no coordinated omission: a slow server shows up as latency, not as a lower rate). Prints
the metrics query on the 100,000-row job with downsampling, then achieved throughput, p50/p99/max
latency and errors per endpoint, and the CPU per request of the API, of this generator and of
the whole machine.

    python benchmarks/api_load.py --rate 200 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
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

REDIS_URL = os.environ.get("OPSD_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
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
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
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


def _durable_commits(database_url: str) -> None:
    """Undo the test fixture's `synchronous_commit = off`: measure commits as deployed."""
    import sqlalchemy as sa

    engine = sa.create_engine(database_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            name = connection.exec_driver_sql("SELECT current_database()").scalar_one()
            connection.exec_driver_sql(f'ALTER DATABASE "{name}" RESET synchronous_commit')
    finally:
        engine.dispose()


def _cpu_seconds(pid: int, *, descendants: bool = False) -> float:
    """User + system CPU seconds of a process (all its threads), and of its descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            if descendants:
                for task in Path(f"/proc/{current}/task").iterdir():
                    pending += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile
    return total


def _cpu_snapshot(api_pid: int) -> dict[str, float]:
    """CPU seconds so far of the API (uvicorn and its workers), this load generator, and the
    whole machine (PostgreSQL, Redis and everything else included; Linux /proc)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    busy = sum(int(v) for i, v in enumerate(fields) if i not in (3, 4)) / os.sysconf("SC_CLK_TCK")
    return {
        "api": _cpu_seconds(api_pid, descendants=True),
        "load generator": time.process_time(),
        "all": busy,
    }


def _settle(database_url: str) -> None:
    """Let the seeding's aftermath (autovacuum and analyze of the fresh rows, the checkpoint of
    their WAL) happen now instead of in the middle of the measured load."""
    import sqlalchemy as sa

    engine = sa.create_engine(database_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("VACUUM ANALYZE")
            connection.exec_driver_sql("CHECKPOINT")
    finally:
        engine.dispose()


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


class _Connection:
    """One keep-alive HTTP/1.1 connection that sends pre-encoded requests and reads the answers.

    A deliberately small client: the load generator shares the machine's cores with the server,
    and a full-featured async client (httpx) spends about 1.5 ms of CPU per request, which at
    200 req/s is a third of a core taken from the server being measured.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        try:
            self.writer.write(raw)
            head = await self.reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await self.reader.readexactly(length) if length else b""
        except BaseException:
            self.close()
            raise
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def _encode(method: str, path: str, key: str, body: bytes | None = None) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: bench",
        f"Authorization: Bearer {key}",
        "Accept: application/json",
    ]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


async def _drive(
    base_url: str,
    key: str,
    job_ids: list[str],
    rate: float,
    seconds: float,
    seed: int,
    connections: int,
):
    """Open-loop load: request i is due at t0 + i / rate and its latency counts from then.

    Due requests wait in one queue for a free keep-alive connection, so a server that falls
    behind shows up as latency (no coordinated omission), never as a lower offered rate.
    """
    rng = random.Random(seed)
    host, port = base_url.removeprefix("http://").split(":")
    latencies: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    expected = {"POST /jobs": 201}
    metrics_path = f"/jobs/{job_ids[0]}/metrics?name=loss&max_points=200"
    queue: asyncio.Queue[tuple[float, str, bytes] | None] = asyncio.Queue()

    async def serve(connection: _Connection) -> None:
        while (item := await queue.get()) is not None:
            due, kind, raw = item
            try:
                status, body = await asyncio.wait_for(connection.request(raw), timeout=10)
                ok = status == expected.get(kind, 200)
                if ok and kind == "POST /jobs":
                    job_ids.append(json.loads(body)["id"])
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
                ok = False
            latencies[kind].append((time.perf_counter() - due) * 1000)
            if not ok:
                errors[kind] += 1
        connection.close()

    def build(kind: str) -> bytes:
        if kind == "POST /jobs":
            body = json.dumps({**BODY, "seed": rng.randrange(10**6)}).encode()
            return _encode("POST", "/jobs", key, body)
        if kind == "GET /jobs/{id}":
            return _encode("GET", f"/jobs/{rng.choice(job_ids)}", key)
        if kind == "GET /jobs/{id}/metrics":
            return _encode("GET", metrics_path, key)
        return _encode("GET", "/jobs?limit=20", key)

    kinds = ["POST /jobs"] * 25 + ["GET /jobs/{id}"] * 35 + ["GET /jobs/{id}/metrics"] * 25
    kinds += ["GET /jobs"] * 15
    servers = [asyncio.create_task(serve(_Connection(host, int(port)))) for _ in range(connections)]
    total = int(rate * seconds)
    t0 = time.perf_counter()
    for i in range(total):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        kind = rng.choice(kinds)
        queue.put_nowait((due, kind, build(kind)))
    for _ in servers:
        queue.put_nowait(None)
    await asyncio.gather(*servers)
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
    parser.add_argument(
        "--connections", type=int, default=32, help="keep-alive connections of the load generator"
    )
    parser.add_argument("--port", type=int, default=0, help="API port (0: a free one)")
    args = parser.parse_args()

    from jobstore import Store
    from jobstore.migrate import upgrade
    from tests.service_fixtures import fresh_postgres_url

    database_url, drop = fresh_postgres_url()
    _durable_commits(database_url)
    port = args.port or _free_port()
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
        _settle(database_url)

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

        # 2. sustained mixed load (setup garbage frozen, so the generator's own full collections
        # do not pause it mid-run and show up as server latency)
        gc.collect()
        gc.freeze()
        before = _cpu_snapshot(api.pid)
        latencies, errors, elapsed = asyncio.run(
            _drive(
                base_url,
                key,
                job_ids,
                args.rate,
                args.seconds,
                seed=0,
                connections=args.connections,
            )
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
        used = {k: v - before[k] for k, v in _cpu_snapshot(api.pid).items()}
        requests = sum(len(v) for v in latencies.values())
        print(
            "\nCPU per request (ms): "
            + ", ".join(f"{k} {1000 * v / requests:.2f}" for k, v in used.items() if k != "all")
            + f", whole machine {1000 * used['all'] / requests:.2f} "
            f"(all cores busy {100 * used['all'] / elapsed / (os.cpu_count() or 1):.0f}%)"
        )
    finally:
        if api is not None:
            api.terminate()
            api.wait(timeout=20)
        drop()


if __name__ == "__main__":
    main()
