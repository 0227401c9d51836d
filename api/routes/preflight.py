"""Pre-flight routes: `POST /jobs/{id}/preflight`, `GET /jobs/{id}/preflight` (the latest) and
`GET /jobs/{id}/preflights` (the last 100, oldest first; an empty list when there is none).

A pre-flight measures, on a sample of the job's dataset with the prompts its trainer uses, the
privileged gap (the student's accuracy without the reference vs the teacher's with it), the
per-position divergence profile of a few student rollouts, and the alignment checks of issue
#16, each pass/warn/fail with its fix (:mod:`opsd_engine.preflight`). The worker runs it
(`opsd.run_preflight`, the jobs' queue) and stores the report on the pre-flight, `preflight/*`
metrics and `preflight_*` events on the job. Routes are thin; another tenant's job is a 404
like a missing one.
"""

from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Request
from pydantic import BaseModel, ConfigDict, Field

from api.deps import Store, Tenant, in_store, tenant_job
from api.errors import APIError
from api.routes.jobs import check_queue_quota
from api.schemas import ErrorResponse, JobErrorOut
from api.subtasks import enqueue_or_take_back, progress_or_none

PreflightStatus = Literal["queued", "running", "succeeded", "failed"]
EXAMPLE = {"sample_size": 16, "samples_per_problem": 1, "profile_rollouts": 4}


class PreflightRequest(BaseModel):
    """The body of `POST /jobs/{id}/preflight` (all optional): a field left out takes the job
    spec's `preflight` group's value (whose defaults are those below)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    sample_size: int = Field(
        16, ge=1, le=256, description="Problems sampled: the head of the trainer's first epoch."
    )
    samples_per_problem: int = Field(1, ge=1, le=16, description="Samples per problem and role.")
    profile_rollouts: int = Field(
        4, ge=1, le=32, description="Student rollouts in the per-position divergence profile."
    )
    max_new_tokens: int | None = Field(
        None, ge=1, le=32768, description="Rollout length; null: the job's max_new_tokens."
    )
    min_gap: float | None = Field(
        None,
        ge=-1.0,
        le=1.0,
        description="Smallest teacher-minus-student accuracy that passes; null: 0.10.",
    )


class PreflightProgressOut(BaseModel):
    phase: Literal["student", "teacher", "profile"]
    done: int
    total: int


class PreflightOut(BaseModel):
    id: str = Field(examples=["pf_01JD3Y7K8Q2T4V6X8Z0B2D4F6H"])
    object: Literal["preflight"] = "preflight"
    job_id: str
    status: PreflightStatus = Field(description="Of the run; the verdict is report.status.")
    config: dict[str, Any]
    report: dict[str, Any] | None = Field(
        None,
        description="status (pass|warn|fail: the worst check), checks [{name, status, message, "
        "fix, details}], student_accuracy, teacher_accuracy, gap, gap_interval, "
        "divergence_profile, profile_counts, ...",
    )
    progress: PreflightProgressOut | None = None
    error: JobErrorOut | None
    created_at: datetime
    finished_at: datetime | None


class PreflightList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PreflightOut]


def preflight_out(record: Any) -> PreflightOut:
    return PreflightOut(
        id=record.id,
        job_id=record.job_id,
        status=record.status,
        config=record.config,
        report=record.report,
        progress=progress_or_none(PreflightProgressOut, record.progress),
        error=JobErrorOut(**record.error.to_dict()) if record.error else None,
        created_at=record.created_at,
        finished_at=record.finished_at,
    )


def _enqueue_preflight(request: Request, preflight_id: str) -> None:
    """Send `opsd.run_preflight`; the app may carry its own sender
    (`app.state.enqueue_preflight`)."""
    state = request.app.state
    send = getattr(state, "enqueue_preflight", None)
    if send is None:
        from worker.queue import enqueue_preflight, make_celery

        celery = make_celery(state.settings)
        state.enqueue_preflight = send = lambda pid: enqueue_preflight(celery, pid)
    send(preflight_id)


def build_router() -> APIRouter:
    router = APIRouter(
        tags=["preflight"],
        responses={
            401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
            404: {"model": ErrorResponse, "description": "No such job (or pre-flight)"},
        },
    )

    @router.post(
        "/jobs/{job_id}/preflight",
        status_code=201,
        response_model=PreflightOut,
        summary="Run the pre-flight of a job: privileged gap and alignment checks",
        responses={
            409: {"model": ErrorResponse, "description": "A pre-flight of the job is running"},
            422: {"model": ErrorResponse, "description": "Invalid body; `param` names the field"},
            429: {"model": ErrorResponse, "description": "Rate limit or queued-work quota"},
            503: {"model": ErrorResponse, "description": "Queue or store unavailable"},
        },
    )
    async def create_preflight(
        job_id: str,
        request: Request,
        store: Store,
        tenant: Tenant,
        body: Annotated[
            PreflightRequest | None,
            Body(openapi_examples={"default": {"summary": "16 problems", "value": EXAMPLE}}),
        ] = None,
    ) -> Any:
        """Queue a pre-flight of the job's spec (any job state). Poll
        `GET /jobs/{id}/preflight` for the report; the job gets `preflight/*` metrics and
        `preflight_*` events."""
        job = await tenant_job(request, tenant, job_id)
        body = body or PreflightRequest()
        latest = await in_store(request, lambda: store.latest_preflight(job.id))
        if latest is not None and latest.status in ("queued", "running"):
            raise APIError(
                409,
                "preflight_in_progress",
                f"pre-flight {latest.id} of this job is {latest.status}; wait for it",
                "job_id",
            )
        await check_queue_quota(request, tenant)
        config = body.model_dump(mode="json", exclude_unset=True)  # the rest: the job's spec
        record = await in_store(
            request, lambda: store.create_preflight(tenant.id, job.id, config=config)
        )
        await enqueue_or_take_back(
            request,
            "preflight",
            record.id,
            partial(_enqueue_preflight, request, record.id),
            partial(store.discard_unqueued_preflight, record.id),
        )
        return preflight_out(record)

    @router.get(
        "/jobs/{job_id}/preflight",
        response_model=PreflightOut,
        summary="The job's latest pre-flight and its report",
    )
    async def get_preflight(job_id: str, request: Request, store: Store, tenant: Tenant) -> Any:
        job = await tenant_job(request, tenant, job_id)
        record = await in_store(
            request, lambda: store.latest_preflight(job.id, tenant_id=tenant.id)
        )
        if record is None:
            raise APIError(
                404,
                "preflight_not_found",
                f"job {job_id!r} has no pre-flight yet (POST /jobs/{job_id}/preflight)",
                "job_id",
            )
        return preflight_out(record)

    @router.get(
        "/jobs/{job_id}/preflights",
        response_model=PreflightList,
        summary="The job's pre-flights (the last 100), oldest first",
    )
    async def list_preflights(job_id: str, request: Request, store: Store, tenant: Tenant) -> Any:
        job = await tenant_job(request, tenant, job_id)
        records = await in_store(
            request, lambda: store.list_preflights(job.id, tenant_id=tenant.id)
        )
        return PreflightList(data=[preflight_out(r) for r in records])

    return router
