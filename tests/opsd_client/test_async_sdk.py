"""The asyncio SDK (`opsd_client.AsyncClient`) against the real running service.

Each test drives one scenario with `asyncio.run`, so no pytest plugin is needed.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from opsd_client import (
    APIConnectionError,
    AsyncClient,
    AsyncJob,
    ConflictError,
    JobCancelledError,
    NotFoundError,
    UnprocessableEntityError,
)
from tests.opsd_client.faults import Fault, FaultProxy
from tests.opsd_client.service import LiveService, closed_port, tiny_body


def test_async_client_runs_a_job_end_to_end(
    service: LiveService,
    done_job: dict[str, Any],
    tiny_model_dir: Path,
    tiny_dataset: Path,
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with AsyncClient(base_url=service.base_url, api_key=service.api_key) as client:
            job = await client.jobs.create(
                spec=tiny_body(tiny_model_dir, tiny_dataset),
                optim={"max_steps": 2},
                checkpoint_every=1,
            )
            assert isinstance(job, AsyncJob)
            streamed = [event async for event in client.jobs.stream_events(job.id)]
            assert streamed[0].kind == "queued" and streamed[-1].kind == "succeeded"

            updates: list[str] = []

            async def on_update(current: AsyncJob) -> None:
                updates.append(current.status)

            final = await job.wait(timeout=120, poll=0.2, on_update=on_update)
            assert final.status == "succeeded" and updates[-1] == "succeeded"
            assert (await final.refresh()).progress.step == 2

            metrics = await client.jobs.metrics(job.id, names=["loss"])
            assert metrics["loss"].steps == [1, 2]
            assert await client.jobs.events(job.id) == streamed
            resumed = [
                e async for e in client.jobs.stream_events(job.id, last_event_id=streamed[1].id)
            ]
            assert resumed == streamed[2:]
            assert [c.step for c in await client.jobs.checkpoints(job.id)] == [1, 2]

            listed = [j.id async for j in client.jobs.list(limit=1)]
            assert job.id in listed and len(listed) == len(set(listed)) >= 2
            first = await client.jobs.list(limit=1, max_items=1).to_list()
            assert [j.id for j in first] == listed[:1]

            folder = await client.jobs.download_adapter(job.id, tmp_path / "adapter")
            assert (folder / "adapter_config.json").exists()

            with pytest.raises(NotFoundError):
                await client.jobs.retrieve("job_missing")
            with pytest.raises(UnprocessableEntityError) as invalid:
                await client.jobs.create(
                    base_model="m", dataset_uri="/x.jsonl", optim={"batch_size": 0}
                )
            assert invalid.value.param == "optim.batch_size"

    asyncio.run(scenario())


def test_async_cancel_wait_and_conflict(
    service: LiveService, tiny_model_dir: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with AsyncClient(base_url=service.base_url, api_key=service.api_key) as client:
            job = await client.jobs.create(
                spec=tiny_body(tiny_model_dir, tiny_dataset), optim={"max_steps": 500}
            )
            await client.jobs.cancel(job.id)
            with pytest.raises(JobCancelledError) as cancelled:
                await job.wait(timeout=60, poll=0.2)
            assert cancelled.value.reason
            with pytest.raises(ConflictError):
                await client.jobs.download_adapter(job.id, tmp_path / "none")

    asyncio.run(scenario())


def test_async_retries_connection_errors_and_safe_503s(
    service: LiveService, done_job: dict[str, Any]
) -> None:
    async def scenario() -> None:
        sent: list[httpx.Request] = []

        async def count(request: httpx.Request) -> None:
            sent.append(request)

        http = httpx.AsyncClient(timeout=10, event_hooks={"request": [count]})
        refused = AsyncClient(
            base_url=f"http://127.0.0.1:{closed_port()}", api_key="k", http_client=http
        )
        started = time.monotonic()
        async with refused:
            with pytest.raises(APIConnectionError):
                await refused.jobs.retrieve("job_x")
        await http.aclose()
        assert len(sent) == 3 and time.monotonic() - started < 10

        with FaultProxy(service.base_url) as proxy:
            proxy.plan = [Fault("GET", "/jobs/", status=503, retry_after="0")]
            async with AsyncClient(base_url=proxy.url, api_key=service.api_key) as client:
                job = await client.jobs.retrieve(done_job["id"])
            assert job.id == done_job["id"] and len(proxy.seen) == 2

    asyncio.run(scenario())
