"""One real OPSD service for the SDK, CLI and dashboard tests, started once per test run.

`opsd up` (SQLite, file broker, one worker) runs in a subprocess on a free port, exactly as a
user starts it; its first API key is read from the key file it writes. The first test that asks
for it starts it (both `tests/opsd_client` and `tests/ui` share the same one) and it stops when
the pytest session ends. `finished_job` runs one tiny 4-step OPSD job to success through plain
HTTP (not through the SDK under test) and is shared the same way.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import make_tiny_spec
from tests.worker.helpers import ServiceProcess, service_env, wait_for

FINISHED_JOB_STEPS = 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def closed_port() -> int:
    """A local port nothing listens on (connections are refused)."""
    return free_port()


def tiny_body(model_dir: Path, dataset: Path, **overrides: Any) -> dict[str, Any]:
    """The JSON body of a CPU-sized job (see `tests.conftest.make_tiny_spec`)."""
    from opsd_engine.config import spec_to_dict

    return spec_to_dict(make_tiny_spec(model_dir, dataset, **overrides))


@dataclass
class LiveService:
    base_url: str
    api_key: str
    home: Path
    process: ServiceProcess
    cache: dict[str, Any] = field(default_factory=dict)

    def http(self, key: str | None = None) -> httpx.Client:
        """A plain HTTP client (the tests' independent view of the API)."""
        return httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {key or self.api_key}"},
            timeout=30,
        )

    def check_alive(self) -> None:
        assert self.process.process.poll() is None, f"opsd up exited:\n{self.process.tail()}"

    def wait_job(self, job_id: str, statuses: set[str], timeout: float = 180) -> dict[str, Any]:
        with self.http() as http:

            def reached() -> dict[str, Any] | None:
                self.check_alive()
                job = http.get(f"/jobs/{job_id}").json()
                return job if job["status"] in statuses else None

            return wait_for(reached, timeout=timeout, interval=0.25, what=f"{job_id} {statuses}")

    def new_key(self, tenant: str) -> str:
        """An API key of another tenant, made in the service's own store."""
        from jobstore import Store

        store = Store(f"sqlite:///{self.home / 'opsd.db'}")
        try:
            return store.create_api_key(tenant)
        finally:
            store.close()


_SHARED: list[LiveService] = []


def _start(root: Path) -> LiveService:
    port = free_port()
    home = root / "home"
    up = ServiceProcess(
        ["up", "--home", str(home), "--host", "127.0.0.1", "--port", str(port)],
        service_env(),
        root / "up.log",
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        key_file = home / "api_key"

        def key() -> str | None:
            assert up.process.poll() is None, f"opsd up exited:\n{up.tail()}"
            return key_file.read_text().strip() if key_file.exists() else None

        api_key = wait_for(key, timeout=90, interval=0.2, what="the first API key")

        def ready() -> bool:
            assert up.process.poll() is None, f"opsd up exited:\n{up.tail()}"
            try:
                return httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout=90, interval=0.2, what="the API to be ready")
    except BaseException:
        up.stop()
        raise
    return LiveService(base_url=base_url, api_key=api_key, home=home, process=up)


def shared_service(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> LiveService:
    """The session's service, started on first use and stopped when the session ends."""
    if not _SHARED:
        service = _start(tmp_path_factory.mktemp("opsd-service"))
        _SHARED.append(service)

        def stop() -> None:
            _SHARED.clear()
            code = service.process.stop()
            assert code == 0, f"opsd up exited with {code}:\n{service.process.tail()}"

        config.add_cleanup(stop)
    service = _SHARED[0]
    service.check_alive()
    return service


def finished_job(service: LiveService, model_dir: Path, dataset: Path) -> dict[str, Any]:
    """A tiny OPSD job run to success (checkpoints at steps 2 and 4), submitted by plain HTTP."""
    if "finished_job" not in service.cache:
        body = tiny_body(
            model_dir,
            dataset,
            checkpoint_every=2,
            optim={"max_steps": FINISHED_JOB_STEPS},
            metadata={"purpose": "finished-job"},
        )
        with service.http() as http:
            created = http.post("/jobs", json=body)
        assert created.status_code == 201, created.text
        started = time.monotonic()
        job = service.wait_job(created.json()["id"], {"succeeded", "failed", "cancelled"})
        assert job["status"] == "succeeded", (job, service.process.tail())
        service.cache["finished_job"] = job
        service.cache["finished_job_seconds"] = time.monotonic() - started
    return service.cache["finished_job"]
