"""Python SDK of the OPSD training service (httpx + pydantic; no torch, nothing else from here).

    from opsd_client import Client

    with Client() as client:  # OPSD_BASE_URL, OPSD_API_KEY
        job = client.jobs.create(base_model="Qwen/Qwen3-4B", dataset_uri="s3://b/train.jsonl")
        for event in client.jobs.stream_events(job.id):
            print(event.kind, event.message)
        job = client.jobs.wait(job.id)             # raises JobFailedError / JobCancelledError
        print(client.jobs.metrics(job.id, names=["loss"])["loss"].values)
        client.jobs.download_adapter(job.id, "adapter/")

`AsyncClient` has the same resources with awaitable methods. Errors are `opsd_client.errors`
classes, one per HTTP status (`NotFoundError`, `ConflictError`, ...).
"""

from opsd_client._client import AsyncClient, Client
from opsd_client._pagination import AsyncPager, SyncPager
from opsd_client._version import __version__
from opsd_client.errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    EvalFailedError,
    InternalServerError,
    JobCancelledError,
    JobFailedError,
    NotFoundError,
    OPSDError,
    PermissionDeniedError,
    RateLimitError,
    RequestTooLargeError,
    ServiceUnavailableError,
    UnprocessableEntityError,
    WaitTimeoutError,
)
from opsd_client.models import (
    ApiKey,
    AsyncEval,
    AsyncJob,
    AsyncPreflight,
    Checkpoint,
    Eval,
    EvalResults,
    Event,
    File,
    Job,
    JobError,
    JobList,
    Metrics,
    MetricSeries,
    Preflight,
    PreflightCheck,
    PreflightReport,
    Progress,
)

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "ApiKey",
    "AsyncClient",
    "AsyncEval",
    "AsyncJob",
    "AsyncPager",
    "AsyncPreflight",
    "AuthenticationError",
    "BadRequestError",
    "Checkpoint",
    "Client",
    "ConflictError",
    "Eval",
    "EvalFailedError",
    "EvalResults",
    "Event",
    "File",
    "InternalServerError",
    "Job",
    "JobCancelledError",
    "JobError",
    "JobFailedError",
    "JobList",
    "MetricSeries",
    "Metrics",
    "NotFoundError",
    "OPSDError",
    "PermissionDeniedError",
    "Preflight",
    "PreflightCheck",
    "PreflightReport",
    "Progress",
    "RateLimitError",
    "RequestTooLargeError",
    "ServiceUnavailableError",
    "SyncPager",
    "UnprocessableEntityError",
    "WaitTimeoutError",
    "__version__",
]
