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
