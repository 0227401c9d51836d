"""The SDK's exceptions: one class per HTTP error status, plus transport and job-outcome errors.

Every error the service answers is `{"error": {"code", "message", "param"}}`; `APIStatusError`
carries those three plus the HTTP status, and its subclass is chosen by the status
(`NotFoundError` for 404, `ConflictError` for 409, ...). Failures to reach the service at all are
`APIConnectionError` (`APITimeoutError` for timeouts). `Job.wait()` and `Eval.wait()` raise
`JobFailedError`, `JobCancelledError`, `EvalFailedError` or `WaitTimeoutError`.

    try:
        client.jobs.retrieve("job_missing")
    except opsd_client.NotFoundError as exc:
        print(exc.status, exc.code, exc.param)   # 404 job_not_found job_id
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from opsd_client.models import AsyncEval, AsyncJob, Eval, Job

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "EvalFailedError",
    "InternalServerError",
    "JobCancelledError",
    "JobFailedError",
    "NotFoundError",
    "OPSDError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestTooLargeError",
    "ServiceUnavailableError",
    "UnprocessableEntityError",
    "WaitTimeoutError",
]


class OPSDError(Exception):
    """Base class of every exception the SDK raises."""


class APIError(OPSDError):
    """A request to the service did not succeed (an error answer or no answer at all)."""

    def __init__(self, message: str, *, request: httpx.Request | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request = request


class APIConnectionError(APIError):
    """The service could not be reached (refused, reset, DNS...), after the allowed retries."""

    def __init__(self, message: str = "could not reach the service", **kwargs: Any) -> None:
        super().__init__(message, **kwargs)


class APITimeoutError(APIConnectionError):
    """The request timed out, after the allowed retries."""

    def __init__(self, message: str = "the request timed out", **kwargs: Any) -> None:
        super().__init__(message, **kwargs)


class APIStatusError(APIError):
    """The service answered with an error status; `code`, `message`, `param` come from its body."""

    status: int

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: str,
        param: str | None = None,
        response: httpx.Response | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message, request=response.request if response is not None else None)
        self.status = status
        self.code = code
        self.param = param
        self.response = response
        self.body = body

    def __str__(self) -> str:
        where = f" (param: {self.param})" if self.param else ""
        return f"{self.status} {self.code}: {self.message}{where}"

    def __reduce__(self) -> Any:  # picklable without the httpx response
        args = (type(self), self.message, self.status, self.code, self.param)
        return (_rebuild_status_error, args)


def _rebuild_status_error(
    cls: type[APIStatusError], message: str, status: int, code: str, param: str | None
) -> APIStatusError:
    return cls(message, status=status, code=code, param=param)


class BadRequestError(APIStatusError):
    """400: a malformed request (invalid JSON, a bad cursor)."""


class AuthenticationError(APIStatusError):
    """401: the API key is missing or not valid."""


class PermissionDeniedError(APIStatusError):
    """403: the key may not do this."""


class NotFoundError(APIStatusError):
    """404: no such resource for this tenant (another tenant's ids look missing too)."""


class ConflictError(APIStatusError):
    """409: the request conflicts with the resource's state (e.g. an Idempotency-Key reused with
    another body, or an adapter asked for before the job succeeded)."""


class RequestTooLargeError(APIStatusError):
    """413: the request body is over the service's limit."""


class UnprocessableEntityError(APIStatusError):
    """422: a field is invalid; `param` names it as a dotted path (`optim.learning_rate`)."""


class RateLimitError(APIStatusError):
    """429: too many requests (retried automatically before this is raised)."""


class InternalServerError(APIStatusError):
    """5xx: the service failed (safe calls were retried before this is raised)."""


class ServiceUnavailableError(InternalServerError):
    """503: the service or its queue is unavailable right now."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: RequestTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def error_for_response(response: httpx.Response) -> APIStatusError:
    """The exception for an error response, read from the standard error body when present."""
    status = response.status_code
    body: Any = None
    code, message, param = "error", "", None
    try:
        body = response.json()
    except ValueError:
        message = response.text[:500]
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        detail = body["error"]
        code = str(detail.get("code") or code)
        message = str(detail.get("message") or "")
        param = detail.get("param")
    if not message:
        message = response.reason_phrase or f"HTTP {status}"
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = InternalServerError if status >= 500 else APIStatusError
    return cls(message, status=status, code=code, param=param, response=response, body=body)


class JobFailedError(OPSDError):
    """The job ended `failed`; `code`, `message`, `category` are the server's reason."""

    def __init__(self, job: Job | AsyncJob) -> None:
        error = job.error
        self.job = job
        self.code = error.code if error else "failed"
        self.reason = error.message if error else "the job failed"
        self.category = error.category if error else None
        super().__init__(f"job {job.id} failed: {self.code}: {self.reason}")


class JobCancelledError(OPSDError):
    """The job ended `cancelled`; `reason` is the server's account of it."""

    def __init__(self, job: Job | AsyncJob, reason: str | None = None) -> None:
        self.job = job
        self.reason = reason or "the job was cancelled"
        super().__init__(f"job {job.id} was cancelled: {self.reason}")


class EvalFailedError(OPSDError):
    """The evaluation ended `failed`; `reason` is the server's message."""

    def __init__(self, evaluation: Eval | AsyncEval) -> None:
        self.eval = evaluation
        error = evaluation.error
        if isinstance(error, str):
            self.reason = error
        elif error is not None:
            self.reason = f"{error.code}: {error.message}"
        else:
            self.reason = "the evaluation failed"
        super().__init__(f"eval {evaluation.id} failed: {self.reason}")


class WaitTimeoutError(OPSDError, TimeoutError):
    """`wait(timeout=...)` ran out before the job or eval finished; `last` is what was seen."""

    def __init__(self, what: str, timeout: float, last: Any) -> None:
        self.last = last
        self.timeout = timeout
        status = getattr(last, "status", "unknown")
        super().__init__(f"{what} still {status} after {timeout:g}s")
