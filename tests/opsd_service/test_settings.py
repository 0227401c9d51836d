"""ServiceSettings: defaults under the home directory, `OPSD_*` overrides, the env round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from opsd_service.settings import (
    ServiceSettings,
    api_key_file,
    ensure_home,
    filesystem_broker_root,
    get_settings,
    sqlite_path,
)


def test_defaults_live_under_the_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("DATABASE_URL", "BROKER_URL", "ARTIFACTS_URI", "LEASE_SECONDS"):
        monkeypatch.delenv(f"OPSD_{name}", raising=False)
    monkeypatch.setenv("OPSD_HOME", str(tmp_path / "h"))
    settings = get_settings()
    home = tmp_path / "h"
    assert settings.home == home
    assert settings.database_url == f"sqlite:///{home}/opsd.db"
    assert sqlite_path(settings.database_url) == home / "opsd.db"
    assert settings.broker_url == f"filesystem://{home}/broker"
    assert filesystem_broker_root(settings) == home / "broker"
    assert settings.artifacts_uri == str(home / "artifacts")
    assert settings.heartbeat_seconds == settings.lease_seconds / 3
    assert (settings.queue, settings.api_host, settings.api_port) == ("opsd", "127.0.0.1", 8000)
    assert settings.max_body_bytes == 1024 * 1024 and settings.inference_url is None
    assert api_key_file(settings) == home / "api_key"

    ensure_home(settings)
    for sub in ("broker/data", "broker/processed", "broker/control", "artifacts"):
        assert (home / sub).is_dir()


def test_home_defaults_to_dot_opsd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("OPSD_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert get_settings().home == tmp_path / ".opsd"


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OPSD_HOME", str(tmp_path))
    monkeypatch.setenv("OPSD_DATABASE_URL", "postgresql+psycopg://u:p@db:5432/opsd")
    monkeypatch.setenv("OPSD_BROKER_URL", "redis://redis:6379/0")
    monkeypatch.setenv("OPSD_ARTIFACTS_URI", "s3://bucket/prefix")
    monkeypatch.setenv("OPSD_LEASE_SECONDS", "6")
    monkeypatch.setenv("OPSD_INFERENCE_URL", "http://vllm:8000/v1")
    settings = get_settings(api_port=9000)
    assert settings.database_url == "postgresql+psycopg://u:p@db:5432/opsd"
    assert settings.broker_url == "redis://redis:6379/0"
    assert settings.artifacts_uri == "s3://bucket/prefix"
    assert (settings.lease_seconds, settings.heartbeat_seconds) == (6.0, 2.0)
    assert settings.inference_url == "http://vllm:8000/v1" and settings.api_port == 9000
    assert sqlite_path(settings.database_url) is None


def test_to_env_round_trip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings = ServiceSettings(home=tmp_path, lease_seconds=9, queue="gpu-a100")
    for name, value in settings.to_env().items():
        assert name.startswith("OPSD_")
        monkeypatch.setenv(name, value)
    assert get_settings() == settings


def test_heartbeat_must_be_shorter_than_the_lease(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="heartbeat_seconds"):
        ServiceSettings(home=tmp_path, lease_seconds=3, heartbeat_seconds=3)
