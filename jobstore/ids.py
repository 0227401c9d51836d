"""Identifier generation: prefixed, time-sortable, unique ids (``job_…``, ``ten_…``, ``key_…``).

An id is ``<prefix>_`` followed by 26 lowercase Crockford base32 characters: 48 bits of
milliseconds since the Unix epoch, then 80 random bits (the ULID layout), so ids sort by creation
time to the millisecond and never collide in practice.
"""

from __future__ import annotations

import secrets
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lowercase


def new_id(prefix: str, *, now_ms: int | None = None) -> str:
    """A new ``<prefix>_<26 chars>`` id whose leading characters encode ``now_ms``."""
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    value = ((ms & ((1 << 48) - 1)) << 80) | secrets.randbits(80)
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return f"{prefix}_{''.join(reversed(chars))}"


def new_job_id() -> str:
    return new_id("job")


def new_tenant_id() -> str:
    return new_id("ten")


def new_api_key_id() -> str:
    return new_id("key")
