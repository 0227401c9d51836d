"""Worker test fixtures: a migrated real store (SQLite file and Postgres), settings, tiny specs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.service_fixtures import fresh_postgres_url, sqlite_url


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    url, drop = fresh_postgres_url()
    yield url
    drop()


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A migrated PostgreSQL database of the test module's own, for modules whose real workers
    take any queued job of the database (a turn runs the oldest queued job of its class), so a
    job another module left queued must not be there."""
    url, drop = fresh_postgres_url()
    yield url
    drop()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    from jobstore.migrate import upgrade

    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
    else:
        url = sqlite_url(tmp_path / "opsd.db")
    upgrade(url)
    return url


@pytest.fixture
def sqlite_database_url(tmp_path: Path) -> str:
    from jobstore.migrate import upgrade

    url = sqlite_url(tmp_path / "opsd.db")
    upgrade(url)
    return url


@pytest.fixture
def store(database_url: str) -> Iterator[Any]:
    from jobstore import Store

    store = Store(database_url)
    yield store
    store.close()


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Any:
    from opsd_service.settings import ServiceSettings

    return ServiceSettings(
        home=tmp_path / "home",
        database_url=database_url,
        artifacts_uri=str(tmp_path / "artifacts"),
        lease_seconds=5.0,
        heartbeat_seconds=0.2,
    )


@pytest.fixture
def tiny_spec_dict(tiny_spec: Callable[..., Any]) -> Callable[..., dict[str, Any]]:
    """`tiny_spec(**overrides)` as the JSON document a job row stores."""
    from opsd_engine.config import spec_to_dict

    def factory(**overrides: object) -> dict[str, Any]:
        return spec_to_dict(tiny_spec(**overrides))

    return factory
