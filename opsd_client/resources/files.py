"""`client.files` and `client.keys`: a tenant's uploaded datasets (`POST /files`, `GET /files`,
`GET /files/{id}`, `DELETE /files/{id}`) and, for admin keys, every API key (`GET /keys`,
`DELETE /keys/{id}`). Sync classes for `Client`, `Async*` for `AsyncClient`.

    file = client.files.create("train.jsonl")      # validated by the service; 422 names the row
    job = client.jobs.create(base_model="Qwen/Qwen3-4B", dataset_uri=file.id)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from opsd_client.models import ApiKey, ApiKeyList, File, FileDeleted, FileList

if TYPE_CHECKING:
    from opsd_client._client import AsyncClient, Client


def _upload(path: str | Path, filename: str | None) -> dict[str, tuple[str, bytes]]:
    source = Path(path).expanduser()
    return {"file": (filename or source.name, source.read_bytes())}


def _file_path(file_id: str) -> str:
    return f"/files/{quote(file_id, safe='')}"


def _key_path(key_id: str) -> str:
    return f"/keys/{quote(key_id, safe='')}"


class Files:
    """A tenant's datasets."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def create(self, path: str | Path, *, filename: str | None = None) -> File:
        """Upload a JSONL, JSON, CSV or Parquet file (`POST /files`); the name's extension
        gives the format. Raises `UnprocessableEntityError` naming the first bad row."""
        response = self._client._http_api.request(
            "POST", "/files", files=_upload(path, filename), idempotent=False
        )
        return File.model_validate(response.json())

    def list(self, *, limit: int = 100) -> list[File]:
        """`GET /files`: newest first."""
        response = self._client._http_api.request("GET", "/files", params={"limit": limit})
        return FileList.model_validate(response.json()).data

    def retrieve(self, file_id: str) -> File:
        """`GET /files/{id}`."""
        return File.model_validate(
            self._client._http_api.request("GET", _file_path(file_id)).json()
        )

    def delete(self, file_id: str) -> FileDeleted:
        """`DELETE /files/{id}`."""
        response = self._client._http_api.request("DELETE", _file_path(file_id))
        return FileDeleted.model_validate(response.json())


class AsyncFiles:
    """A tenant's datasets, awaitable; the same methods as `Files`."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def create(self, path: str | Path, *, filename: str | None = None) -> File:
        response = await self._client._http_api.request(
            "POST", "/files", files=_upload(path, filename), idempotent=False
        )
        return File.model_validate(response.json())

    async def list(self, *, limit: int = 100) -> list[File]:
        response = await self._client._http_api.request("GET", "/files", params={"limit": limit})
        return FileList.model_validate(response.json()).data

    async def retrieve(self, file_id: str) -> File:
        response = await self._client._http_api.request("GET", _file_path(file_id))
        return File.model_validate(response.json())

    async def delete(self, file_id: str) -> FileDeleted:
        response = await self._client._http_api.request("DELETE", _file_path(file_id))
        return FileDeleted.model_validate(response.json())


class Keys:
    """Every API key (admin keys only; others get `PermissionDeniedError`)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def list(self) -> list[ApiKey]:
        """`GET /keys`: every key, oldest first (never a secret)."""
        response = self._client._http_api.request("GET", "/keys")
        return ApiKeyList.model_validate(response.json()).data

    def revoke(self, key_id: str) -> ApiKey:
        """`DELETE /keys/{id}`: refused at once by every API process (within about 1 s)."""
        response = self._client._http_api.request("DELETE", _key_path(key_id))
        return ApiKey.model_validate(response.json())


class AsyncKeys:
    """Every API key, awaitable; the same methods as `Keys`."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def list(self) -> list[ApiKey]:
        response = await self._client._http_api.request("GET", "/keys")
        return ApiKeyList.model_validate(response.json()).data

    async def revoke(self, key_id: str) -> ApiKey:
        response = await self._client._http_api.request("DELETE", _key_path(key_id))
        return ApiKey.model_validate(response.json())
