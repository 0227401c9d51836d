"""File routes: a tenant's datasets, uploaded and validated (`POST /files`, `GET /files`,
`GET /files/{id}`, `DELETE /files/{id}`).

An upload is read whole before it is kept: its format comes from the file name (`.jsonl`,
`.json`, `.csv`, `.parquet`, the text formats also compressed), every row must be an object, and
the first bad line or row is named in the 422. The file's id (`file-...`) is what `dataset_uri`
and `eval.dataset_uri` take; the bytes live under the artifacts root
(`files/<tenant>/<id><suffix>`), never shown to tenants. Sizes are bounded per file
(`OPSD_MAX_FILE_BYTES`, `OPSD_MAX_FILE_ROWS`) and per tenant (`OPSD_MAX_TENANT_FILE_BYTES`).
Another tenant's file is a 404, like a missing one.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import fsspec
from fastapi import APIRouter, File, Query, Request, UploadFile
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from api.deps import Settings, Store, Tenant, in_store
from api.errors import APIError
from api.schemas import ErrorResponse

FILE_ID = re.compile(r"file-[0-9a-z]{26}")
_CHUNK = 1 << 20


class FileOut(BaseModel):
    id: str = Field(examples=["file-01jd3y7k8q2t4v6x8z0b2d4f6h"])
    object: Literal["file"] = "file"
    filename: str
    format: str = Field(examples=["jsonl"])
    bytes: int
    rows: int
    fields: list[str] = Field(description="Fields every row has (non-null).")
    sha256: str
    created_at: datetime


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileOut]


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: Literal[True] = True


def file_out(record: Any) -> FileOut:
    return FileOut(
        id=record.id,
        filename=record.filename,
        format=record.format,
        bytes=record.bytes,
        rows=record.rows,
        fields=record.fields,
        sha256=record.sha256,
        created_at=record.created_at,
    )


def _suffix_of(filename: str) -> str | None:
    """The dataset suffix of a file name (longest match: `.jsonl.gz` before `.gz`), or None."""
    from opsd_engine.data import SUPPORTED_EXTENSIONS

    lower = filename.lower()
    matches = [ext for ext in SUPPORTED_EXTENSIONS if lower.endswith(ext)]
    return max(matches, key=len) if matches else None


def _clean_filename(raw: str | None) -> str:
    name = os.path.basename((raw or "").replace("\\", "/")).strip()
    if not name or len(name) > 255 or not name.isprintable():
        raise APIError(422, "invalid_request", "file: needs a plain file name", "file")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(422, "invalid_request", "file: needs a plain file name", "file") from None
    return name


def _storage_uri(root: str, tenant_id: str, file_id: str, suffix: str) -> str:
    return f"{root.rstrip('/')}/files/{tenant_id}/{file_id}{suffix}"


def _keep(source: Path, target: str) -> None:
    """Copy the validated upload to its place under the artifacts root (local or fsspec)."""
    fs, path = fsspec.core.url_to_fs(target)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.put_file(str(source), path)


def _forget(target: str) -> None:
    fs, path = fsspec.core.url_to_fs(target)
    if fs.exists(path):
        fs.rm(path)


router = APIRouter(
    prefix="/files",
    tags=["files"],
    responses={401: {"model": ErrorResponse, "description": "Missing or invalid API key"}},
)


@router.post(
    "",
    status_code=201,
    response_model=FileOut,
    summary="Upload a dataset (validated)",
    responses={
        413: {"model": ErrorResponse, "description": "File too large"},
        422: {"model": ErrorResponse, "description": "Not a readable dataset; names the row"},
        429: {"model": ErrorResponse, "description": "Rate limit or storage quota"},
    },
)
async def upload_file(
    request: Request,
    store: Store,
    tenant: Tenant,
    settings: Settings,
    file: Annotated[
        UploadFile,
        File(
            description="JSONL, JSON, CSV or Parquet (text formats may be .gz); one object per row."
        ),
    ],
) -> Any:
    """Upload a dataset file. It is read whole and refused (422, naming the first bad line or
    row) unless every row is an object; the answer lists its rows and the fields every row has.
    Use its `id` as `dataset_uri` (or `eval.dataset_uri`)."""
    from jobstore import new_file_id

    filename = _clean_filename(file.filename)
    suffix = _suffix_of(filename)
    if suffix is None:
        from opsd_engine.data import SUPPORTED_EXTENSIONS

        raise APIError(
            422,
            "invalid_request",
            f"file: unsupported file type {filename!r}; name it with one of "
            + ", ".join(SUPPORTED_EXTENSIONS),
            "file",
        )
    if file.size is not None and file.size > settings.max_file_bytes:
        raise APIError(
            413, "payload_too_large", f"file: larger than {settings.max_file_bytes} bytes", "file"
        )
    used = await in_store(request, lambda: store.tenant_file_bytes(tenant.id))
    if used + (file.size or 0) > settings.max_tenant_file_bytes:
        raise APIError(
            429,
            "quota_exceeded",
            f"this tenant's files would exceed {settings.max_tenant_file_bytes} bytes; "
            "delete some (DELETE /files/{id})",
        )
    file_id = new_file_id()
    target = _storage_uri(settings.artifacts_uri, tenant.id, file_id, suffix)
    with tempfile.TemporaryDirectory(prefix="opsd-upload-") as scratch:
        local = Path(scratch) / f"upload{suffix}"
        size, digest = await run_in_threadpool(_spool, file, local, settings.max_file_bytes)
        summary = await run_in_threadpool(_describe, local, filename, settings.max_file_rows)
        await run_in_threadpool(_keep, local, target)
    try:
        record = await in_store(
            request,
            lambda: store.add_file(
                tenant.id,
                file_id=file_id,
                filename=filename,
                format=suffix.lstrip("."),
                size=size,
                rows=summary.rows,
                fields=summary.fields,
                sha256=digest,
                uri=target,
            ),
        )
    except BaseException:
        await run_in_threadpool(_forget, target)
        raise
    return file_out(record)


def _spool(upload: UploadFile, local: Path, limit: int) -> tuple[int, str]:
    """Copy the upload to ``local``; its size and SHA-256 (413 past ``limit`` bytes)."""
    digest, size = hashlib.sha256(), 0
    upload.file.seek(0)
    with open(local, "wb") as out:
        while chunk := upload.file.read(_CHUNK):
            size += len(chunk)
            if size > limit:
                raise APIError(413, "payload_too_large", f"file: larger than {limit} bytes", "file")
            digest.update(chunk)
            out.write(chunk)
    if size == 0:
        raise APIError(422, "invalid_request", "file: is empty", "file")
    return size, digest.hexdigest()


def _describe(local: Path, filename: str, max_rows: int) -> Any:
    from opsd_engine.data import DatasetError, describe_dataset

    try:
        return describe_dataset(str(local), max_rows=max_rows)
    except DatasetError as exc:
        message = str(exc).replace(str(local), filename)
        raise APIError(422, "invalid_request", f"file: {message}", "file") from None


@router.get("", response_model=FileList, summary="List files, newest first")
async def list_files(
    request: Request,
    store: Store,
    tenant: Tenant,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Any:
    records = await in_store(request, lambda: store.list_files(tenant.id, limit=limit))
    return FileList(data=[file_out(r) for r in records])


async def _tenant_file(request: Request, tenant: Any, file_id: str) -> Any:
    store = request.app.state.store
    record = None
    if FILE_ID.fullmatch(file_id):
        record = await in_store(request, lambda: store.get_file(file_id, tenant_id=tenant.id))
    if record is None:
        raise APIError(404, "file_not_found", f"no file {file_id!r}", "file_id")
    return record


@router.get(
    "/{file_id}",
    response_model=FileOut,
    summary="Get a file's description",
    responses={404: {"model": ErrorResponse, "description": "No such file for this tenant"}},
)
async def get_file(file_id: str, request: Request, tenant: Tenant) -> Any:
    return file_out(await _tenant_file(request, tenant, file_id))


@router.delete(
    "/{file_id}",
    response_model=FileDeleted,
    summary="Delete a file",
    responses={404: {"model": ErrorResponse, "description": "No such file for this tenant"}},
)
async def delete_file(file_id: str, request: Request, store: Store, tenant: Tenant) -> Any:
    """Delete the file; jobs that have not read it yet will fail with `dataset_error`."""
    record = await _tenant_file(request, tenant, file_id)
    deleted = await in_store(request, lambda: store.delete_file(record.id, tenant_id=tenant.id))
    if deleted is None:
        raise APIError(404, "file_not_found", f"no file {file_id!r}", "file_id")
    await run_in_threadpool(_forget, deleted.uri)
    return FileDeleted(id=deleted.id)
