"""`client.evals`: evaluations of a job's adapter (`POST /jobs/{id}/evals`,
`GET /jobs/{id}/evals`, `GET /evals/{id}`) and waiting for one to finish; `Evals` for `Client`,
`AsyncEvals` for `AsyncClient`.

An eval samples `n` answers per benchmark problem and reports avg@n / pass@k for the trained
adapter (and for the base model with `include_base=True`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

from opsd_client.errors import EvalFailedError, WaitTimeoutError
from opsd_client.models import AsyncEval, AsyncEvalList, Eval, EvalList
from opsd_client.resources.jobs import job_path, new_idempotency_key

if TYPE_CHECKING:
    from opsd_client._client import AsyncClient, Client


def eval_body(**fields: Any) -> dict[str, Any]:
    """The request body: only the fields that were given (the server fills in the rest)."""
    return {name: value for name, value in fields.items() if value is not None}


def eval_path(eval_id: str) -> str:
    return f"/evals/{quote(eval_id, safe='')}"


class Evals:
    """Evaluations of trained adapters."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def _eval(self, response: httpx.Response) -> Eval:
        evaluation = Eval.model_validate(response.json())
        evaluation._client = self._client
        return evaluation

    def create(
        self,
        job_id: str,
        *,
        dataset_uri: str | None = None,
        problem_field: str | None = None,
        answer_field: str | None = None,
        limit: int | None = None,
        n: int | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        thinking: bool | None = None,
        include_base: bool | None = None,
        checkpoint_step: int | None = None,
        idempotency_key: str | None = None,
    ) -> Eval:
        """Start an evaluation of the job's adapter (`POST /jobs/{id}/evals`); unset fields take
        the job's `eval` settings or the paper's defaults. An `Idempotency-Key` is generated when
        none is given, so a retried request cannot start two evals."""
        body = eval_body(
            dataset_uri=dataset_uri,
            problem_field=problem_field,
            answer_field=answer_field,
            limit=limit,
            n=n,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            thinking=thinking,
            include_base=include_base,
            checkpoint_step=checkpoint_step,
        )
        response = self._client._http_api.request(
            "POST",
            job_path(job_id, "/evals"),
            json=body,
            headers={"Idempotency-Key": idempotency_key or new_idempotency_key()},
            idempotent=True,  # the key makes a retried request return the same eval
        )
        return self._eval(response)

    def list(self, job_id: str) -> list[Eval]:
        """`GET /jobs/{id}/evals`: the job's evaluations, oldest first."""
        response = self._client._http_api.request("GET", job_path(job_id, "/evals"))
        page = EvalList.model_validate(response.json())
        for evaluation in page.data:
            evaluation._client = self._client
        return page.data

    def retrieve(self, eval_id: str) -> Eval:
        """`GET /evals/{id}`."""
        return self._eval(self._client._http_api.request("GET", eval_path(eval_id)))

    def wait(
        self,
        eval_id: str,
        *,
        timeout: float | None = None,
        poll: float = 2.0,
        on_update: Callable[[Eval], None] | None = None,
    ) -> Eval:
        """Poll until the eval is final; return it when it succeeded, else raise
        `EvalFailedError` (or `WaitTimeoutError` after `timeout` seconds). `on_update` is called
        with every polled eval (its `progress` says how far sampling is)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            evaluation = self.retrieve(eval_id)
            if on_update is not None:
                on_update(evaluation)
            if evaluation.status == "succeeded":
                return evaluation
            if evaluation.status == "failed":
                raise EvalFailedError(evaluation)
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeoutError(f"eval {eval_id}", timeout or 0.0, evaluation)
                time.sleep(min(poll, left))
            else:
                time.sleep(poll)


class AsyncEvals:
    """Evaluations of trained adapters, awaitable; the same methods as `Evals`."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    def _eval(self, response: httpx.Response) -> AsyncEval:
        evaluation = AsyncEval.model_validate(response.json())
        evaluation._client = self._client
        return evaluation

    async def create(
        self,
        job_id: str,
        *,
        dataset_uri: str | None = None,
        problem_field: str | None = None,
        answer_field: str | None = None,
        limit: int | None = None,
        n: int | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        thinking: bool | None = None,
        include_base: bool | None = None,
        checkpoint_step: int | None = None,
        idempotency_key: str | None = None,
    ) -> AsyncEval:
        """Start an evaluation; see `Evals.create`."""
        body = eval_body(
            dataset_uri=dataset_uri,
            problem_field=problem_field,
            answer_field=answer_field,
            limit=limit,
            n=n,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            thinking=thinking,
            include_base=include_base,
            checkpoint_step=checkpoint_step,
        )
        response = await self._client._http_api.request(
            "POST",
            job_path(job_id, "/evals"),
            json=body,
            headers={"Idempotency-Key": idempotency_key or new_idempotency_key()},
            idempotent=True,  # the key makes a retried request return the same eval
        )
        return self._eval(response)

    async def list(self, job_id: str) -> list[AsyncEval]:
        """`GET /jobs/{id}/evals`: the job's evaluations, oldest first."""
        response = await self._client._http_api.request("GET", job_path(job_id, "/evals"))
        page = AsyncEvalList.model_validate(response.json())
        for evaluation in page.data:
            evaluation._client = self._client
        return page.data

    async def retrieve(self, eval_id: str) -> AsyncEval:
        return self._eval(await self._client._http_api.request("GET", eval_path(eval_id)))

    async def wait(
        self,
        eval_id: str,
        *,
        timeout: float | None = None,
        poll: float = 2.0,
        on_update: Callable[[AsyncEval], None] | None = None,
    ) -> AsyncEval:
        """Poll until the eval is final; see `Evals.wait`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            evaluation = await self.retrieve(eval_id)
            if on_update is not None:
                on_update(evaluation)
            if evaluation.status == "succeeded":
                return evaluation
            if evaluation.status == "failed":
                raise EvalFailedError(evaluation)
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeoutError(f"eval {eval_id}", timeout or 0.0, evaluation)
                await asyncio.sleep(min(poll, left))
            else:
                await asyncio.sleep(poll)
