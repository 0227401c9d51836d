"""Job routes: submit, list, get, cancel, metrics, events (JSON and live SSE), checkpoints, adapter.

Routes are thin: validate, call the store (in a thread, the store is synchronous), shape the
answer. Another tenant's job is indistinguishable from a missing one (404).
"""

import asyncio
import hashlib
import json
import logging
import tarfile
import tempfile
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import StringConstraints
from starlette.concurrency import run_in_threadpool

from api.datasets import check_base_model, check_dataset, job_datasets
from api.deps import JOB_ID, Settings, Store, Tenant, in_store, tenant_job
from api.errors import APIError
from api.resources import check_resources, enqueue_routed
from api.schemas import (
    CheckpointList,
    CheckpointOut,
    ErrorResponse,
    EventList,
    EventOut,
    JobList,
    JobOut,
    MetricSeries,
    MetricsOut,
    job_out,
)
from api.subtasks import enqueue_or_take_back

log = logging.getLogger("opsd.api")
MAX_INT32 = 2**31 - 1  # INTEGER columns (steps)
MAX_INT64 = 2**63 - 1  # BIGINT columns (event ids)
IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]+$"  # visible ASCII
JOB_STATUSES = ("queued", "running", "cancelling", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")
SSE_POLL_SECONDS = 0.5
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
    404: {"model": ErrorResponse, "description": "No such job for this tenant"},
}

EXAMPLE_FILE_ID = "file-01jd3y7k8q2t4v6x8z0b2d4f6h"
MINIMAL_EXAMPLE = {"base_model": "Qwen/Qwen3-4B", "dataset_uri": EXAMPLE_FILE_ID}
FULL_EXAMPLE = {
    "base_model": "Qwen/Qwen3-4B",
    "dataset_uri": EXAMPLE_FILE_ID,
    "method": "opsd",
    "divergence": "jsd",
    "beta": 0.5,
    "max_new_tokens": 2048,
    "teacher": "initial",
    "seed": 7,
    "checkpoint_every": 50,
    "metadata": {"team": "reasoning", "ticket": "ML-123"},
    "dataset": {"problem_field": "question", "solution_field": "worked_solution"},
    "generation": {"temperature": 1.2, "top_p": 1.0, "num_generations": 1},
    "lora": {"r": 64, "alpha": 128, "dropout": 0.05},
    "optim": {"learning_rate": 2e-5, "batch_size": 4, "grad_accum": 8, "epochs": 1},
    "loss": {"temperature": 1.0, "num_loss_tokens_to_skip": 0},
}


def build_router(job_spec_model: type) -> APIRouter:
    """Routes for /jobs; `job_spec_model` is the engine's JobSpec (the request body schema)."""
    router = APIRouter(prefix="/jobs", tags=["jobs"], responses=ERRORS)
    JobSpec = job_spec_model

    @router.post(
        "",
        status_code=201,
        response_model=JobOut,
        summary="Submit a training job",
        responses={
            200: {
                "model": JobOut,
                "description": "Replay of an earlier request with the same Idempotency-Key",
            },
            409: {
                "model": ErrorResponse,
                "description": "Idempotency-Key reused with another body",
            },
            413: {"model": ErrorResponse, "description": "Body too large"},
            422: {"model": ErrorResponse, "description": "Invalid spec; `param` names the field"},
            429: {"model": ErrorResponse, "description": "Rate limit or queued-jobs quota"},
            503: {"model": ErrorResponse, "description": "Queue or store unavailable"},
        },
    )
    async def create_job(
        request: Request,
        response: Response,
        store: Store,
        tenant: Tenant,
        settings: Settings,
        spec: Annotated[
            JobSpec,  # type: ignore[valid-type]
            _body_examples(),
        ],
        idempotency_key: Annotated[
            str | None,
            Header(
                min_length=1,
                max_length=255,
                pattern=IDEMPOTENCY_KEY_PATTERN,
                description="Retries with the same key return the same job.",
            ),
        ] = None,
    ) -> Any:
        """Queue a job. Only `base_model` and `dataset_uri` are required; the rest defaults to
        the paper (JSD beta 0.5, teacher = initial policy, LoRA r=64, lr 2e-5, ...).
        `dataset_uri` is an uploaded file's id (`POST /files`) or a location the deployment's
        policy allows for this tenant."""
        from opsd_engine.config import spec_to_dict

        if spec.lora.r > settings.max_lora_rank:
            raise APIError(
                422,
                "invalid_request",
                f"lora.r: {spec.lora.r} is above the serving limit {settings.max_lora_rank}",
                "lora.r",
            )
        check_resources(spec, settings)
        body = spec_to_dict(spec)
        if (where := find_unstorable_text(body)) is not None:
            raise APIError(
                422,
                "invalid_request",
                f"{where}: NUL characters and unpaired surrogates are not allowed",
                where,
            )
        check_base_model(request, tenant, spec.base_model)
        for dataset in job_datasets(spec):
            await check_dataset(request, tenant, dataset)
        request_hash = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        from jobstore import IdempotencyConflict

        replay = None
        if idempotency_key is not None:
            replay = await in_store(
                request, lambda: store.job_by_idempotency_key(tenant.id, idempotency_key)
            )
        if replay is None:
            await check_queue_quota(request, tenant)

        try:
            job, created = await in_store(
                request,
                lambda: store.create_job(
                    tenant.id,
                    spec=body,
                    metadata=spec.metadata,
                    idempotency_key=idempotency_key,
                    request_hash=request_hash,
                    max_attempts=settings.max_attempts,
                ),
            )
        except IdempotencyConflict as exc:
            raise APIError(409, "idempotency_conflict", str(exc), "Idempotency-Key") from None
        if created:  # a broker that is down leaves nothing behind (503)
            await enqueue_or_take_back(
                request,
                "job",
                job.id,
                lambda: enqueue_routed(request.app.state, job.id, spec.resources.gpus),
                lambda: store.discard_unqueued_job(job.id),
            )
        if not created:
            response.status_code = 200
            response.headers["Idempotent-Replayed"] = "true"
        return job_out(job)

    @router.get("", response_model=JobList, summary="List jobs, newest first")
    async def list_jobs(
        request: Request,
        store: Store,
        tenant: Tenant,
        status: Annotated[
            str | None, Query(description="Filter: " + ", ".join(JOB_STATUSES))
        ] = None,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        cursor: Annotated[str | None, Query(max_length=512)] = None,
    ) -> Any:
        from jobstore import InvalidCursor

        if status is not None and status not in JOB_STATUSES:
            raise APIError(
                422, "invalid_request", f"status must be one of {', '.join(JOB_STATUSES)}", "status"
            )
        try:
            jobs, next_cursor = await in_store(
                request,
                lambda: store.list_jobs(tenant.id, status=status, limit=limit, cursor=cursor),
            )
        except InvalidCursor:
            raise APIError(422, "invalid_cursor", "cursor is not valid", "cursor") from None
        return JobList(data=[job_out(j) for j in jobs], next_cursor=next_cursor)

    @router.get("/{job_id}", response_model=JobOut, summary="Get a job")
    async def get_job(job_id: str, request: Request, tenant: Tenant) -> Any:
        return job_out(await tenant_job(request, tenant, job_id))

    @router.post("/{job_id}/cancel", response_model=JobOut, summary="Cancel a job")
    async def cancel_job(job_id: str, request: Request, store: Store, tenant: Tenant) -> Any:
        """A queued job is cancelled at once; a running one moves to `cancelling` and stops at its
        next step boundary (keeping a checkpoint). Cancelling a finished job changes nothing."""
        job = None
        if JOB_ID.fullmatch(job_id):
            job = await in_store(request, lambda: store.request_cancel(job_id, tenant_id=tenant.id))
        if job is None:
            raise APIError(404, "job_not_found", f"no job {job_id!r}", "job_id")
        return job_out(job)

    @router.get("/{job_id}/metrics", response_model=MetricsOut, summary="Training metrics")
    async def get_metrics(
        job_id: str,
        request: Request,
        store: Store,
        tenant: Tenant,
        name: Annotated[
            list[Annotated[str, StringConstraints(min_length=1, max_length=200)]] | None,
            Query(max_length=100, description="Metric names (repeatable); all if omitted"),
        ] = None,
        step_min: Annotated[int | None, Query(ge=0, le=MAX_INT32)] = None,
        step_max: Annotated[int | None, Query(ge=0, le=MAX_INT32)] = None,
        max_points: Annotated[
            int | None, Query(ge=2, le=10_000, description="Downsample long runs")
        ] = None,
    ) -> Any:
        job = await tenant_job(request, tenant, job_id)
        if name and (where := find_unstorable_text(name)) is not None:
            raise APIError(
                422, "invalid_request", "name: NUL characters are not allowed", f"name.{where}"
            )
        if step_min is not None and step_max is not None and step_min > step_max:
            raise APIError(422, "invalid_request", "step_min must be <= step_max", "step_min")
        cache: MetricsCache = request.app.state.metrics_cache
        # A worker bumps the job's updated_at after every metrics write, so (updated_at,
        # status) versions the job's metrics: a dashboard polling a job reads the store only
        # when something new was recorded.
        key = (
            job.id,
            job.updated_at,
            job.status,
            tuple(name or ()),
            step_min,
            step_max,
            max_points,
        )
        body = cache.get(key)
        if body is None:
            series = await in_store(
                request,
                lambda: store.query_metrics(
                    job_id, names=name, step_min=step_min, step_max=step_max, max_points=max_points
                ),
            )
            out = {
                metric: MetricSeries(steps=[p[0] for p in points], values=[p[1] for p in points])
                for metric, points in series.items()
            }
            body = MetricsOut(job_id=job_id, metrics=out, max_points=max_points).model_dump_json()
            cache.put(key, body.encode())
            return Response(body, media_type="application/json")
        return Response(body, media_type="application/json")

    @router.get(
        "/{job_id}/events",
        response_model=EventList,
        summary="Job events (JSON, or a live text/event-stream)",
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def get_events(
        job_id: str,
        request: Request,
        store: Store,
        tenant: Tenant,
        after_id: Annotated[int, Query(ge=0, le=MAX_INT64)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
        stream: Annotated[
            bool, Query(description="Stream as SSE (same as Accept: text/event-stream)")
        ] = False,
        last_event_id: Annotated[
            str | None,
            Header(
                pattern=r"^[0-9]{1,19}$",
                max_length=19,
                description="Resume a stream after this event id.",
            ),
        ] = None,
    ) -> Any:
        await tenant_job(request, tenant, job_id)
        if last_event_id and int(last_event_id) > MAX_INT64:
            raise APIError(
                422, "invalid_request", "Last-Event-ID: not an event id", "Last-Event-ID"
            )
        wants_stream = stream or "text/event-stream" in request.headers.get("accept", "")
        if not wants_stream:
            events = await in_store(
                request, lambda: store.list_events(job_id, after_id=after_id, limit=limit)
            )
            return EventList(data=[_event_out(e) for e in events])
        start = after_id
        if last_event_id:
            start = max(start, int(last_event_id))
        return StreamingResponse(
            _event_stream(request, store, job_id, start),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @router.get("/{job_id}/checkpoints", response_model=CheckpointList, summary="Checkpoints")
    async def get_checkpoints(job_id: str, request: Request, store: Store, tenant: Tenant) -> Any:
        await tenant_job(request, tenant, job_id)
        checkpoints = await in_store(request, lambda: store.list_checkpoints(job_id))
        return CheckpointList(
            data=[
                CheckpointOut(step=c.step, uri=c.uri, created_at=c.created_at) for c in checkpoints
            ]
        )

    @router.get(
        "/{job_id}/adapter",
        summary="Download the trained adapter (PEFT format, .tar.gz)",
        responses={
            200: {"content": {"application/gzip": {}}},
            409: {"model": ErrorResponse, "description": "The job has no adapter yet"},
        },
    )
    async def get_adapter(job_id: str, request: Request, tenant: Tenant) -> Any:
        job = await tenant_job(request, tenant, job_id)
        if job.status != "succeeded" or not job.adapter_uri:
            raise APIError(
                409,
                "adapter_not_ready",
                f"job is {job.status}; the adapter exists once it succeeded",
            )
        archive = await run_in_threadpool(_tar_directory, job.adapter_uri)
        return StreamingResponse(
            _iter_file(archive),
            media_type="application/gzip",
            headers={"Content-Disposition": f'attachment; filename="{job_id}-adapter.tar.gz"'},
        )

    return router


def _bad_text(text: str) -> bool:
    """NUL (PostgreSQL text cannot hold it) or an unpaired surrogate (not encodable as UTF-8)."""
    if "\x00" in text:
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def find_unstorable_text(value: Any, path: str = "") -> str | None:
    """Dotted path of the first string (or key) the store cannot keep, or None."""
    if isinstance(value, str):
        return (path or "(body)") if _bad_text(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if _bad_text(str(key)):
                return path or "(body)"
            if (found := find_unstorable_text(item, where)) is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            where = f"{path}.{index}" if path else str(index)
            if (found := find_unstorable_text(item, where)) is not None:
                return found
    return None


async def check_queue_quota(request: Request, tenant: Any) -> None:
    """429 ``quota_exceeded`` when the tenant has as many queued jobs and evals as allowed."""
    limit = request.app.state.settings.max_queued_jobs_per_tenant
    store = request.app.state.store
    queued = await in_store(request, lambda: store.count_queued(tenant.id))
    if queued >= limit:
        raise APIError(
            429,
            "quota_exceeded",
            f"this tenant has {queued} queued jobs and evals (at most {limit}); submit more "
            "once some have started",
            headers={"Retry-After": "30"},
        )


def _body_examples() -> Any:
    from fastapi import Body

    return Body(
        openapi_examples={
            "minimal": {
                "summary": "Only the required fields (paper defaults)",
                "value": MINIMAL_EXAMPLE,
            },
            "full": {"summary": "Every group set explicitly", "value": FULL_EXAMPLE},
        }
    )


def _event_out(event: Any) -> EventOut:
    return EventOut(
        id=event.id,
        kind=event.kind,
        message=event.message,
        data=event.data or {},
        created_at=event.created_at,
    )


class MetricsCache:
    """A small per-process LRU of serialized metrics answers, bounded in bytes."""

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[Any, ...], bytes] = OrderedDict()
        self._size = 0

    def get(self, key: tuple[Any, ...]) -> bytes | None:
        body = self._entries.get(key)
        if body is not None:
            self._entries.move_to_end(key)
        return body

    def put(self, key: tuple[Any, ...], body: bytes) -> None:
        if len(body) > self.max_bytes // 4:
            return
        if key in self._entries:
            self._size -= len(self._entries.pop(key))
        self._entries[key] = body
        self._size += len(body)
        while self._size > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._size -= len(old)


def _sse(event: Any) -> bytes:
    payload = _event_out(event).model_dump_json()
    return f"id: {event.id}\nevent: {event.kind}\ndata: {payload}\n\n".encode()


async def _event_stream(
    request: Request, store: Any, job_id: str, after_id: int
) -> AsyncIterator[bytes]:
    """SSE: every event after `after_id`, then new ones as they happen, until the job is final."""
    last = after_id
    yield b"retry: 2000\n\n"
    while True:
        events = await run_in_threadpool(store.list_events, job_id, after_id=last, limit=500)
        for event in events:
            last = event.id
            yield _sse(event)
        if events:
            continue
        job = await run_in_threadpool(store.get_job, job_id)
        if job is None or job.status in TERMINAL:
            # one last read, so nothing written just before the final state is lost
            for event in await run_in_threadpool(
                store.list_events, job_id, after_id=last, limit=500
            ):
                last = event.id
                yield _sse(event)
            yield b"event: end\ndata: {}\n\n"
            return
        if await request.is_disconnected():
            return
        yield b": keep-alive\n\n"
        await asyncio.sleep(SSE_POLL_SECONDS)


def _tar_directory(uri: str) -> Any:
    """A gzipped tar of the adapter directory (local or any fsspec URI), spooled to disk."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    # streamed to the client and closed by _iter_file
    spool = tempfile.SpooledTemporaryFile(max_size=32 * 1024 * 1024)  # noqa: SIM115
    with tarfile.open(fileobj=spool, mode="w:gz") as tar:
        for path in sorted(fs.find(root)):
            relative = path[len(root.rstrip("/")) + 1 :]
            info = tarfile.TarInfo(name=f"adapter/{relative}")
            info.size = fs.size(path)
            # TarInfo defaults to mtime 0 (files unpack dated 1970) and mode 0644: keep the
            # file's own time; the mode stays 0644 whatever the writer's umask made it.
            info.mtime = int(_modified(fs, path))
            with fs.open(path, "rb") as handle:
                tar.addfile(info, handle)
    spool.seek(0)
    return spool


def _modified(fs: Any, path: str) -> float:
    """The file's modification time in epoch seconds (now when the filesystem cannot say)."""
    import time

    try:
        return fs.modified(path).timestamp()
    except (NotImplementedError, AttributeError, OSError, ValueError):
        return time.time()


async def _iter_file(handle: Any, chunk: int = 1 << 20) -> AsyncIterator[bytes]:
    try:
        while data := await run_in_threadpool(handle.read, chunk):
            yield data
    finally:
        handle.close()
