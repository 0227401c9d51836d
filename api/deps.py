"""Request dependencies: the store, the queue client, settings and the authenticated tenant."""

from __future__ import annotations

import hashlib
import re
import time
from typing import Annotated, Any

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from api.errors import APIError


# Dependencies are `async def` even when they do not await: FastAPI runs a plain `def`
# dependency in the thread pool, a thread hop per dependency per request.
async def get_store(request: Request) -> Any:
    return request.app.state.store


async def get_settings(request: Request) -> Any:
    return request.app.state.settings


async def get_tenant(request: Request, store: Annotated[Any, Depends(get_store)]) -> Any:
    """The tenant owning the bearer API key, or a 401 naming what is wrong."""
    header = request.headers.get("authorization")
    if not header:
        raise APIError(401, "missing_api_key", "send your API key as 'Authorization: Bearer <key>'")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(401, "invalid_api_key", "the Authorization header must be 'Bearer <key>'")
    cache: KeyCache = request.app.state.key_cache
    key = key.strip()
    tenant = cache.get(key)
    if tenant is None:
        tenant = await run_in_threadpool(store.authenticate, key)
        if tenant is None:
            raise APIError(401, "invalid_api_key", "the API key is not valid")
        cache.put(key, tenant)
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


async def tenant_job(store: Any, tenant: Any, job_id: str) -> Any:
    """The tenant's job, or a 404 (another tenant's job and a malformed id look the same)."""
    job = None
    if JOB_ID.fullmatch(job_id):
        job = await run_in_threadpool(lambda: store.get_job(job_id, tenant_id=tenant.id))
    if job is None:
        raise APIError(404, "job_not_found", f"no job {job_id!r}", "job_id")
    return job


Store = Annotated[Any, Depends(get_store)]
Tenant = Annotated[Any, Depends(get_tenant)]
Settings = Annotated[Any, Depends(get_settings)]
