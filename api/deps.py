"""Request dependencies: the store, the queue client, settings and the authenticated tenant."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from api.errors import APIError


def get_store(request: Request) -> Any:
    return request.app.state.store


def get_settings(request: Request) -> Any:
    return request.app.state.settings


async def get_tenant(request: Request, store: Annotated[Any, Depends(get_store)]) -> Any:
    """The tenant owning the bearer API key, or a 401 naming what is wrong."""
    header = request.headers.get("authorization")
    if not header:
        raise APIError(401, "missing_api_key", "send your API key as 'Authorization: Bearer <key>'")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(401, "invalid_api_key", "the Authorization header must be 'Bearer <key>'")
    tenant = await run_in_threadpool(store.authenticate, key.strip())
    if tenant is None:
        raise APIError(401, "invalid_api_key", "the API key is not valid")
    return tenant


Store = Annotated[Any, Depends(get_store)]
Tenant = Annotated[Any, Depends(get_tenant)]
Settings = Annotated[Any, Depends(get_settings)]
