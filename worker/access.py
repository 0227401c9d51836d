"""The worker's side of the access policy: what a job or eval of one tenant may open.

:func:`tenant_guard` builds the `opsd_engine.access.DatasetGuard` of a tenant from the settings'
policy and the store (uploaded file ids resolve to where their bytes are, for that tenant only);
the runner installs it around the engine (`opsd_engine.access.enforcing`), so every dataset the
engine opens is checked at open time, whatever the API let through. :func:`check_base_model`
is the same check for the model a job loads.
"""

from __future__ import annotations

import os
from typing import Any

from opsd_engine.access import AccessDenied, DatasetGuard
from opsd_service.settings import ServiceSettings


def tenant_name(store: Any, tenant_id: str) -> str:
    """The tenant's name (what policies are keyed by); '' for an unknown tenant."""
    tenant = store.get_tenant(tenant_id)
    return tenant.name if tenant is not None else ""


def tenant_guard(store: Any, settings: ServiceSettings, tenant_id: str) -> DatasetGuard:
    """The dataset guard of one tenant (its policy; its uploaded files by id)."""

    def files(file_id: str) -> str | None:
        record = store.get_file(file_id, tenant_id=tenant_id)
        return None if record is None else record.uri

    return DatasetGuard(settings.access_policy(), tenant_name(store, tenant_id), files)


def check_base_model(guard: DatasetGuard, base_model: str) -> None:
    """AccessDenied unless the tenant may load ``base_model``.

    A hub id that also names a folder relative to this process's working directory would be
    loaded from that folder by transformers: refused unless it is allowed as a local path.
    """
    kind = guard.policy.check_base_model(base_model, guard.tenant)
    if kind == "hub" and os.path.exists(base_model):
        raise AccessDenied(f"{base_model!r} names a local folder of the worker, not a hub model")
