"""Eval routes: `POST /jobs/{id}/evals`, `GET /jobs/{id}/evals`, `GET /evals/{id}`.

An eval scores a job's trained adapter (the final one, or a checkpoint's with
``checkpoint_step``) on a benchmark file with ``problem``/``answer`` fields: ``n`` samples per
problem, avg@n, pass@k for every k in 1..n, majority vote, per-problem rows, optionally the base
model (adapter off) in the same run. The worker runs it (`opsd.run_eval`) against the inference
server (`OPSD_INFERENCE_URL`) or in-process. Routes are thin; another tenant's job or eval is a
404, like a missing one.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from functools import partial
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Header, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.datasets import check_dataset, eval_dataset
from api.deps import Settings, Store, Tenant, in_store, tenant_job
from api.errors import APIError
from api.resources import job_gpus
from api.routes.jobs import IDEMPOTENCY_KEY_PATTERN, check_queue_quota, find_unstorable_text
from api.schemas import ErrorResponse, EvalProgressOut, JobErrorOut
from api.subtasks import enqueue_or_take_back, progress_or_none

EvalStatus = Literal["queued", "running", "succeeded", "failed"]
_EVAL_ID = re.compile(r"eval_[A-Za-z0-9]{1,64}")

EXAMPLE = {
    "dataset_uri": "file-01jd3y7k8q2t4v6x8z0b2d4f6h",
    "n": 16,
    "max_new_tokens": 2048,
    "temperature": 0.6,
    "top_p": 0.95,
    "thinking": True,
    "include_base": True,
}


class EvalRequest(BaseModel):
    """The body of `POST /jobs/{id}/evals` (paper Table 5 sampling by default).

    Fields left out take the job's `eval` group's values when its spec has one with a
    `dataset_uri`, else the defaults below.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    dataset_uri: str | None = Field(
        None,
        min_length=1,
        max_length=2048,
        description="Benchmark: an uploaded file's id (`file-...`) or a location the "
        "deployment's policy allows; required unless the job's spec has an `eval` group with one.",
    )
    problem_field: str = Field("problem", min_length=1, max_length=256)
    answer_field: str = Field(
        "answer",
        min_length=1,
        max_length=256,
        description="Column or dotted path. Rows without `answer` use the solution's last "
        "\\boxed{}; any other name must be in every row.",
    )
    limit: int | None = Field(None, ge=1, le=1_000_000, description="Only the first N problems.")
    n: int = Field(16, ge=1, le=256, description="Samples per problem.")
    max_new_tokens: int = Field(2048, ge=1, le=32768)
    temperature: float = Field(0.6, ge=0.0, le=10.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1_000_000, description="0 disables top-k.")
    thinking: bool | None = Field(None, description="enable_thinking; null: as in training.")
    include_base: bool = Field(False, description="Also evaluate the base model (no adapter).")
    checkpoint_step: int | None = Field(
        None,
        ge=0,
        le=2**31 - 1,
        description="Evaluate this checkpoint's adapter; null: the final adapter.",
    )

    @field_validator("dataset_uri", "problem_field", "answer_field")
    @classmethod
    def _clean(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if find_unstorable_text(value) is not None:
            raise ValueError("NUL characters and unpaired surrogates are not allowed")
        if not value.strip():
            raise ValueError("must not be blank")
        return value.strip()


class EvalOut(BaseModel):
    id: str = Field(examples=["eval_01JD3Y7K8Q2T4V6X8Z0B2D4F6H"])
    object: Literal["eval"] = "eval"
    job_id: str
    status: EvalStatus
    config: dict[str, Any]
    results: dict[str, Any] | None = Field(
        None,
        description='{"adapter": summary, "base": summary | null}; a summary has n_problems, '
        "n_samples, avg_at_n, pass_at_k {k: value}, majority_vote and per-problem rows.",
    )
    error: JobErrorOut | None
    progress: EvalProgressOut | None = Field(
        None,
        description="While running (and kept after): which model is sampled, problems done of "
        "total, samples per second.",
    )
    created_at: datetime
    finished_at: datetime | None


class EvalList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EvalOut]


def eval_out(record: Any) -> EvalOut:
    return EvalOut(
        id=record.id,
        job_id=record.job_id,
        status=record.status,
        config=record.config,
        results=record.results,
        error=JobErrorOut(**record.error.to_dict()) if record.error else None,
        progress=progress_or_none(EvalProgressOut, getattr(record, "progress", None)),
        created_at=record.created_at,
        finished_at=record.finished_at,
    )


def _with_job_defaults(body: EvalRequest, spec: dict[str, Any]) -> EvalRequest:
    """Fields the request leaves unset take the job's `eval` group's values, when it has one."""
    job_eval = spec.get("eval") or {}
    if not job_eval.get("dataset_uri"):
        return body
    inherited = {
        name: job_eval[name]
        for name in EvalRequest.model_fields
        if name not in body.model_fields_set and name in job_eval
    }
    return body.model_copy(update=inherited) if inherited else body


def _enqueue_eval(request: Request, eval_id: str, gpus: int = 1) -> None:
    """Send `opsd.run_eval` to the queue of the evaluated job's resource class; the app may
    carry its own sender (`app.state.enqueue_eval`, taking the eval id)."""
    state = request.app.state
    send = getattr(state, "enqueue_eval", None)
    if send is None:
        from worker.queue import enqueue_eval, make_celery

        celery = make_celery(state.settings)
        send = lambda eval_id, gpus=1: enqueue_eval(celery, eval_id, gpus=gpus)  # noqa: E731
        state.enqueue_eval, state.enqueue_eval_routes = send, True
    if getattr(state, "enqueue_eval_routes", False):
        send(eval_id, gpus)
    else:
        send(eval_id)


def build_router() -> APIRouter:
    router = APIRouter(
        tags=["evals"],
        responses={
            401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
            404: {"model": ErrorResponse, "description": "No such job or eval for this tenant"},
        },
    )

    @router.post(
        "/jobs/{job_id}/evals",
        status_code=201,
        response_model=EvalOut,
        summary="Evaluate a job's adapter on a benchmark",
        responses={
            200: {
                "model": EvalOut,
                "description": "Replay of an earlier request with the same Idempotency-Key",
            },
            409: {
                "model": ErrorResponse,
                "description": "No adapter (yet), no such checkpoint, or an Idempotency-Key "
                "reused with another body",
            },
            422: {"model": ErrorResponse, "description": "Invalid body; `param` names the field"},
            429: {"model": ErrorResponse, "description": "Rate limit or queued-work quota"},
            503: {"model": ErrorResponse, "description": "Queue or store unavailable"},
        },
    )
    async def create_eval(
        job_id: str,
        request: Request,
        response: Response,
        store: Store,
        tenant: Tenant,
        settings: Settings,
        body: Annotated[
            EvalRequest, Body(openapi_examples={"paper": {"summary": "avg@16", "value": EXAMPLE}})
        ],
        idempotency_key: Annotated[
            str | None,
            Header(
                min_length=1,
                max_length=255,
                pattern=IDEMPOTENCY_KEY_PATTERN,
                description="Retries with the same key return the same eval.",
            ),
        ] = None,
    ) -> Any:
        """Queue an eval of the final adapter (the job must have succeeded) or of the checkpoint
        at `checkpoint_step`. Poll `GET /evals/{id}` for avg@n, pass@k and per-problem rows."""
        job = await tenant_job(request, tenant, job_id)
        body = _with_job_defaults(body, job.spec)
        if body.dataset_uri is None:
            raise APIError(
                422,
                "invalid_request",
                "dataset_uri: required field is missing (the job's spec has no eval.dataset_uri)",
                "dataset_uri",
            )
        await check_dataset(request, tenant, eval_dataset(body))
        if body.checkpoint_step is None:
            if job.status != "succeeded" or not job.adapter_uri:
                raise APIError(
                    409,
                    "adapter_not_ready",
                    f"job is {job.status}; its final adapter exists once it succeeded "
                    "(or evaluate a checkpoint with checkpoint_step)",
                    "job_id",
                )
        else:
            checkpoints = await in_store(request, lambda: store.list_checkpoints(job_id))
            if not any(c.step == body.checkpoint_step for c in checkpoints):
                steps = [c.step for c in checkpoints]
                raise APIError(
                    409,
                    "checkpoint_not_found",
                    f"job has no checkpoint at step {body.checkpoint_step} (it has {steps})",
                    "checkpoint_step",
                )
        config = body.model_dump(mode="json")
        request_hash = hashlib.sha256(
            json.dumps({"job_id": job_id, "config": config}, sort_keys=True).encode()
        ).hexdigest()
        from jobstore import IdempotencyConflict

        replay = None
        if idempotency_key is not None:
            replay = await in_store(
                request, lambda: store.eval_by_idempotency_key(tenant.id, idempotency_key)
            )
        if replay is None:
            await check_queue_quota(request, tenant)
        try:
            record, created = await in_store(
                request,
                lambda: store.create_eval_once(
                    tenant.id,
                    job_id,
                    config=config,
                    idempotency_key=idempotency_key,
                    request_hash=request_hash,
                ),
            )
        except IdempotencyConflict as exc:
            raise APIError(409, "idempotency_conflict", str(exc), "Idempotency-Key") from None
        if not created:
            response.status_code = 200
            response.headers["Idempotent-Replayed"] = "true"
            return eval_out(record)
        await enqueue_or_take_back(
            request,
            "eval",
            record.id,
            partial(_enqueue_eval, request, record.id, job_gpus(job.spec)),
            partial(store.discard_unqueued_eval, record.id),
        )
        return eval_out(record)

    @router.get(
        "/jobs/{job_id}/evals", response_model=EvalList, summary="A job's evals, oldest first"
    )
    async def list_evals(job_id: str, request: Request, store: Store, tenant: Tenant) -> Any:
        await tenant_job(request, tenant, job_id)
        records = await in_store(request, lambda: store.list_evals(job_id, tenant_id=tenant.id))
        return EvalList(data=[eval_out(r) for r in records])

    @router.get("/evals/{eval_id}", response_model=EvalOut, summary="Get an eval")
    async def get_eval(eval_id: str, request: Request, store: Store, tenant: Tenant) -> Any:
        record = None
        if _EVAL_ID.fullmatch(eval_id):
            record = await in_store(request, lambda: store.get_eval(eval_id, tenant_id=tenant.id))
        if record is None:
            raise APIError(404, "eval_not_found", f"no eval {eval_id!r}", "eval_id")
        return eval_out(record)

    return router
