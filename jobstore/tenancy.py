"""What a tenant owns and may ask for: uploaded files, API keys for admins, admission quotas.

A :class:`jobstore.Store` mixin (like :mod:`jobstore.evals`):

* **files** (table ``files``, revision ``0004_tenant_security``): a tenant's uploaded datasets,
  validated at upload; ``dataset_uri`` names them by id (``file-…``). Rows hold where the bytes
  are stored (``uri``), never served to tenants.
* **keys**: listing every key and revoking one by id (admin operations), and the revocation
  watermark the API polls so a revoked key stops working in every API process
  (:meth:`TenancyQueries.revocation_mark`).
* **quotas** (admission only, at ``POST /jobs`` and ``POST /jobs/{id}/evals``):
  :meth:`TenancyQueries.count_queued` counts a tenant's queued jobs and evals. Dispatch-time
  limits (running jobs per tenant) live with the claim logic, not here.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Row

from jobstore.ids import new_id
from jobstore.records import QUEUED, TenantNotFound
from jobstore.tables import JSONDoc, UTCDateTime, api_keys, jobs, metadata, tenants

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Session

files = sa.Table(
    "files",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("tenant_id", sa.String(40), sa.ForeignKey("tenants.id"), nullable=False),
    sa.Column("filename", sa.String(255), nullable=False),
    sa.Column("format", sa.String(16), nullable=False),
    sa.Column("bytes", sa.BigInteger(), nullable=False),
    sa.Column("rows", sa.Integer(), nullable=False),
    sa.Column("fields", JSONDoc, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("uri", sa.Text(), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Index(None, "tenant_id", "created_at"),
)


def new_file_id() -> str:
    """``file-`` and 26 time-sortable characters (the id format ``dataset_uri`` accepts)."""
    return "file-" + new_id("file").split("_", 1)[1]


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class FileRecord:
    id: str
    tenant_id: str
    filename: str
    format: str
    bytes: int
    rows: int
    fields: list[str]
    sha256: str
    uri: str  # where the bytes are stored (internal)
    created_at: datetime


@dataclass(frozen=True)
class ApiKeyRecord:
    id: str
    tenant_id: str
    tenant_name: str
    prefix: str
    label: str | None
    admin: bool
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


def _file_record(row: Row[Any]) -> FileRecord:
    m = row._mapping
    return FileRecord(
        id=m["id"],
        tenant_id=m["tenant_id"],
        filename=m["filename"],
        format=m["format"],
        bytes=int(m["bytes"]),
        rows=int(m["rows"]),
        fields=list(m["fields"] or []),
        sha256=m["sha256"],
        uri=m["uri"],
        created_at=m["created_at"],
    )


class TenancyQueries:
    """Files, admin key operations and admission quotas of :class:`jobstore.Store` (mixed in)."""

    if TYPE_CHECKING:

        def _read(self) -> AbstractContextManager[Connection]: ...

        def _write(self) -> AbstractContextManager[Session]: ...

    # ------------------------------------------------------------------------------- files
    def add_file(
        self,
        tenant_id: str,
        *,
        file_id: str,
        filename: str,
        format: str,
        size: int,
        rows: int,
        fields: list[str],
        sha256: str,
        uri: str,
    ) -> FileRecord:
        """Record an uploaded file (its bytes are stored already); TenantNotFound if unknown."""
        values = {
            "id": file_id,
            "tenant_id": tenant_id,
            "filename": filename,
            "format": format,
            "bytes": size,
            "rows": rows,
            "fields": fields,
            "sha256": sha256,
            "uri": uri,
            "created_at": _now(),
        }
        try:
            with self._write() as session:
                row = session.execute(sa.insert(files).values(values).returning(*files.c)).one()
        except sa.exc.IntegrityError as exc:
            raise TenantNotFound(f"tenant {tenant_id!r} does not exist") from exc
        return _file_record(row)

    def get_file(self, file_id: str, *, tenant_id: str) -> FileRecord | None:
        """The tenant's file, or None (another tenant's file does not exist for this one)."""
        query = sa.select(files).where(files.c.id == file_id, files.c.tenant_id == tenant_id)
        with self._read() as session:
            row = session.execute(query).first()
        return None if row is None else _file_record(row)

    def list_files(self, tenant_id: str, *, limit: int = 100) -> list[FileRecord]:
        """The tenant's files, newest first, at most ``limit``."""
        query = (
            sa.select(files)
            .where(files.c.tenant_id == tenant_id)
            .order_by(files.c.created_at.desc(), files.c.id.desc())
            .limit(limit)
        )
        with self._read() as session:
            return [_file_record(row) for row in session.execute(query)]

    def delete_file(self, file_id: str, *, tenant_id: str) -> FileRecord | None:
        """Forget the tenant's file; returns the deleted record (None if there was none)."""
        with self._write() as session:
            row = session.execute(
                sa.delete(files)
                .where(files.c.id == file_id, files.c.tenant_id == tenant_id)
                .returning(*files.c)
            ).first()
        return None if row is None else _file_record(row)

    def tenant_file_bytes(self, tenant_id: str) -> int:
        """Bytes of all the tenant's uploaded files."""
        query = sa.select(sa.func.coalesce(sa.func.sum(files.c.bytes), 0)).where(
            files.c.tenant_id == tenant_id
        )
        with self._read() as session:
            return int(session.execute(query).scalar_one())

    # -------------------------------------------------------------------------------- keys
    def list_api_keys(self) -> list[ApiKeyRecord]:
        """Every API key (revoked ones included), oldest first; never the secrets."""
        query = (
            sa.select(api_keys, tenants.c.name.label("tenant_name"))
            .join_from(api_keys, tenants, api_keys.c.tenant_id == tenants.c.id)
            .order_by(api_keys.c.created_at, api_keys.c.id)
        )
        with self._read() as session:
            return [
                ApiKeyRecord(
                    id=r.id,
                    tenant_id=r.tenant_id,
                    tenant_name=r.tenant_name,
                    prefix=r.prefix,
                    label=r.label,
                    admin=bool(r.admin),
                    created_at=r.created_at,
                    last_used_at=r.last_used_at,
                    revoked_at=r.revoked_at,
                )
                for r in session.execute(query)
            ]

    def revoke_api_key_by_id(self, key_id: str) -> bool | None:
        """Revoke the key with this id: True if revoked now, False if it already was, None if
        there is no such key."""
        with self._write() as session:
            revoked = session.execute(
                sa.update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=_now())
                .returning(api_keys.c.id)
            ).first()
            if revoked is not None:
                return True
            exists = session.execute(sa.select(api_keys.c.id).where(api_keys.c.id == key_id))
            return False if exists.first() is not None else None

    def revocation_mark(self) -> tuple[int, datetime | None]:
        """``(revoked keys, latest revocation time)``: changes whenever a key is revoked.

        One cheap aggregate; each API process compares it with the last one it saw and drops
        its cache of verified keys when it moved.
        """
        query = sa.select(sa.func.count(), sa.func.max(api_keys.c.revoked_at)).where(
            api_keys.c.revoked_at.is_not(None)
        )
        with self._read() as session:
            count, latest = session.execute(query).one()
        return int(count), latest

    # ------------------------------------------------------------------------------ quotas
    def count_queued(self, tenant_id: str) -> int:
        """The tenant's queued jobs plus queued evals (what admission quotas bound)."""
        from jobstore.evals import evals

        queued_jobs = (
            sa.select(sa.func.count())
            .select_from(jobs)
            .where(jobs.c.tenant_id == tenant_id, jobs.c.status == QUEUED)
            .scalar_subquery()
        )
        queued_evals = (
            sa.select(sa.func.count())
            .select_from(evals)
            .where(evals.c.tenant_id == tenant_id, evals.c.status == QUEUED)
            .scalar_subquery()
        )
        with self._read() as session:
            return int(session.execute(sa.select(queued_jobs + queued_evals)).scalar_one())
