"""Response schemas of the HTTP API (the request body of `POST /jobs` is the engine's JobSpec)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

JobStatus = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]


class ErrorDetail(BaseModel):
    code: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class JobErrorOut(BaseModel):
    code: str = Field(examples=["dataset_error"])
    message: str = Field(examples=["train.jsonl, line 3, field 'problem': missing"])
    category: Literal["user", "system"]


class EvalProgressOut(BaseModel):
    """How far a running evaluation is (of a job's spec `eval` group, or of `POST .../evals`)."""

    role: Literal["adapter", "base"] = Field(
        description="adapter: the trained student; base: the base model (adapter off)"
    )
    done: int = Field(description="Problems sampled so far")
    total: int = Field(description="Problems in the benchmark")
    samples_per_s: float = Field(0.0, description="Samples (n per problem) per second so far")
    step: int | None = Field(None, description="The training step evaluated (job evals)")


class Progress(BaseModel):
    step: int
    total_steps: int | None
    eval: EvalProgressOut | None = Field(
        None,
        description="Set while the job evaluates (its spec's `eval` group) between steps.",
    )


class JobOut(BaseModel):
    id: str = Field(examples=["job_01JD3Y7K8Q2T4V6X8Z0B2D4F6H"])
    object: Literal["job"] = "job"
    status: JobStatus
    attempt: int
    progress: Progress
    error: JobErrorOut | None
    adapter_uri: str | None
    spec: dict[str, Any]
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobOut]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page.")


class MetricSeries(BaseModel):
    steps: list[int]
    values: list[float | None]


class MetricsOut(BaseModel):
    job_id: str
    metrics: dict[str, MetricSeries]
    max_points: int | None = Field(
        None, description="When set, each series holds at most this many points (bucket means)."
    )


class EventOut(BaseModel):
    id: int
    kind: str
    message: str
    data: dict[str, Any]
    created_at: datetime | None


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventOut]


class CheckpointOut(BaseModel):
    step: int
    uri: str
    created_at: datetime


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CheckpointOut]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)


def job_out(job: Any) -> JobOut:
    """Convert a `jobstore.JobRecord` into the public job object."""
    return JobOut(
        id=job.id,
        status=job.status,
        attempt=job.attempt,
        progress=Progress(
            step=job.progress_step, total_steps=job.total_steps, eval=_eval_activity(job)
        ),
        error=JobErrorOut(**job.error.to_dict()) if job.error else None,
        adapter_uri=job.adapter_uri,
        spec=job.spec,
        metadata=job.metadata,
        created_at=job.created_at,
        updated_at=job.updated_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


def _eval_activity(job: Any) -> EvalProgressOut | None:
    """The eval a running job is doing, from its `activity` (stale once the job stopped)."""
    activity = getattr(job, "activity", None)
    if not activity or activity.get("kind") != "eval" or job.status not in ("running",):
        return None
    try:
        return EvalProgressOut.model_validate(activity, strict=False)
    except ValueError:
        return None
