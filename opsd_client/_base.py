"""HTTP plumbing shared by `Client` and `AsyncClient`: settings, auth, retries, error mapping.

Retry policy: a request that never reached the service (connection refused, connect timeout) is
retried whatever it was; timeouts and dropped connections after sending, and 429/502/503/504
answers, are retried only for safe calls (GETs, cancel, and creates carrying an
`Idempotency-Key`). Waits grow exponentially from `RETRY_INITIAL_DELAY` with jitter, and a
`Retry-After` header wins when the server sends one.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import time
from collections.abc import Mapping
from typing import Any

import httpx

from opsd_client._version import __version__
from opsd_client.errors import APIConnectionError, APITimeoutError, error_for_response

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_RETRIES = 2
RETRY_INITIAL_DELAY = 0.5
RETRY_MAX_DELAY = 8.0
RETRY_AFTER_CAP = 60.0
RETRY_STATUSES = frozenset({429, 502, 503, 504})
BASE_URL_ENV = "OPSD_BASE_URL"
API_KEY_ENV = "OPSD_API_KEY"

_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)

Params = Mapping[str, Any] | None


def resolve_base_url(base_url: str | None) -> str:
    """`base_url`, else `$OPSD_BASE_URL`, else the local default; without a trailing slash."""
    url = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    return str(url).rstrip("/")


def resolve_api_key(api_key: str | None) -> str | None:
    """`api_key`, else `$OPSD_API_KEY` (None: requests go without a key and get a 401)."""
    return api_key or os.environ.get(API_KEY_ENV) or None


def clean_params(params: Params) -> dict[str, Any]:
    """Query parameters without the None values (lists become repeated keys)."""
    return {k: v for k, v in (params or {}).items() if v is not None}


class BaseClient:
    """Settings and policy that do not depend on sync or async I/O."""

    def __init__(
        self,
        *,
        base_url: str | None,
        api_key: str | None,
        timeout: float | httpx.Timeout | None,
        max_retries: int,
        default_headers: Mapping[str, str] | None,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.base_url = resolve_base_url(base_url)
        self.api_key = resolve_api_key(api_key)
        self.max_retries = max_retries
        if timeout is None or isinstance(timeout, httpx.Timeout):
            self.timeout = timeout if timeout is not None else httpx.Timeout(None)
        else:
            self.timeout = httpx.Timeout(timeout, connect=min(float(timeout), 10.0))
        self._default_headers = dict(default_headers or {})

    def __repr__(self) -> str:  # never shows the key
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {
            "Accept": "application/json",
            "User-Agent": f"opsd-python/{__version__}",
            **self._default_headers,
        }
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        headers.update(extra or {})
        return headers

    def _url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def _should_retry_exception(self, exc: Exception, *, idempotent: bool, attempt: int) -> bool:
        if attempt >= self.max_retries:
            return False
        return isinstance(exc, _NOT_SENT) or (idempotent and isinstance(exc, httpx.TransportError))

    def _should_retry_status(self, status: int, *, idempotent: bool, attempt: int) -> bool:
        return attempt < self.max_retries and idempotent and status in RETRY_STATUSES

    @staticmethod
    def _delay(attempt: int, response: httpx.Response | None = None) -> float:
        """Seconds to wait before retry number `attempt + 1`."""
        if response is not None and (after := _retry_after(response)) is not None:
            return after
        delay = min(RETRY_MAX_DELAY, RETRY_INITIAL_DELAY * 2**attempt)
        return delay * random.uniform(0.75, 1.0)

    @staticmethod
    def _connection_error(exc: Exception, request: httpx.Request | None) -> APIConnectionError:
        target = f"{request.method} {request.url}" if request is not None else "the service"
        if isinstance(exc, httpx.TimeoutException):
            return APITimeoutError(f"{target} timed out ({type(exc).__name__})", request=request)
        reason = str(exc) or type(exc).__name__
        return APIConnectionError(f"could not reach {target}: {reason}", request=request)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, min(seconds, RETRY_AFTER_CAP))


class SyncHTTP(BaseClient):
    """Blocking requests through one `httpx.Client`."""

    def __init__(self, *, http_client: httpx.Client | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=self.timeout)

    def close(self) -> None:
        """Close the connection pool (only when the client created it)."""
        if self._owns_http:
            self._http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Params = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool = True,
        stream: bool = False,
        timeout: httpx.Timeout | None = None,
        files: Mapping[str, tuple[str, bytes]] | None = None,
    ) -> httpx.Response:
        """Send with retries; return a 2xx response (open when `stream`), else raise.

        `files` sends a multipart body (`{"file": (name, bytes)}`) instead of `json`.
        """
        request = self._http.build_request(
            method,
            self._url(path),
            params=clean_params(params),
            json=json,
            files=files,
            headers=self._headers(headers),
            timeout=timeout or self.timeout,
        )
        attempt = 0
        while True:
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if self._should_retry_exception(exc, idempotent=idempotent, attempt=attempt):
                    time.sleep(self._delay(attempt))
                    attempt += 1
                    continue
                raise self._connection_error(exc, request) from exc
            if response.is_success:
                return response
            if self._should_retry_status(
                response.status_code, idempotent=idempotent, attempt=attempt
            ):
                response.close()
                time.sleep(self._delay(attempt, response))
                attempt += 1
                continue
            if stream:
                response.read()
                response.close()
            raise error_for_response(response)


class AsyncHTTP(BaseClient):
    """Awaitable requests through one `httpx.AsyncClient`."""

    def __init__(self, *, http_client: httpx.AsyncClient | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=self.timeout)

    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Params = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool = True,
        stream: bool = False,
        timeout: httpx.Timeout | None = None,
        files: Mapping[str, tuple[str, bytes]] | None = None,
    ) -> httpx.Response:
        request = self._http.build_request(
            method,
            self._url(path),
            params=clean_params(params),
            json=json,
            files=files,
            headers=self._headers(headers),
            timeout=timeout or self.timeout,
        )
        attempt = 0
        while True:
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if self._should_retry_exception(exc, idempotent=idempotent, attempt=attempt):
                    await asyncio.sleep(self._delay(attempt))
                    attempt += 1
                    continue
                raise self._connection_error(exc, request) from exc
            if response.is_success:
                return response
            if self._should_retry_status(
                response.status_code, idempotent=idempotent, attempt=attempt
            ):
                await response.aclose()
                await asyncio.sleep(self._delay(attempt, response))
                attempt += 1
                continue
            if stream:
                await response.aread()
                await response.aclose()
            raise error_for_response(response)
