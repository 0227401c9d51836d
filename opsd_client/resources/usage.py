"""`client.usage`: what the tenant consumed over a time range (`GET /usage`); `Usage` for
`Client`, `AsyncUsage` for `AsyncClient`.

    usage = client.usage.retrieve(start=datetime(2026, 11, 1, tzinfo=UTC))
    usage.totals.device_seconds, [j.job_id for j in usage.jobs]
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from opsd_client.models import Usage as UsageReport

if TYPE_CHECKING:
    from opsd_client._client import AsyncClient, Client


def _params(start: datetime | str | None, end: datetime | str | None) -> dict[str, Any]:
    def text(value: datetime | str | None) -> str | None:
        return value.isoformat() if isinstance(value, datetime) else value

    return {"start": text(start), "end": text(end)}


class Usage:
    """The tenant's usage (`/usage`)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def retrieve(
        self, *, start: datetime | str | None = None, end: datetime | str | None = None
    ) -> UsageReport:
        """`GET /usage`: device-seconds and tokens recorded in `[start, end)` (ISO 8601 or
        datetimes; a time without a zone is UTC), in total and per job. Defaults: the 30 days
        up to now."""
        response = self._client._http_api.request("GET", "/usage", params=_params(start, end))
        return UsageReport.model_validate(response.json())


class AsyncUsage:
    """The tenant's usage (`/usage`); see `Usage`."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def retrieve(
        self, *, start: datetime | str | None = None, end: datetime | str | None = None
    ) -> UsageReport:
        """`GET /usage`; see `Usage.retrieve`."""
        response = await self._client._http_api.request("GET", "/usage", params=_params(start, end))
        return UsageReport.model_validate(response.json())
