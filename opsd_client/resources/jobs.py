"""`client.jobs`: the `/jobs` resource (submit, list, get, cancel, metrics, events, checkpoints,
adapter) and waiting for a job to finish; `Jobs` for `Client`, `AsyncJobs` for `AsyncClient`.

The attribute path mirrors the URL: `client.jobs.metrics(id)` is `GET /jobs/{id}/metrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

from opsd_client._files import archive_path, extract_adapter
from opsd_client._pagination import AsyncPager, SyncPager
from opsd_client._sse import SSEDecoder
from opsd_client.errors import (
    APIConnectionError,
    APIStatusError,
    JobCancelledError,
    JobFailedError,
    WaitTimeoutError,
)
from opsd_client.models import (
    AsyncJob,
    AsyncJobList,
    AsyncPreflight,
    AsyncPreflightList,
    Checkpoint,
    CheckpointList,
    Event,
    EventList,
    Job,
    JobList,
    Metrics,
    Preflight,
    PreflightList,
)

if TYPE_CHECKING:
    from opsd_client._client import AsyncClient, Client

EVENTS_PAGE = 1000
STREAM_RETRY_DEFAULT = 2.0
DOWNLOAD_TIMEOUT = httpx.Timeout(300.0, connect=10.0)

_GROUPS = (
    "dataset",
    "generation",
    "lora",
    "optim",
    "loss",
    "prompts",
    "runtime",
    "grpo",
    "eval",
    "resources",
    "preflight",
)


def new_idempotency_key() -> str:
    """A fresh key: retries of one `create` reuse it, so they cannot make a second job."""
    return f"opsd-py-{uuid.uuid4().hex}"


def build_spec(spec: Mapping[str, Any] | None, fields: Mapping[str, Any]) -> dict[str, Any]:
    """`spec` (e.g. a loaded YAML file) with `fields` on top; group dicts merge one level."""
    body: dict[str, Any] = json.loads(json.dumps(dict(spec or {})))
    for name, value in fields.items():
        if value is None:
            continue
        if name in _GROUPS and isinstance(value, Mapping) and isinstance(body.get(name), dict):
            body[name] = {**body[name], **value}
        else:
            body[name] = dict(value) if isinstance(value, Mapping) else value
    return body


def _preflight_body(
    sample_size: int | None,
    samples_per_problem: int | None,
    profile_rollouts: int | None,
    max_new_tokens: int | None,
    min_gap: float | None,
) -> dict[str, Any]:
    fields = {
        "sample_size": sample_size,
        "samples_per_problem": samples_per_problem,
        "profile_rollouts": profile_rollouts,
        "max_new_tokens": max_new_tokens,
        "min_gap": min_gap,
    }
    return {name: value for name, value in fields.items() if value is not None}


def job_path(job_id: str, suffix: str = "") -> str:
    return f"/jobs/{quote(job_id, safe='')}{suffix}"


def cancel_reason(events: Sequence[Event]) -> str | None:
    """The server's account of a cancellation: the latest `cancelled` event's message."""
    for event in reversed(events):
        if event.kind == "cancelled":
            return event.message
    return events[-1].message if events else None


class _StreamState:
    """Where an event stream resumes from and how long to wait before reconnecting."""

    def __init__(self, after_id: int, last_event_id: int | None, retry_delay: float | None):
        self.after_id = after_id
        self.last = max(after_id, last_event_id or 0)
        self.retry_delay = retry_delay
        self.server_retry = STREAM_RETRY_DEFAULT
        self.failures = 0

    def request_args(self) -> tuple[dict[str, Any], dict[str, str]]:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if self.last:
            headers["Last-Event-ID"] = str(self.last)
        return {"after_id": self.after_id or None}, headers

    def on_event(self, raw_id: str | None) -> None:
        self.failures = 0
        if raw_id and raw_id.isdigit():
            self.last = int(raw_id)

    def next_delay(self, max_reconnects: int | None) -> float | None:
        """Seconds to wait before reconnecting, or None when the stream should give up."""
        self.failures += 1
        if max_reconnects is not None and self.failures > max_reconnects:
            return None
        if self.retry_delay is not None:
            return self.retry_delay
        return self.server_retry


def _parse_event(data: str) -> Event:
    return Event.model_validate_json(data)


class Jobs:
    """Training jobs (`/jobs`)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def _job(self, response: httpx.Response) -> Job:
        job = Job.model_validate(response.json())
        job._client = self._client
        return job

    def create(
        self,
        *,
        base_model: str | None = None,
        dataset_uri: str | None = None,
        spec: Mapping[str, Any] | None = None,
        method: str | None = None,
        recipe: str | None = None,
        divergence: str | None = None,
        beta: float | None = None,
        max_new_tokens: int | None = None,
        teacher: str | None = None,
        seed: int | None = None,
        checkpoint_every: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        dataset: Mapping[str, Any] | None = None,
        generation: Mapping[str, Any] | None = None,
        lora: Mapping[str, Any] | None = None,
        optim: Mapping[str, Any] | None = None,
        loss: Mapping[str, Any] | None = None,
        prompts: Mapping[str, Any] | None = None,
        runtime: Mapping[str, Any] | None = None,
        resources: Mapping[str, Any] | None = None,
        preflight: Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Submit a job (`POST /jobs`). Only `base_model` and `dataset_uri` are required (here or
        in `spec`); the rest defaults to the paper, or to `recipe` (`paper-v1`,
        `official-2026-04`) where one is named: fields given explicitly override the recipe.
        An `Idempotency-Key` is generated when none is given, so the automatic retries of this
        call can never create a second job."""
        body = build_spec(
            spec,
            {
                "base_model": base_model,
                "dataset_uri": dataset_uri,
                "method": method,
                "recipe": recipe,
                "divergence": divergence,
                "beta": beta,
                "max_new_tokens": max_new_tokens,
                "teacher": teacher,
                "seed": seed,
                "checkpoint_every": checkpoint_every,
                "metadata": metadata,
                "dataset": dataset,
                "generation": generation,
                "lora": lora,
                "optim": optim,
                "loss": loss,
                "prompts": prompts,
                "runtime": runtime,
                "resources": resources,
                "preflight": preflight,
                **dict(extra_body or {}),
            },
        )
        key = idempotency_key or new_idempotency_key()
        response = self._client._http_api.request(
            "POST", "/jobs", json=body, headers={"Idempotency-Key": key}, idempotent=True
        )
        return self._job(response)

    def list(
        self, *, status: str | None = None, limit: int = 20, max_items: int | None = None
    ) -> SyncPager[Job]:
        """Jobs, newest first, fetched `limit` per page as you iterate (all pages, or at most
        `max_items` jobs). `status` filters (`running`, `succeeded`, ...)."""

        def fetch(cursor: str | None) -> JobList:
            response = self._client._http_api.request(
                "GET", "/jobs", params={"status": status, "limit": limit, "cursor": cursor}
            )
            page = JobList.model_validate(response.json())
            for job in page.data:
                job._client = self._client
            return page

        return SyncPager(fetch, max_items=max_items)

    def retrieve(self, job_id: str) -> Job:
        """`GET /jobs/{id}`."""
        return self._job(self._client._http_api.request("GET", job_path(job_id)))

    def cancel(self, job_id: str) -> Job:
        """`POST /jobs/{id}/cancel`: a queued job is cancelled at once, a running one moves to
        `cancelling` and stops at its next step. Cancelling a finished job changes nothing."""
        return self._job(self._client._http_api.request("POST", job_path(job_id, "/cancel")))

    def metrics(
        self,
        job_id: str,
        *,
        names: Sequence[str] | None = None,
        step_min: int | None = None,
        step_max: int | None = None,
        max_points: int | None = None,
    ) -> Metrics:
        """`GET /jobs/{id}/metrics`: series by name, optionally filtered and downsampled."""
        response = self._client._http_api.request(
            "GET",
            job_path(job_id, "/metrics"),
            params={
                "name": list(names) if names else None,
                "step_min": step_min,
                "step_max": step_max,
                "max_points": max_points,
            },
        )
        return Metrics.model_validate(response.json())

    def events(self, job_id: str, *, after_id: int = 0, limit: int | None = None) -> list[Event]:
        """`GET /jobs/{id}/events`: the events after `after_id` (all of them, or `limit`)."""
        events: list[Event] = []
        while limit is None or len(events) < limit:
            page_size = EVENTS_PAGE if limit is None else min(EVENTS_PAGE, limit - len(events))
            response = self._client._http_api.request(
                "GET",
                job_path(job_id, "/events"),
                params={"after_id": after_id, "limit": page_size},
            )
            page = EventList.model_validate(response.json()).data
            events.extend(page)
            if len(page) < page_size:
                break
            after_id = page[-1].id
        return events

    def stream_events(
        self,
        job_id: str,
        *,
        after_id: int = 0,
        last_event_id: int | None = None,
        reconnect: bool = True,
        max_reconnects: int | None = 10,
        retry_delay: float | None = None,
    ) -> Iterator[Event]:
        """Live events (`text/event-stream`) until the job is final.

        A dropped connection is resumed with `Last-Event-ID`, so no event is lost or repeated;
        `max_reconnects` bounds consecutive failed reconnections (None: no bound) and
        `retry_delay` overrides the server's suggested wait between them.
        """
        state = _StreamState(after_id, last_event_id, retry_delay)
        http = self._client._http_api
        while True:
            params, headers = state.request_args()
            decoder = SSEDecoder()
            try:
                response = http.request(
                    "GET",
                    job_path(job_id, "/events"),
                    params=params,
                    headers=headers,
                    stream=True,
                )
                try:
                    for line in response.iter_lines():
                        sse = decoder.decode(line)
                        if decoder.retry_ms is not None:
                            state.server_retry = decoder.retry_ms / 1000
                        if sse is None:
                            continue
                        if sse.event == "end":
                            return
                        state.on_event(sse.id)
                        yield _parse_event(sse.data)
                finally:
                    response.close()
            except (httpx.TransportError, APIConnectionError) as exc:
                if not reconnect:
                    raise _as_api_error(exc) from exc
            except APIStatusError as exc:
                if not reconnect or exc.status < 500:
                    raise
            else:
                if not reconnect:
                    return
            delay = state.next_delay(max_reconnects)
            if delay is None:
                raise APIConnectionError(
                    f"event stream of {job_id} dropped {state.failures - 1} times in a row"
                )
            time.sleep(delay)

    def preflight(
        self,
        job_id: str,
        *,
        sample_size: int | None = None,
        samples_per_problem: int | None = None,
        profile_rollouts: int | None = None,
        max_new_tokens: int | None = None,
        min_gap: float | None = None,
    ) -> Preflight:
        """`POST /jobs/{id}/preflight`: queue the job's pre-flight (privileged gap, divergence
        profile, alignment checks); options left out take the server's defaults."""
        body = _preflight_body(
            sample_size, samples_per_problem, profile_rollouts, max_new_tokens, min_gap
        )
        response = self._client._http_api.request(
            "POST", job_path(job_id, "/preflight"), json=body, idempotent=False
        )
        return self._preflight(response)

    def retrieve_preflight(self, job_id: str) -> Preflight:
        """`GET /jobs/{id}/preflight`: the job's latest pre-flight and its report."""
        return self._preflight(
            self._client._http_api.request("GET", job_path(job_id, "/preflight"))
        )

    def list_preflights(self, job_id: str) -> list[Preflight]:
        """`GET /jobs/{id}/preflights`: the job's pre-flights (the last 100), oldest first."""
        response = self._client._http_api.request("GET", job_path(job_id, "/preflights"))
        found = PreflightList.model_validate(response.json()).data
        for item in found:
            item._client = self._client
        return found

    def wait_preflight(
        self, job_id: str, *, timeout: float | None = None, poll: float = 1.0
    ) -> Preflight:
        """Poll the latest pre-flight until it succeeded or failed (`WaitTimeoutError` after
        `timeout` seconds) and return it: check `status` (the run) and `report.status`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            found = self.retrieve_preflight(job_id)
            if found.is_terminal:
                return found
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeoutError(f"pre-flight of {job_id}", timeout or 0.0, found)
            time.sleep(poll)

    def _preflight(self, response: httpx.Response) -> Preflight:
        found = Preflight.model_validate(response.json())
        found._client = self._client
        return found

    def checkpoints(self, job_id: str) -> list[Checkpoint]:
        """`GET /jobs/{id}/checkpoints`, oldest first."""
        response = self._client._http_api.request("GET", job_path(job_id, "/checkpoints"))
        return CheckpointList.model_validate(response.json()).data

    def download_adapter(self, job_id: str, path: str | Path, *, extract: bool = True) -> Path:
        """Download the trained LoRA adapter (PEFT format) of a succeeded job.

        With `extract` (default) `path` is a folder that receives `adapter_config.json` and the
        weights, ready for `PeftModel.from_pretrained(base, path)`; otherwise the `.tar.gz`
        is written to `path` (a file, or a folder to put `<job>-adapter.tar.gz` in).
        Returns the folder or archive written. Raises `ConflictError` before the job succeeded.
        """
        target = Path(path).expanduser()
        with _download_target(target, job_id, extract) as (archive, final):
            response = self._client._http_api.request(
                "GET",
                job_path(job_id, "/adapter"),
                headers={"Accept": "application/gzip"},
                stream=True,
                timeout=DOWNLOAD_TIMEOUT,
            )
            try:
                with open(archive, "wb") as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
            finally:
                response.close()
            if extract:
                extract_adapter(archive, target)
        return final

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        poll: float = 2.0,
        on_update: Callable[[Job], None] | None = None,
    ) -> Job:
        """Poll until the job is final; return it when it succeeded, else raise
        `JobFailedError` / `JobCancelledError` (with the server's reason) or
        `WaitTimeoutError` after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.retrieve(job_id)
            if on_update is not None:
                on_update(job)
            if job.status == "succeeded":
                return job
            if job.status == "failed":
                raise JobFailedError(job)
            if job.status == "cancelled":
                raise JobCancelledError(job, cancel_reason(self.events(job_id)))
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeoutError(f"job {job_id}", timeout or 0.0, job)
                time.sleep(min(poll, left))
            else:
                time.sleep(poll)


class AsyncJobs:
    """Training jobs (`/jobs`), awaitable; the same methods as `Jobs`."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    def _job(self, response: httpx.Response) -> AsyncJob:
        job = AsyncJob.model_validate(response.json())
        job._client = self._client
        return job

    async def create(
        self,
        *,
        base_model: str | None = None,
        dataset_uri: str | None = None,
        spec: Mapping[str, Any] | None = None,
        method: str | None = None,
        recipe: str | None = None,
        divergence: str | None = None,
        beta: float | None = None,
        max_new_tokens: int | None = None,
        teacher: str | None = None,
        seed: int | None = None,
        checkpoint_every: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        dataset: Mapping[str, Any] | None = None,
        generation: Mapping[str, Any] | None = None,
        lora: Mapping[str, Any] | None = None,
        optim: Mapping[str, Any] | None = None,
        loss: Mapping[str, Any] | None = None,
        prompts: Mapping[str, Any] | None = None,
        runtime: Mapping[str, Any] | None = None,
        resources: Mapping[str, Any] | None = None,
        preflight: Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> AsyncJob:
        """Submit a job; see `Jobs.create`."""
        body = build_spec(
            spec,
            {
                "base_model": base_model,
                "dataset_uri": dataset_uri,
                "method": method,
                "recipe": recipe,
                "divergence": divergence,
                "beta": beta,
                "max_new_tokens": max_new_tokens,
                "teacher": teacher,
                "seed": seed,
                "checkpoint_every": checkpoint_every,
                "metadata": metadata,
                "dataset": dataset,
                "generation": generation,
                "lora": lora,
                "optim": optim,
                "loss": loss,
                "prompts": prompts,
                "runtime": runtime,
                "resources": resources,
                "preflight": preflight,
                **dict(extra_body or {}),
            },
        )
        key = idempotency_key or new_idempotency_key()
        response = await self._client._http_api.request(
            "POST", "/jobs", json=body, headers={"Idempotency-Key": key}, idempotent=True
        )
        return self._job(response)

    def list(
        self, *, status: str | None = None, limit: int = 20, max_items: int | None = None
    ) -> AsyncPager[AsyncJob]:
        """Jobs, newest first; `async for job in client.jobs.list(): ...`."""

        async def fetch(cursor: str | None) -> AsyncJobList:
            response = await self._client._http_api.request(
                "GET", "/jobs", params={"status": status, "limit": limit, "cursor": cursor}
            )
            page = AsyncJobList.model_validate(response.json())
            for job in page.data:
                job._client = self._client
            return page

        return AsyncPager(fetch, max_items=max_items)

    async def retrieve(self, job_id: str) -> AsyncJob:
        return self._job(await self._client._http_api.request("GET", job_path(job_id)))

    async def cancel(self, job_id: str) -> AsyncJob:
        return self._job(await self._client._http_api.request("POST", job_path(job_id, "/cancel")))

    async def metrics(
        self,
        job_id: str,
        *,
        names: Sequence[str] | None = None,
        step_min: int | None = None,
        step_max: int | None = None,
        max_points: int | None = None,
    ) -> Metrics:
        response = await self._client._http_api.request(
            "GET",
            job_path(job_id, "/metrics"),
            params={
                "name": list(names) if names else None,
                "step_min": step_min,
                "step_max": step_max,
                "max_points": max_points,
            },
        )
        return Metrics.model_validate(response.json())

    async def events(
        self, job_id: str, *, after_id: int = 0, limit: int | None = None
    ) -> list[Event]:
        events: list[Event] = []
        while limit is None or len(events) < limit:
            page_size = EVENTS_PAGE if limit is None else min(EVENTS_PAGE, limit - len(events))
            response = await self._client._http_api.request(
                "GET",
                job_path(job_id, "/events"),
                params={"after_id": after_id, "limit": page_size},
            )
            page = EventList.model_validate(response.json()).data
            events.extend(page)
            if len(page) < page_size:
                break
            after_id = page[-1].id
        return events

    async def stream_events(
        self,
        job_id: str,
        *,
        after_id: int = 0,
        last_event_id: int | None = None,
        reconnect: bool = True,
        max_reconnects: int | None = 10,
        retry_delay: float | None = None,
    ) -> AsyncIterator[Event]:
        """Live events; see `Jobs.stream_events` (`async for event in ...`)."""
        state = _StreamState(after_id, last_event_id, retry_delay)
        http = self._client._http_api
        while True:
            params, headers = state.request_args()
            decoder = SSEDecoder()
            try:
                response = await http.request(
                    "GET",
                    job_path(job_id, "/events"),
                    params=params,
                    headers=headers,
                    stream=True,
                )
                try:
                    async for line in response.aiter_lines():
                        sse = decoder.decode(line)
                        if decoder.retry_ms is not None:
                            state.server_retry = decoder.retry_ms / 1000
                        if sse is None:
                            continue
                        if sse.event == "end":
                            return
                        state.on_event(sse.id)
                        yield _parse_event(sse.data)
                finally:
                    await response.aclose()
            except (httpx.TransportError, APIConnectionError) as exc:
                if not reconnect:
                    raise _as_api_error(exc) from exc
            except APIStatusError as exc:
                if not reconnect or exc.status < 500:
                    raise
            else:
                if not reconnect:
                    return
            delay = state.next_delay(max_reconnects)
            if delay is None:
                raise APIConnectionError(
                    f"event stream of {job_id} dropped {state.failures - 1} times in a row"
                )
            await asyncio.sleep(delay)

    async def preflight(
        self,
        job_id: str,
        *,
        sample_size: int | None = None,
        samples_per_problem: int | None = None,
        profile_rollouts: int | None = None,
        max_new_tokens: int | None = None,
        min_gap: float | None = None,
    ) -> AsyncPreflight:
        body = _preflight_body(
            sample_size, samples_per_problem, profile_rollouts, max_new_tokens, min_gap
        )
        response = await self._client._http_api.request(
            "POST", job_path(job_id, "/preflight"), json=body, idempotent=False
        )
        return self._preflight(response)

    async def retrieve_preflight(self, job_id: str) -> AsyncPreflight:
        response = await self._client._http_api.request("GET", job_path(job_id, "/preflight"))
        return self._preflight(response)

    async def list_preflights(self, job_id: str) -> list[AsyncPreflight]:
        response = await self._client._http_api.request("GET", job_path(job_id, "/preflights"))
        found = AsyncPreflightList.model_validate(response.json()).data
        for item in found:
            item._client = self._client
        return found

    async def wait_preflight(
        self, job_id: str, *, timeout: float | None = None, poll: float = 1.0
    ) -> AsyncPreflight:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            found = await self.retrieve_preflight(job_id)
            if found.is_terminal:
                return found
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeoutError(f"pre-flight of {job_id}", timeout or 0.0, found)
            await asyncio.sleep(poll)

    def _preflight(self, response: httpx.Response) -> AsyncPreflight:
        found = AsyncPreflight.model_validate(response.json())
        found._client = self._client
        return found

    async def checkpoints(self, job_id: str) -> list[Checkpoint]:
        response = await self._client._http_api.request("GET", job_path(job_id, "/checkpoints"))
        return CheckpointList.model_validate(response.json()).data

    async def download_adapter(
        self, job_id: str, path: str | Path, *, extract: bool = True
    ) -> Path:
        """Download the adapter; see `Jobs.download_adapter`."""
        target = Path(path).expanduser()
        with _download_target(target, job_id, extract) as (archive, final):
            response = await self._client._http_api.request(
                "GET",
                job_path(job_id, "/adapter"),
                headers={"Accept": "application/gzip"},
                stream=True,
                timeout=DOWNLOAD_TIMEOUT,
            )
            try:
                with open(archive, "wb") as out:
                    async for chunk in response.aiter_bytes():
                        out.write(chunk)
            finally:
                await response.aclose()
            if extract:
                await asyncio.to_thread(extract_adapter, archive, target)
        return final

    async def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        poll: float = 2.0,
        on_update: Callable[[AsyncJob], Any] | None = None,
    ) -> AsyncJob:
        """Await the job's end; see `Jobs.wait` (`on_update` may be a coroutine function)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = await self.retrieve(job_id)
            if on_update is not None:
                result = on_update(job)
                if inspect.isawaitable(result):
                    await result
            if job.status == "succeeded":
                return job
            if job.status == "failed":
                raise JobFailedError(job)
            if job.status == "cancelled":
                reason = cancel_reason(await self.events(job_id))
                raise JobCancelledError(job, reason)
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeoutError(f"job {job_id}", timeout or 0.0, job)
                await asyncio.sleep(min(poll, left))
            else:
                await asyncio.sleep(poll)


def _as_api_error(exc: Exception) -> APIConnectionError:
    if isinstance(exc, APIConnectionError):
        return exc
    return APIConnectionError(f"event stream dropped: {exc or type(exc).__name__}")


@contextlib.contextmanager
def _download_target(target: Path, job_id: str, extract: bool) -> Iterator[tuple[Path, Path]]:
    """(file to stream the archive into, path to return). Without `extract` the archive is
    written beside its destination and renamed into place once complete; with it, the archive
    is a temporary file and the destination is the (empty or new) folder."""
    if not extract:
        destination = archive_path(target, job_id)
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_name(destination.name + ".partial")
        try:
            yield partial, destination
            partial.replace(destination)
        finally:
            partial.unlink(missing_ok=True)
        return
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not an empty folder")
    with tempfile.TemporaryDirectory(prefix="opsd-adapter-") as tmp:
        yield Path(tmp) / f"{job_id}-adapter.tar.gz", target
