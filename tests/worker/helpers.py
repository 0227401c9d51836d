"""Helpers shared by the worker and service tests: jobs in a real store, worker subprocesses,
Redis, waiting for conditions. Nothing here stands in for a part of the system."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from tests.service_fixtures import redis_test_url

REPO = Path(__file__).resolve().parents[2]
REDIS_TEST_URL = redis_test_url(11)  # a dedicated Redis database, flushed by the tests
SUITE_SETTINGS = (
    "OPSD_DATASET_URI_POLICY",
    "OPSD_BASE_MODEL_POLICY",
    "OPSD_RATE_LIMIT",
    "OPSD_FAILED_AUTH_LIMIT",
)

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T], *, timeout: float, interval: float = 0.1, what: str = "condition"
) -> T:
    """Poll until `predicate()` is truthy; return its value or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def flush_redis(url: str = REDIS_TEST_URL) -> None:
    """Empty the test Redis database (fails the test when Redis is unreachable)."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        client.flushdb()
    finally:
        client.close()


def create_job(store: Any, spec: Mapping[str, Any], *, max_attempts: int = 3) -> str:
    tenant = store.get_or_create_tenant(f"tests-{uuid.uuid4().hex[:6]}")
    job, created = store.create_job(tenant.id, spec=dict(spec), max_attempts=max_attempts)
    assert created
    return job.id


def opsd_command() -> list[str]:
    """The installed `opsd` console script of this interpreter's environment."""
    script = Path(sys.executable).parent / "opsd"
    return [str(script)] if script.exists() else [sys.executable, "-m", "opsd_service"]


def service_env(**settings: object) -> dict[str, str]:
    """The environment of a service subprocess: this one, offline, plus `OPSD_<NAME>` values."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSD_")}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
    )
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
    )
    for name in SUITE_SETTINGS:  # tests/conftest.py's: local test data, bursts of requests
        if name in os.environ:
            env[name] = os.environ[name]
    for name, value in settings.items():
        env[f"OPSD_{name.upper()}"] = str(value)
    return env


class ServiceProcess:
    """An `opsd ...` subprocess with its output in a log file (shown when a test fails)."""

    def __init__(self, args: list[str], env: Mapping[str, str], log_path: Path) -> None:
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [*opsd_command(), *args],
            env=dict(env),
            cwd=str(REPO),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the process (and anything in its session)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        return self.process.returncode

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if exc[0] is not None:
            print(f"--- {self.log_path} ---\n{self.tail()}")


def wait_status(
    store: Any, job_id: str, statuses: set[str], *, timeout: float, worker: Any = None
) -> Any:
    """Wait until the job is in one of `statuses`; fail early if the worker process died."""

    def reached() -> Any:
        if worker is not None and worker.process.poll() is not None:
            raise AssertionError(
                f"worker exited with {worker.process.returncode}:\n{worker.tail()}"
            )
        job = store.get_job(job_id)
        return job if job is not None and job.status in statuses else None

    try:
        return wait_for(reached, timeout=timeout, interval=0.2, what=f"job {job_id} in {statuses}")
    except AssertionError:
        job = store.get_job(job_id)
        if worker is not None:
            print(f"--- worker log ---\n{worker.tail()}")
        print(f"job: {job}")
        raise
