"""API fixtures: the real app on a real store (Postgres and SQLite) with a real Redis broker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.service_fixtures import fresh_postgres_url, redis_test_url, sqlite_url

REDIS_TEST_URL = redis_test_url(12)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    url, drop = fresh_postgres_url()
    yield url
    drop()


@pytest.fixture(params=["postgres", "sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        return request.getfixturevalue("postgres_url")
    return sqlite_url(tmp_path / "opsd.db")


@pytest.fixture
def settings(database_url: str, tmp_path: Path):
    from jobstore.migrate import upgrade
    from opsd_service.settings import ServiceSettings

    upgrade(database_url)
    return ServiceSettings(
        home=tmp_path / "home",
        database_url=database_url,
        broker_url=REDIS_TEST_URL,
        artifacts_uri=str(tmp_path / "artifacts"),
        max_body_bytes=64 * 1024,
    )


@pytest.fixture
def app(settings):
    from api.app import create_app

    return create_app(settings)


@pytest.fixture
def client(app) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def store(app):
    return app.state.store


@pytest.fixture
def tenant_keys(store) -> dict[str, str]:
    import uuid

    suffix = uuid.uuid4().hex[:6]
    return {
        "a": store.create_api_key(f"acme-{suffix}"),
        "b": store.create_api_key(f"globex-{suffix}"),
    }


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
