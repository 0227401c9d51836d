"""Opaque pagination cursors for ``Store.list_jobs`` (keyset on ``(created_at, id)``).

A cursor is URL-safe base64 of ``<created_at ISO>|<job id>|<tag>``, where the tag is a truncated
SHA-256 of the rest under a fixed label. The tag is not a secret (any process can issue and read
cursors, no key to share); it only makes cursors the store did not issue, truncated or edited ones
fail with :class:`~jobstore.records.InvalidCursor` instead of silently paging from a wrong place.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from datetime import UTC, datetime

from jobstore.records import InvalidCursor

_LABEL = b"opsd.jobstore.cursor.v1|"
_MAX_LENGTH = 512


def _tag(payload: str) -> str:
    return hashlib.sha256(_LABEL + payload.encode()).hexdigest()[:16]


def encode_cursor(created_at: datetime, job_id: str) -> str:
    """The cursor that continues a newest-first listing after the job ``(created_at, job_id)``."""
    payload = f"{created_at.astimezone(UTC).isoformat()}|{job_id}"
    raw = f"{payload}|{_tag(payload)}".encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """``(created_at, job_id)`` of a cursor from :func:`encode_cursor`; ``InvalidCursor`` else."""
    if not isinstance(cursor, str) or not cursor or len(cursor) > _MAX_LENGTH:
        raise InvalidCursor("invalid cursor")
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        raw = base64.b64decode(padded, altchars=b"-_", validate=True).decode("ascii")
        created_text, job_id, tag = raw.split("|")
        if not hmac.compare_digest(tag, _tag(f"{created_text}|{job_id}")):
            raise InvalidCursor("invalid cursor")
        created_at = datetime.fromisoformat(created_text)
    except (ValueError, UnicodeDecodeError, binascii.Error) as exc:
        raise InvalidCursor("invalid cursor") from exc
    if created_at.tzinfo is None or not job_id.startswith("job_"):
        raise InvalidCursor("invalid cursor")
    return created_at.astimezone(UTC), job_id
