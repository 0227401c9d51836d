"""`Client` and `AsyncClient`: the SDK's entry points.

from opsd_client import Client

client = Client()  # OPSD_BASE_URL / OPSD_API_KEY from the environment
job = client.jobs.create(base_model="Qwen/Qwen3-4B", dataset_uri="s3://bucket/train.jsonl")
job = job.wait()
client.jobs.download_adapter(job.id, "adapter/")
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any

import httpx

from opsd_client._base import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, AsyncHTTP, SyncHTTP
from opsd_client.resources.evals import AsyncEvals, Evals
from opsd_client.resources.files import AsyncFiles, AsyncKeys, Files, Keys
from opsd_client.resources.jobs import AsyncJobs, Jobs
from opsd_client.resources.usage import AsyncUsage, Usage


class Client:
    """A blocking client of the OPSD training service.

    `base_url` defaults to `$OPSD_BASE_URL` (else `http://127.0.0.1:8000`), `api_key` to
    `$OPSD_API_KEY`. Safe calls are retried `max_retries` times with backoff on connection
    errors and 429/502/503/504. Use it as a context manager, or call `close()`.
    """

    jobs: Jobs
    evals: Evals
    files: Files
    keys: Keys
    usage: Usage

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        default_headers: Mapping[str, str] | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        self._http_api = SyncHTTP(
            base_url=base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            default_headers=default_headers,
            http_client=http_client,
        )
        self.jobs = Jobs(self)
        self.evals = Evals(self)
        self.files = Files(self)
        self.keys = Keys(self)
        self.usage = Usage(self)

    @property
    def base_url(self) -> str:
        return self._http_api.base_url

    @property
    def max_retries(self) -> int:
        return self._http_api.max_retries

    def __repr__(self) -> str:
        return f"Client(base_url={self.base_url!r})"

    def close(self) -> None:
        self._http_api.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncClient:
    """The asyncio client; same arguments and resources as `Client`, methods are awaitable.

    async with AsyncClient() as client:
        job = await client.jobs.create(base_model=..., dataset_uri=...)
        async for event in client.jobs.stream_events(job.id):
            print(event.kind, event.message)
    """

    jobs: AsyncJobs
    evals: AsyncEvals
    files: AsyncFiles
    keys: AsyncKeys
    usage: AsyncUsage

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        default_headers: Mapping[str, str] | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self._http_api = AsyncHTTP(
            base_url=base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            default_headers=default_headers,
            http_client=http_client,
        )
        self.jobs = AsyncJobs(self)
        self.evals = AsyncEvals(self)
        self.files = AsyncFiles(self)
        self.keys = AsyncKeys(self)
        self.usage = AsyncUsage(self)

    @property
    def base_url(self) -> str:
        return self._http_api.base_url

    @property
    def max_retries(self) -> int:
        return self._http_api.max_retries

    def __repr__(self) -> str:
        return f"AsyncClient(base_url={self.base_url!r})"

    async def close(self) -> None:
        await self._http_api.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()
