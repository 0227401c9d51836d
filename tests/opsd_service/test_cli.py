"""The service commands: `opsd migrate`, `opsd keys create`, and `opsd up` as a real process
(migrations, first key saved 0600, API + worker children, clean stop on SIGTERM)."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from typer.testing import CliRunner

from tests.service_fixtures import sqlite_url
from tests.worker.helpers import REPO, opsd_command, service_env, wait_for


def _opsd_app() -> Any:  # the whole top-level command, as the console script builds it
    from opsd_cli import app

    return app


def test_migrate_then_keys_create_prints_the_key_last(tmp_path: Path) -> None:
    from jobstore import Store

    url = sqlite_url(tmp_path / "db" / "opsd.db")
    env = {"OPSD_HOME": str(tmp_path / "home"), "OPSD_DATABASE_URL": url}
    runner = CliRunner()

    result = runner.invoke(_opsd_app(), ["migrate"], env=env)
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        _opsd_app(), ["keys", "create", "--tenant", "acme", "--label", "ci"], env=env
    )
    assert result.exit_code == 0, result.output

    key = result.output.strip().splitlines()[-1]
    assert key and " " not in key
    store = Store(url)
    tenant = store.authenticate(key)
    assert tenant is not None and tenant.name == "acme"
    assert store.count_api_keys() == 1
    store.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Lines:
    """Collects a process's stdout lines from a thread."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert process.stdout is not None
        self._thread = threading.Thread(target=self._read, args=(process.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.lines.append(line.rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def test_opsd_up_serves_and_stops_cleanly(tmp_path: Path) -> None:
    home, port = tmp_path / "home", _free_port()
    process = subprocess.Popen(
        [*opsd_command(), "up", "--home", str(home), "--port", str(port)],
        env=service_env(),
        cwd=str(REPO),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = _Lines(process)
    try:
        wait_for(
            lambda: "ready" in out.text or process.poll() is not None,
            timeout=120,
            what="opsd up to be ready",
        )
        assert process.poll() is None, out.text
        assert f"API: http://127.0.0.1:{port}" in out.text

        key_file = home / "api_key"
        key = key_file.read_text().strip()
        assert key and key in out.text and str(key_file) in out.text
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
        ready = httpx.get(f"{base}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text  # the API found the SQLite store and broker

        children = {
            name: int(pid) for name, pid in re.findall(r"started (\w+) \(pid (\d+)\)", out.text)
        }
        assert set(children) == {"api", "worker"}
        assert (home / "opsd.db").is_file() and (home / "broker" / "data").is_dir()
        wait_for(
            lambda: "ready on queue" in (home / "logs" / "worker.log").read_text(),
            timeout=60,
            what="the worker to be ready",
        )

        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, out.text
        assert time.monotonic() - started < 15
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    for name, pid in children.items():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"child {name} (pid {pid}) is still running")
    assert "stopped" in out.text


class _ForeignServer:
    """Another program on the port: answers every GET with 200 `{"status": "ok"}`, as a
    stranger's /readyz might."""

    def __init__(self) -> None:
        import http.server

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = b'{"status": "ok", "checks": {}}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_opsd_up_on_a_taken_port_fails_at_once_with_one_clear_line(tmp_path: Path) -> None:
    foreign = _ForeignServer()
    try:
        home = tmp_path / "home"
        result = subprocess.run(
            [*opsd_command(), "up", "--home", str(home), "--port", str(foreign.port)],
            env=service_env(),
            cwd=str(REPO),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        foreign.close()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "ready" not in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("error: ") and f"127.0.0.1:{foreign.port}" in errors[0]
    assert "--port" in errors[0]
    assert "started api" not in result.stdout and not (home / "logs").exists()


def test_readiness_counts_only_the_api_of_this_opsd_up(tmp_path: Path, monkeypatch) -> None:
    """A stranger answering /readyz 200 is not our API; our API (named by its instance id) is."""
    from api.app import create_app
    from opsd_service.cli import own_api_ready
    from opsd_service.settings import ServiceSettings

    foreign = _ForeignServer()
    try:
        assert not own_api_ready(f"http://127.0.0.1:{foreign.port}", "abc123")
    finally:
        foreign.close()

    import uvicorn

    settings = ServiceSettings(home=tmp_path / "home", instance_id="abc123")
    from jobstore.migrate import upgrade

    upgrade(settings.database_url)
    app = create_app(settings, enqueue=lambda job_id: None, broker_ping=lambda: True)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: own_api_ready(url, "abc123"), timeout=30, what="our API to be ready")
        assert not own_api_ready(url, "another-instance")
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_an_api_that_dies_while_starting_is_reported_at_once_with_its_error(
    tmp_path: Path,
) -> None:
    """The API child exits while starting (as uvicorn does on 'address already in use' when the
    port was taken between the check and its bind): the reason is returned at once, from the
    child's log, instead of restarts with backoff until a timeout."""
    import sys

    from opsd_service.cli import wait_for_own_api
    from opsd_service.supervisor import ChildSpec, Supervisor

    log = tmp_path / "api.log"
    log.write_text("ERROR: an old run's error\n")
    offset = log.stat().st_size
    crash = (
        "import sys; print('INFO: starting'); "
        'print("ERROR: [Errno 98] error while attempting to bind on address '
        "('127.0.0.1', 8000): address already in use\"); sys.exit(1)"
    )
    supervisor = Supervisor(
        [ChildSpec("api", [sys.executable, "-c", crash], dict(os.environ), log)],
        backoff_seconds=0.05,
        say=lambda line: None,
    )
    supervisor.start()
    try:
        why = wait_for_own_api(
            f"http://127.0.0.1:{_free_port()}", "x", supervisor, log, offset=offset, timeout=60
        )
    finally:
        supervisor.stop_children()
    assert why is not None and "address already in use" in why and "exited with code 1" in why
    assert "an old run" not in why and str(log) in why  # (a timeout would say "not ready")
