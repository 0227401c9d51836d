"""The service commands of `opsd`: up, api, worker, migrate, keys.

`opsd up` is the embedded deployment in one command: it creates the home directory, applies the
migrations, makes a first API key when there is none (printed once and saved with mode 0600),
then runs the API and one worker as supervised child processes until Ctrl-C or SIGTERM. The
other commands run one part each, as the compose services do. Every command reads its settings
from `OPSD_*` environment variables (see `opsd_service.settings`); imports stay lazy so
`opsd --help` loads neither torch nor the web stack.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import typer

from opsd_service.settings import (
    ServiceSettings,
    api_key_file,
    ensure_home,
    get_settings,
    logs_dir,
    sqlite_path,
)

keys_app = typer.Typer(help="Manage API keys.", no_args_is_help=True)

DEFAULT_TENANT = "default"
EMBEDDED_DATASET_POLICY = '{"*": ["/"]}'
EMBEDDED_BASE_MODEL_POLICY = '{"*": ["*", "/"]}'


def register(app: typer.Typer) -> None:
    """Mount the service commands on the top-level `opsd` command."""
    app.command("up")(up)
    app.command("api")(api)
    app.command("worker")(worker)
    app.command("migrate")(migrate)
    app.add_typer(keys_app, name="keys")


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _open_store(settings: ServiceSettings) -> Any:
    from jobstore import Store

    return Store(settings.database_url)


def _close(store: Any) -> None:
    close = getattr(store, "close", None)
    if callable(close):
        close()


def _upgrade(settings: ServiceSettings) -> None:
    from jobstore.migrate import upgrade

    if (path := sqlite_path(settings.database_url)) is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)


def migrate() -> None:
    """Apply the database migrations (alembic upgrade head)."""
    settings = get_settings()
    _upgrade(settings)
    typer.echo(f"database at the latest revision: {_redact(settings.database_url)}")


@keys_app.command("create")
def keys_create(
    tenant: str = typer.Option(..., "--tenant", help="Tenant name (created if new)."),
    label: str | None = typer.Option(None, "--label", help="A note to recognise the key by."),
    admin: bool = typer.Option(
        False, "--admin", help="May also list and revoke every key (GET /keys, DELETE /keys)."
    ),
) -> None:
    """Create an API key; the key is printed once, alone on the last line."""
    store = _open_store(get_settings())
    try:
        key = store.create_api_key(tenant, label=label, admin=admin)
    finally:
        _close(store)
    kind = "an admin API key" if admin else "an API key"
    typer.echo(f"created {kind} for tenant {tenant!r}; it is shown only once:")
    typer.echo(key)


@keys_app.command("list")
def keys_list() -> None:
    """List every key: id, tenant, prefix, label, admin, created, last used, revoked."""
    store = _open_store(get_settings())
    try:
        records = store.list_api_keys()
    finally:
        _close(store)
    typer.echo("id\ttenant\tprefix\tlabel\tadmin\tcreated\tlast_used\trevoked")
    for r in records:
        cells = [r.id, r.tenant_name, r.prefix, r.label or "-", "yes" if r.admin else "no"]
        for when in (r.created_at, r.last_used_at, r.revoked_at):
            cells.append(when.isoformat(timespec="seconds") if when else "-")
        typer.echo("\t".join(cells))


@keys_app.command("revoke")
def keys_revoke(
    key: str = typer.Argument(..., help="The key's id (key_...), its prefix, or the key itself."),
) -> None:
    """Revoke a key. API processes refuse it within OPSD_KEY_REVOCATION_CHECK_SECONDS (1 s)."""
    store = _open_store(get_settings())
    try:
        if key.startswith("key_"):
            revoked = store.revoke_api_key_by_id(key)
        else:
            revoked = store.revoke_api_key(key) or None
    finally:
        _close(store)
    if revoked is None:
        typer.echo(f"no such key (or already revoked): {key}", err=True)
        raise typer.Exit(3)
    typer.echo(f"revoked {key}" if revoked else f"{key} was already revoked")


def api(
    host: str | None = typer.Option(None, "--host", help="Bind address (OPSD_API_HOST)."),
    port: int | None = typer.Option(None, "--port", help="Port (OPSD_API_PORT)."),
    workers: int | None = typer.Option(None, "--workers", help="Processes (OPSD_API_WORKERS)."),
) -> None:
    """Serve the HTTP API (uvicorn, `api.app:create_app`)."""
    import uvicorn

    settings = get_settings()
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=host or settings.api_host,
        port=port if port is not None else settings.api_port,
        workers=workers or settings.api_workers,
        proxy_headers=True,
        log_level="info",
    )


def worker(
    loglevel: str = typer.Option("INFO", "--loglevel", help="Celery log level."),
    gpus: int | None = typer.Option(
        None,
        "--gpus",
        min=1,
        max=64,
        help="Devices of this worker (OPSD_WORKER_GPUS): it consumes the queue of every "
        "configured resource class up to N and runs a job of several as a process group (on a "
        "CPU worker, N gloo processes).",
    ),
) -> None:
    """Run a training worker: one job at a time on this machine's accelerator."""
    import os

    from worker.main import run_worker

    if gpus is not None:  # every part of the worker reads its settings from the environment
        os.environ["OPSD_WORKER_GPUS"] = str(gpus)

    run_worker(loglevel=loglevel)


def _save_key(path: Path, key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    os.chmod(path, 0o600)


def _first_key(settings: ServiceSettings) -> None:
    store = _open_store(settings)
    try:
        if store.count_api_keys() > 0:
            saved = api_key_file(settings)
            where = f" (the first one is in {saved})" if saved.exists() else ""
            typer.echo(f"API keys already exist{where}")
            return
        key = store.create_api_key(DEFAULT_TENANT, label="opsd up", admin=True)
    finally:
        _close(store)
    path = api_key_file(settings)
    _save_key(path, key)
    typer.echo(f"created an API key for tenant {DEFAULT_TENANT!r} (saved in {path}):")
    typer.echo(f"  {key}")


def port_in_use(host: str, port: int) -> str | None:
    """Why `host:port` cannot be served (another program listens there), or None when free.

    Binds a socket the way uvicorn does (SO_REUSEADDR, so a port in TIME_WAIT counts as free)
    and closes it again. Port 0 (any free port) is always free.
    """
    if port == 0:
        return None
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve {host!r}: {exc.strerror}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def own_api_ready(url: str, instance_id: str) -> bool:
    """True when `url/readyz` answers 200 from the API process named `instance_id`.

    Another program on the port (or an `opsd` of another `opsd up`) may answer too: its answer
    carries no or another `X-OPSD-Instance` header and does not count.
    """
    import httpx

    from api.routes.health import INSTANCE_HEADER

    try:
        response = httpx.get(f"{url}/readyz", timeout=2.0)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and response.headers.get(INSTANCE_HEADER) == instance_id


def last_error_line(log_file: Path, offset: int) -> str:
    """The line of `log_file` (written past `offset`) that best says why a child failed: the
    last one mentioning an error, else the last line."""
    try:
        with open(log_file, "rb") as handle:
            handle.seek(offset)
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [""])[-1]


def wait_for_own_api(
    url: str, instance_id: str, supervisor: Any, log_file: Path, *, offset: int, timeout: float
) -> str | None:
    """Wait until this `opsd up`'s API child is ready; None then, else why it is not.

    The API child dying while it starts (a port taken after our check, a broken install...) is
    reported at once with the error line of its log, instead of being restarted in a loop.
    """
    deadline = time.monotonic() + timeout
    while not supervisor.stopping.is_set():
        code = supervisor.exit_code("api")
        if code is not None:
            line = last_error_line(log_file, offset)
            return f"the API exited with code {code} while starting: {line} (log: {log_file})"
        if own_api_ready(url, instance_id):
            return None
        if time.monotonic() > deadline:
            return f"the API was not ready after {timeout:.0f}s (log: {log_file})"
        supervisor.check()
        time.sleep(0.3)
    return "stopped while starting"


def up(
    host: str | None = typer.Option(None, "--host", help="API bind address."),
    port: int | None = typer.Option(None, "--port", help="API port."),
    home: Path | None = typer.Option(None, "--home", help="State directory (OPSD_HOME)."),
    grace: float = typer.Option(30.0, "--grace", help="Seconds children get to stop."),
) -> None:
    """Run the whole service on this machine: migrations, a first key, the API and a worker."""
    import secrets

    from opsd_service.supervisor import ChildSpec, Supervisor

    overrides: dict[str, Any] = {"instance_id": secrets.token_hex(8)}
    if home is not None:
        overrides["home"] = home
    if host is not None:
        overrides["api_host"] = host
    if port is not None:
        overrides["api_port"] = port
    # One local user: datasets and base models may be that user's own paths (the multi-tenant
    # `opsd api` default is uploaded files and hub ids only). Said at start; env vars win.
    if not os.environ.get("OPSD_DATASET_URI_POLICY"):
        overrides["dataset_uri_policy"] = EMBEDDED_DATASET_POLICY
    if not os.environ.get("OPSD_BASE_MODEL_POLICY"):
        overrides["base_model_policy"] = EMBEDDED_BASE_MODEL_POLICY
    settings = get_settings(**overrides)
    if (why := port_in_use(settings.api_host, settings.api_port)) is not None:
        typer.secho(
            f"error: cannot serve on {settings.api_host}:{settings.api_port}: {why} (another "
            "program is using it); stop it or pick another port with --port",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(1)
    ensure_home(settings)
    _upgrade(settings)
    typer.echo(f"home: {settings.home}")
    typer.echo(
        "datasets: uploaded files and, "
        + (
            "as the embedded single-user default, any local path this user can read"
            if settings.dataset_uri_policy == EMBEDDED_DATASET_POLICY
            else f"per OPSD_DATASET_URI_POLICY, {settings.dataset_uri_policy}"
        )
    )
    _first_key(settings)

    env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}
    python = [sys.executable, "-m", "opsd_service"]
    logs = logs_dir(settings)
    api_log = logs / "api.log"
    api_log_offset = api_log.stat().st_size if api_log.exists() else 0
    supervisor = Supervisor(
        [
            ChildSpec(
                "api",
                [*python, "api", "--host", settings.api_host, "--port", str(settings.api_port)],
                env,
                api_log,
            ),
            ChildSpec("worker", [*python, "worker"], env, logs / "worker.log"),
        ],
        grace_seconds=grace,
        say=lambda line: typer.echo(line),
    )
    supervisor.install_signal_handlers()
    supervisor.start()
    shown_host = "127.0.0.1" if settings.api_host in {"0.0.0.0", "::"} else settings.api_host
    url = f"http://{shown_host}:{settings.api_port}"
    typer.echo(f"logs: {logs}")
    typer.echo(f"API: {url}  (docs: {url}/docs, dashboard: {url}/ui)")
    failure = wait_for_own_api(
        url, settings.instance_id, supervisor, api_log, offset=api_log_offset, timeout=120.0
    )
    if failure is not None and not supervisor.stopping.is_set():
        typer.secho(f"error: {failure}", fg=typer.colors.RED, err=True)
        supervisor.stop_children()
        raise typer.Exit(1)
    if failure is None:
        typer.echo("ready; press Ctrl-C to stop")
    code = supervisor.run()
    typer.echo("stopped")
    raise typer.Exit(code)
