"""Usage route: `GET /usage?start=&end=`, what the caller's tenant consumed over a time range.

Sums of the usage ledger (:mod:`jobstore.usage`): device-seconds, rollout tokens generated,
tokens scored by the teacher and by the student, and tokens of the jobs' own evaluations, in
total and per job, for the ledger rows recorded in ``[start, end)``. Times are ISO 8601; one
without a zone is UTC. ``end`` defaults to now and ``start`` to 30 days before ``end``; a range
that is empty, reversed or longer than 366 days is a 422 naming the parameter.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from api.deps import Store, Tenant, in_store
from api.errors import APIError
from api.schemas import ErrorResponse

router = APIRouter(
    tags=["usage"],
    responses={401: {"model": ErrorResponse, "description": "Missing or invalid API key"}},
)

DEFAULT_RANGE = timedelta(days=30)
MAX_RANGE = timedelta(days=366)


class UsageTotals(BaseModel):
    steps: int = Field(description="Optimizer steps recorded.")
    device_seconds: float = Field(description="Training step time x processes, plus evals.")
    generated_tokens: int = Field(description="Rollout tokens sampled.")
    teacher_scored_tokens: int = Field(description="Prompt + rollout tokens the teacher scored.")
    student_scored_tokens: int = Field(description="Prompt + rollout tokens the student scored.")
    eval_tokens: int = Field(description="Tokens of the jobs' own evaluation samples.")


class JobUsageOut(UsageTotals):
    job_id: str


class UsageOut(BaseModel):
    object: Literal["usage"] = "usage"
    start: datetime
    end: datetime
    totals: UsageTotals
    jobs: list[JobUsageOut]


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@router.get(
    "/usage",
    response_model=UsageOut,
    summary="The tenant's usage over a time range, in total and per job",
    responses={422: {"model": ErrorResponse, "description": "Bad time range; `param` names it"}},
)
async def get_usage(
    request: Request,
    store: Store,
    tenant: Tenant,
    start: Annotated[
        datetime | None, Query(description="ISO 8601, inclusive; default end - 30 days")
    ] = None,
    end: Annotated[datetime | None, Query(description="ISO 8601, exclusive; default now")] = None,
) -> Any:
    try:
        until = _utc(end) if end is not None else datetime.now(UTC)
        since = _utc(start) if start is not None else until - DEFAULT_RANGE
    except (OverflowError, ValueError) as exc:  # e.g. year 1 minus a zone offset
        raise APIError(422, "invalid_request", f"time out of range: {exc}", "start") from None
    if since >= until:
        raise APIError(422, "invalid_request", "start must be before end", "start")
    if until - since > MAX_RANGE:
        raise APIError(422, "invalid_request", "the range is at most 366 days", "end")
    records = await in_store(request, lambda: store.usage(tenant.id, start=since, end=until))
    per_job = [
        JobUsageOut(
            job_id=r.job_id,
            steps=r.steps,
            device_seconds=r.device_seconds,
            generated_tokens=r.generated_tokens,
            teacher_scored_tokens=r.teacher_scored_tokens,
            student_scored_tokens=r.student_scored_tokens,
            eval_tokens=r.eval_tokens,
        )
        for r in records
    ]
    fields = UsageTotals.model_fields
    totals = UsageTotals(**{name: sum(getattr(j, name) for j in per_job) for name in fields})
    return UsageOut(start=since, end=until, totals=totals, jobs=per_job)
