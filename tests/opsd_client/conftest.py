"""Fixtures of the SDK and CLI tests: the shared real service, SDK clients, a finished job."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from opsd_client import Client
from tests.opsd_client.service import LiveService, finished_job, shared_service


@pytest.fixture(scope="session")
def service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> LiveService:
    return shared_service(request.config, tmp_path_factory)


@pytest.fixture
def client(service: LiveService) -> Iterator[Client]:
    with Client(base_url=service.base_url, api_key=service.api_key, timeout=30) as sdk:
        yield sdk


@pytest.fixture(scope="session")
def done_job(service: LiveService, tiny_model_dir: Path, tiny_dataset: Path) -> dict[str, Any]:
    """The finished 4-step job, as `GET /jobs/{id}` answered it."""
    return finished_job(service, tiny_model_dir, tiny_dataset)
