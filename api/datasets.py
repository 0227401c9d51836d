"""Submit-time checks of what a job or eval will read: the access policy and uploaded files.

A dataset problem found here is a 422 naming the field (``dataset_uri``,
``dataset.problem_field``, ``eval.dataset_uri``, ...), not a queued job that fails later:

* every ``dataset_uri`` / ``eval.dataset_uri`` and ``base_model`` must pass the deployment's
  policy (:mod:`opsd_engine.access`; an http(s) host is resolved and must be public);
* an uploaded file (``file-...``) must be the tenant's, and is read with the engine's own loader
  with the job's field names, so a missing field or a row without a solution is named now.
  Files never change, so each (file, fields) answer is cached per process.

Other locations (policy-allowed local roots, object stores) are read by the worker only.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from api.deps import in_store
from api.errors import APIError

DNS_TIMEOUT_SECONDS = 5.0
_CACHE_ENTRIES = 1024


@dataclass(frozen=True)
class DatasetFields:
    """How a job or eval reads one dataset, and the request paths naming each part."""

    uri: str
    uri_param: str
    problem_field: str
    solution_field: str | None
    answer_field: str | None
    require_solution: bool
    limit: int | None
    params: dict[str, str]  # field name -> request path ("dataset.problem_field")


def _policy(request: Request) -> Any:
    state = request.app.state
    if getattr(state, "access_policy", None) is None:
        state.access_policy = state.settings.access_policy()
    return state.access_policy


def _invalid(param: str, message: str) -> APIError:
    return APIError(422, "invalid_request", f"{param}: {message}", param)


def check_base_model(request: Request, tenant: Any, base_model: str) -> None:
    """422 naming ``base_model`` unless the policy allows it for this tenant."""
    from opsd_engine.access import AccessDenied

    try:
        _policy(request).check_base_model(base_model, tenant.name)
    except AccessDenied as exc:
        raise _invalid("base_model", str(exc)) from None


async def check_dataset(request: Request, tenant: Any, ds: DatasetFields) -> None:
    """422 naming the field when the tenant may not read ``ds.uri`` or it does not fit."""
    from opsd_engine.access import AccessDenied

    policy = _policy(request)
    try:
        kind = await asyncio.wait_for(
            run_in_threadpool(policy.check_dataset_uri, ds.uri, tenant.name), DNS_TIMEOUT_SECONDS
        )
    except AccessDenied as exc:
        raise _invalid(ds.uri_param, str(exc)) from None
    except TimeoutError:
        raise _invalid(ds.uri_param, "its host did not resolve in time") from None
    if kind != "file":
        return
    store = request.app.state.store
    record = await in_store(request, lambda: store.get_file(ds.uri, tenant_id=tenant.id))
    if record is None:
        raise _invalid(ds.uri_param, f"no uploaded file {ds.uri!r} (see GET /files)")
    cache: OrderedDict[tuple[Any, ...], str | None] = request.app.state.file_checks
    key = (record.id, ds.problem_field, ds.solution_field, ds.answer_field)
    key += (ds.require_solution, ds.limit)
    if key not in cache:
        cache[key] = await run_in_threadpool(_problem_of, record.uri, ds)
        while len(cache) > _CACHE_ENTRIES:
            cache.popitem(last=False)
    problem = cache[key]
    if problem is not None:
        param, message = problem.split("\n", 1)
        raise _invalid(param, message.replace(record.uri, record.id))


def _problem_of(location: str, ds: DatasetFields) -> str | None:
    """``"param\\nmessage"`` of the first problem reading the file as the job will, or None."""
    from opsd_engine.data import DatasetError, load_examples

    try:
        load_examples(
            location,
            problem_field=ds.problem_field,
            solution_field=ds.solution_field,
            answer_field=ds.answer_field,
            require_solution=ds.require_solution,
            limit=ds.limit,
        )
    except DatasetError as exc:
        param = ds.params.get(exc.field or "", ds.uri_param)
        return f"{param}\n{exc}"
    return None


def job_datasets(spec: Any) -> list[DatasetFields]:
    """The datasets a job spec reads: training data, and its `eval` group's benchmark."""
    data = spec.dataset
    found = [
        DatasetFields(
            uri=spec.dataset_uri,
            uri_param="dataset_uri",
            problem_field=data.problem_field,
            solution_field=data.solution_field,
            answer_field=data.answer_field,
            require_solution=spec.method != "grpo",  # GRPO needs answers, not solutions
            limit=data.limit,
            params={
                data.problem_field: "dataset.problem_field",
                data.solution_field: "dataset.solution_field",
                **({data.answer_field: "dataset.answer_field"} if data.answer_field else {}),
            },
        )
    ]
    if spec.eval.dataset_uri:
        found.append(eval_dataset(spec.eval, prefix="eval."))
    return found


def eval_dataset(config: Any, *, prefix: str = "") -> DatasetFields:
    """The benchmark of an eval request (or of a spec's `eval` group, with ``prefix``)."""
    return DatasetFields(
        uri=config.dataset_uri,
        uri_param=f"{prefix}dataset_uri",
        problem_field=config.problem_field,
        solution_field="solution",
        answer_field=config.answer_field,
        require_solution=False,
        limit=config.limit,
        params={
            config.problem_field: f"{prefix}problem_field",
            config.answer_field: f"{prefix}answer_field",
        },
    )
