"""Key routes for admins: `GET /keys` (every key, never a secret) and `DELETE /keys/{id}`.

Only an admin key (`opsd keys create --admin`) may call them; others get 403. A revoked key is
refused at once by the API process that revoked it and within `OPSD_KEY_REVOCATION_CHECK_SECONDS`
(default 1 s) by every other API process: each looks at the store's revocation mark at most that
often and drops its cache of verified keys when it moved.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from api.deps import Admin, Store, in_store
from api.errors import APIError
from api.schemas import ErrorResponse

KEY_ID = re.compile(r"key_[0-9a-z]{26}")


class KeyOut(BaseModel):
    id: str = Field(examples=["key_01jd3y7k8q2t4v6x8z0b2d4f6h"])
    object: Literal["api_key"] = "api_key"
    tenant: str = Field(description="The tenant's name.")
    prefix: str = Field(description="The public part of the key: `opsd_<prefix>_...`.")
    label: str | None
    admin: bool
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class KeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[KeyOut]


def key_out(record: Any) -> KeyOut:
    return KeyOut(
        id=record.id,
        tenant=record.tenant_name,
        prefix=record.prefix,
        label=record.label,
        admin=record.admin,
        created_at=record.created_at,
        last_used_at=record.last_used_at,
        revoked_at=record.revoked_at,
    )


router = APIRouter(
    prefix="/keys",
    tags=["keys"],
    responses={
        401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
        403: {"model": ErrorResponse, "description": "Not an admin key"},
    },
)


@router.get("", response_model=KeyList, summary="List every API key (admins)")
async def list_keys(request: Request, store: Store, admin: Admin) -> Any:
    records = await in_store(request, store.list_api_keys)
    return KeyList(data=[key_out(r) for r in records])


@router.delete(
    "/{key_id}",
    response_model=KeyOut,
    summary="Revoke an API key (admins)",
    responses={404: {"model": ErrorResponse, "description": "No such key"}},
)
async def revoke_key(key_id: str, request: Request, store: Store, admin: Admin) -> Any:
    """Revoke the key at once (revoking a revoked key changes nothing)."""
    revoked = None
    if KEY_ID.fullmatch(key_id):
        revoked = await in_store(request, lambda: store.revoke_api_key_by_id(key_id))
    if revoked is None:
        raise APIError(404, "key_not_found", f"no key {key_id!r}", "key_id")
    request.app.state.key_cache.clear()  # this process: effective for the very next request
    records = await in_store(request, store.list_api_keys)
    return key_out(next(r for r in records if r.id == key_id))
