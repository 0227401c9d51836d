"""Request dependencies: the store, the queue client, settings and the authenticated tenant."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from api.errors import APIError, StoreTimeout
from api.throttle import Throttle

T = TypeVar("T")


# Dependencies are `async def` even when they do not await: FastAPI runs a plain `def`
# dependency in the thread pool, a thread hop per dependency per request.
async def get_store(request: Request) -> Any:
    return request.app.state.store


async def get_settings(request: Request) -> Any:
    return request.app.state.settings


bearer = HTTPBearer(
    auto_error=False,
    scheme_name="APIKey",
    description="An API key (`opsd keys create --tenant NAME`) as `Authorization: Bearer <key>`.",
)


async def in_store(request: Request, call: Callable[[], T]) -> T:
    """Run a blocking store call in the thread pool, bounded by the store timeout.

    A database that hangs (a stopped server keeps its TCP connections open) would hold the
    request for as long as the kernel keeps the socket; past ``store_timeout_seconds`` the
    request is answered 503 instead (the thread finishes in the background).
    """
    timeout = request.app.state.settings.store_timeout_seconds
    try:
        return await asyncio.wait_for(run_in_threadpool(call), timeout)
    except TimeoutError:
        raise StoreTimeout(f"no answer from the store within {timeout} s") from None


async def get_tenant(
    request: Request,
    store: Annotated[Any, Depends(get_store)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Any:
    """The tenant owning the bearer API key, or a 401 naming what is wrong.

    Failed authentications are counted per client address (429 once too many); each accepted
    key's requests are counted against the per-key rate limit (429 with Retry-After).
    """
    state = request.app.state
    address = request.client.host if request.client else "unknown"
    throttle: Throttle = state.throttle
    throttle.check_address(address)
    header = request.headers.get("authorization")
    if not header:
        throttle.failed_auth(address)
        raise APIError(401, "missing_api_key", "send your API key as 'Authorization: Bearer <key>'")
    if credentials is None or not credentials.credentials.strip():
        throttle.failed_auth(address)
        raise APIError(401, "invalid_api_key", "the Authorization header must be 'Bearer <key>'")
    key = credentials.credentials.strip()
    cache: KeyCache = state.key_cache
    await _drop_revoked(request, cache)
    tenant = cache.get(key)
    if tenant is None:
        tenant = await in_store(request, lambda: store.authenticate(key))
        if tenant is None:
            throttle.failed_auth(address)
            raise APIError(401, "invalid_api_key", "the API key is not valid")
        cache.put(key, tenant)
    throttle.hit_request(tenant.key_id or tenant.id)
    return tenant


async def _drop_revoked(request: Request, cache: KeyCache) -> None:
    """Empty the key cache when a key was revoked anywhere since the last look (at most one
    look per ``key_revocation_check_seconds`` per process)."""
    state = request.app.state
    interval = state.settings.key_revocation_check_seconds
    now = time.monotonic()
    if now - state.revocation_checked_at < interval:
        return
    mark = await in_store(request, state.store.revocation_mark)
    state.revocation_checked_at = now
    if mark != state.revocation_mark:
        state.revocation_mark = mark
        cache.clear()


async def get_admin(tenant: Annotated[Any, Depends(get_tenant)]) -> Any:
    """The authenticated tenant, when its key is an admin key; else 403."""
    if not tenant.admin:
        raise APIError(403, "admin_required", "this operation needs an admin API key")
    return tenant


class KeyCache:
    """Tenants of recently verified keys, so most requests skip the key lookup.

    Entries live `ttl` seconds (a revoked key keeps working at most that long in this process)
    and are keyed by the key's SHA-256, never by the key itself. Failed lookups are not cached.
    """

    def __init__(self, ttl: float, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[bytes, tuple[float, Any]] = {}

    @staticmethod
    def _digest(key: str) -> bytes:
        return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()

    def get(self, key: str) -> Any | None:
        if self.ttl <= 0:
            return None
        entry = self._entries.get(self._digest(key))
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def clear(self) -> None:
        self._entries.clear()

    def put(self, key: str, tenant: Any) -> None:
        if self.ttl <= 0:
            return
        if len(self._entries) >= self.max_entries:
            now = time.monotonic()
            self._entries = {k: v for k, v in self._entries.items() if v[0] >= now}
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
        self._entries[self._digest(key)] = (time.monotonic() + self.ttl, tenant)


JOB_ID = re.compile(r"job_[A-Za-z0-9]{1,64}")


async def tenant_job(request: Request, tenant: Any, job_id: str) -> Any:
    """The tenant's job, or a 404 (another tenant's job and a malformed id look the same)."""
    store = request.app.state.store
    job = None
    if JOB_ID.fullmatch(job_id):
        job = await in_store(request, lambda: store.get_job(job_id, tenant_id=tenant.id))
    if job is None:
        raise APIError(404, "job_not_found", f"no job {job_id!r}", "job_id")
    return job


Store = Annotated[Any, Depends(get_store)]
Tenant = Annotated[Any, Depends(get_tenant)]
Settings = Annotated[Any, Depends(get_settings)]
Admin = Annotated[Any, Depends(get_admin)]


async def known_query_parameters(request: Request) -> None:
    """422 for a query parameter the operation does not declare (the document says which).

    An app-wide dependency: a misspelt parameter (`?limt=5`) is an error the client should
    see, not a silently ignored request.
    """
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    known = {p.alias for p in _all_query_params(dependant)}
    for name in request.query_params:
        if name not in known:
            shown = name.encode("utf-8", "replace").decode("utf-8")[:100]
            raise APIError(422, "invalid_request", f"{shown}: unknown query parameter", shown)


def _all_query_params(dependant: Any) -> list[Any]:
    found = list(dependant.query_params)
    for sub in dependant.dependencies:
        found += _all_query_params(sub)
    return found
