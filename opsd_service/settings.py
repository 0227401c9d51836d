"""Service settings: one `ServiceSettings` read from `OPSD_*` environment variables.

Every deployment shape is a set of environment variables. With none set, everything lives under
one home directory (`OPSD_HOME`, default `~/.opsd`): a SQLite database, a durable file-backed
Celery broker (kombu's `filesystem://` transport, messages are files that survive restarts) and
the artifacts. The compose stack points `OPSD_DATABASE_URL` at Postgres, `OPSD_BROKER_URL` at
Redis and `OPSD_ARTIFACTS_URI` at a shared volume (or any fsspec URI such as `s3://bucket/x`).

Values left empty are derived from `home` when the settings are built, so a resolved
`ServiceSettings` always holds concrete URLs; `to_env()` hands them to child processes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "OPSD_"
FILESYSTEM_BROKER_SCHEME = "filesystem"


def _default_home() -> Path:
    return Path("~/.opsd")


class ServiceSettings(BaseSettings):
    """Everything a service process needs; each field is read from `OPSD_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    home: Path = Field(default_factory=_default_home, description="Root of the embedded state.")
    database_url: str = Field("", description="SQLAlchemy URL; default SQLite under home.")
    broker_url: str = Field("", description="Celery broker URL; default file-backed under home.")
    artifacts_uri: str = Field("", description="Local path or fsspec URI for checkpoints/adapters.")
    lease_seconds: float = Field(30.0, gt=0, description="A running job's lease length.")
    heartbeat_seconds: float = Field(0.0, ge=0, description="Lease renewal period; 0 = lease/3.")
    max_attempts: int = Field(3, ge=1, description="Runs of a job before a lost worker fails it.")
    reaper_interval_seconds: float = Field(10.0, gt=0, description="Expired-lease sweep period.")
    requeue_queued_after_seconds: float = Field(
        900.0, gt=0, description="Re-send a job's message when it stayed queued this long."
    )
    queue: str = Field("opsd", min_length=1, description="Celery queue the jobs go to.")
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=0, le=65535)
    api_workers: int = Field(1, ge=1, le=64, description="uvicorn worker processes of `opsd api`.")
    auth_cache_seconds: float = Field(
        30.0, ge=0.0, description="How long the API trusts a checked key (revocation delay)."
    )
    max_body_bytes: int = Field(1024 * 1024, ge=1)
    max_lora_rank: int = Field(256, ge=1)
    inference_url: str | None = Field(None, description="OpenAI-compatible server for adapters.")
    training_rollouts: Literal["auto", "local", "server"] = Field(
        "auto",
        description="Where OPSD/GRPO rollouts are sampled: `server` (the inference server, "
        "vLLM), `local` (in the worker), `auto` (the server when it serves the job's base model).",
    )
    rollout_adapter_dir: str = Field(
        "",
        description="Where the worker writes each step's adapter for the inference server to "
        "load (the same path on both); default: `rollout-adapters` under a local artifacts root.",
    )
    metrics_tenant_classes: dict[str, str] = Field(
        default_factory=dict,
        description="Tenant name -> class for the `opsd_jobs` metric of GET /metrics (a JSON "
        "object); tenants not named are `default`.",
    )
    worker_metrics_port: int = Field(
        0, ge=0, le=65535, description="Port of a worker's Prometheus /metrics; 0: none."
    )
    worker_metrics_host: str = Field("127.0.0.1", description="Bind address of that endpoint.")
    instance_id: str = Field(
        "",
        description="Set by `opsd up` for its API child, which echoes it in the X-OPSD-Instance "
        "header of /healthz and /readyz: `opsd up` tells its own API from another server on the "
        "port.",
    )
    broker_visibility_timeout_seconds: float = Field(
        3600.0, gt=0, description="Redis: an unacked message is redelivered after this long."
    )
    # -- untrusted tenants: what a job may read, how much a tenant may ask, store blips
    dataset_uri_policy: str = Field(
        "",
        description="JSON {tenant or '*': [allowed URI prefixes / local roots]}; empty: uploaded "
        "files only (see opsd_engine.access).",
    )
    base_model_policy: str = Field(
        "", description="JSON {tenant or '*': [hub-id patterns / local roots]}; empty: hub ids."
    )
    dataset_private_hosts: str = Field(
        "", description="Comma-separated host:port of trusted http(s) dataset servers."
    )
    max_file_bytes: int = Field(64 * 1024 * 1024, ge=1, description="Largest upload (bytes).")
    max_file_rows: int = Field(1_000_000, ge=1, description="Most rows of an uploaded file.")
    max_tenant_file_bytes: int = Field(
        2 * 1024**3, ge=1, description="Bytes of uploaded files one tenant may keep."
    )
    max_queued_jobs_per_tenant: int = Field(
        50, ge=1, description="Queued jobs (and queued evals) one tenant may have at once."
    )
    rate_limit: str = Field(
        "25/second", description="Requests per API key (`limits` notation: '25/second;600/minute')."
    )
    failed_auth_limit: str = Field(
        "20/minute", description="Failed authentications per client address before a 429."
    )
    rate_limit_storage_uri: str = Field(
        "memory://", description="Where counters live (`limits` storage URI; redis:// to share)."
    )
    key_revocation_check_seconds: float = Field(
        1.0, ge=0.0, description="How often each API process looks for revoked keys (0: always)."
    )
    store_timeout_seconds: float = Field(
        1.5, gt=0, description="The API answers 503 when the store takes longer than this."
    )
    max_job_seconds: float = Field(
        86_400.0, gt=0, description="Wall-time limit of one job (failed: time_limit_exceeded)."
    )
    store_outage_wait_seconds: float = Field(
        600.0, gt=0, description="How long a worker waits for the store to come back."
    )
    # -- scale-out: resource classes, multi-process jobs, fair dispatch (issue 14)
    resource_classes: str = Field(
        "1",
        pattern=r"^\s*[1-9][0-9]{0,1}(\s*,\s*[1-9][0-9]{0,1})*\s*$",
        description="Comma-separated GPU counts the deployment's workers offer (`1,2,8`); a job "
        "asking for another `resources.gpus` is refused (422). Queue of class N: `<queue>.gpuN`.",
    )
    worker_gpus: int = Field(
        1,
        ge=1,
        le=64,
        description="Devices of this worker (`opsd worker --gpus N`); it consumes every resource "
        "class up to N. On a CPU worker each is one gloo process.",
    )
    tenant_max_running_jobs: int = Field(
        0, ge=0, description="Jobs of one tenant running at once across workers; 0: no cap."
    )
    collective_timeout_s: float = Field(
        600.0, gt=0, description="How long a rank of a multi-process job waits on a collective."
    )
    launch_stop_grace_seconds: float = Field(
        120.0,
        gt=0,
        description="After the stop file, how long a multi-process job may take to stop with a "
        "checkpoint before its process group is terminated.",
    )
    launch_ports: str = Field(
        "",
        pattern=r"^(|[0-9]{1,5}-[0-9]{1,5})$",
        description="`LOW-HIGH` rendezvous ports of multi-process jobs; empty: torchrun "
        "--standalone picks a free one.",
    )

    @model_validator(mode="after")
    def _check_policies(self) -> ServiceSettings:
        self.access_policy()  # a malformed policy stops the process at start
        try:
            from limits import parse_many
        except ImportError:  # the SDK-only install: no API to rate-limit
            return self
        for name in ("rate_limit", "failed_auth_limit"):
            try:
                parse_many(getattr(self, name))
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return self

    def gpu_classes(self) -> list[int]:
        """The resource classes (GPU counts) of `resource_classes`, sorted, without repeats."""
        return sorted({int(part) for part in self.resource_classes.split(",")})

    def served_gpu_classes(self) -> list[int]:
        """The classes this worker consumes: every configured class up to `worker_gpus`."""
        return [n for n in self.gpu_classes() if n <= self.worker_gpus]

    def access_policy(self) -> Any:
        """The parsed `opsd_engine.access.AccessPolicy` of these settings."""
        from opsd_engine.access import AccessPolicy

        return AccessPolicy.parse(
            self.dataset_uri_policy, self.base_model_policy, self.dataset_private_hosts
        )

    @model_validator(mode="after")
    def _derive_defaults(self) -> ServiceSettings:
        home = Path(os.path.expandvars(str(self.home))).expanduser().absolute()
        self.home = home
        if not self.database_url:
            self.database_url = f"sqlite:///{home / 'opsd.db'}"
        if not self.broker_url:
            self.broker_url = f"{FILESYSTEM_BROKER_SCHEME}://{home / 'broker'}"
        if not self.artifacts_uri:
            self.artifacts_uri = str(home / "artifacts")
        if not self.rollout_adapter_dir:
            local_artifacts = urlsplit(self.artifacts_uri).scheme in ("", "file")
            root = Path(unquote(urlsplit(self.artifacts_uri).path)) if local_artifacts else home
            self.rollout_adapter_dir = str(root / "rollout-adapters")
        if self.training_rollouts == "server" and not self.inference_url:
            raise ValueError("training_rollouts=server needs inference_url (OPSD_INFERENCE_URL)")
        if not self.heartbeat_seconds:
            self.heartbeat_seconds = self.lease_seconds / 3
        if self.heartbeat_seconds >= self.lease_seconds:
            raise ValueError("heartbeat_seconds must be shorter than lease_seconds")
        return self

    def to_env(self) -> dict[str, str]:
        """The resolved settings as `OPSD_*` variables, for child processes to inherit."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is not None:
                # complex fields travel as JSON, the form pydantic-settings reads them in
                text = json.dumps(value) if isinstance(value, dict | list) else str(value)
                env[ENV_PREFIX + name.upper()] = text
        return env


def get_settings(**overrides: Any) -> ServiceSettings:
    """Settings from the environment (fresh each call), with keyword overrides on top."""
    return ServiceSettings(**overrides)


# ------------------------------------------------------------------------- derived locations
def runs_dir(settings: ServiceSettings) -> Path:
    """Local scratch space for job runs when artifacts live remotely."""
    return settings.home / "runs"


def api_key_file(settings: ServiceSettings) -> Path:
    """Where `opsd up` saves the first API key (mode 0600)."""
    return settings.home / "api_key"


def logs_dir(settings: ServiceSettings) -> Path:
    return settings.home / "logs"


def is_filesystem_broker(broker_url: str) -> bool:
    return urlsplit(broker_url).scheme == FILESYSTEM_BROKER_SCHEME


def filesystem_broker_root(settings: ServiceSettings) -> Path:
    """The folder of a `filesystem://PATH` broker (`{home}/broker` when the URL has no path)."""
    parts = urlsplit(settings.broker_url)
    path = unquote(parts.netloc + parts.path)
    return Path(path).expanduser() if path else settings.home / "broker"


def sqlite_path(database_url: str) -> Path | None:
    """The database file of a `sqlite:///FILE` URL (None for other databases and `:memory:`)."""
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database)


def ensure_home(settings: ServiceSettings) -> None:
    """Create the home and every local folder the settings point at."""
    settings.home.mkdir(parents=True, exist_ok=True)
    if (db := sqlite_path(settings.database_url)) is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    if is_filesystem_broker(settings.broker_url):
        root = filesystem_broker_root(settings)
        for sub in ("data", "processed", "control"):
            (root / sub).mkdir(parents=True, exist_ok=True)
    if "://" not in settings.artifacts_uri or settings.artifacts_uri.startswith("file://"):
        Path(settings.artifacts_uri.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
