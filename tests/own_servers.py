"""Servers a test starts, stops and pauses itself: a PostgreSQL cluster and a Redis server.

Outage tests must never touch the shared services, so each gets its own, on a port of the
range ``OPSD_TEST_OWN_PORTS`` (default 16200-16299): :class:`OwnPostgres` is a fresh cluster
(``initdb`` into a temporary folder, run as the ``postgres`` user when the tests run as root,
since PostgreSQL refuses root) driven by ``pg_ctl``; :meth:`OwnPostgres.pause` stops every
process of the cluster with SIGSTOP (a hung database: connections stay open, nothing answers).
:class:`OwnRedis` is a non-persistent ``redis-server`` (a restart loses every message, like the
report's broker). Tests that need the binaries fail, never skip, when they are missing.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.service_fixtures import XDIST_WORKERS_MAX, xdist_worker_index

PORTS_ENV = "OPSD_TEST_OWN_PORTS"


def own_port() -> int:
    """A free port of the range reserved for the tests' own servers.

    Under pytest-xdist the range is split, one share per worker, so two workers never pick the
    same port between the check here and their server's start.
    """
    low, high = (int(p) for p in os.environ.get(PORTS_ENV, "16200-16299").split("-"))
    share = (high - low + 1) // XDIST_WORKERS_MAX
    low += share * xdist_worker_index()
    high = low + share - 1
    for port in range(low, high + 1):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{high} ({PORTS_ENV})")


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or ""]
    if not found[-1]:
        raise RuntimeError(f"PostgreSQL's {name} is not installed (apt-get install postgresql)")
    return found[-1]


class OwnPostgres:
    """A throw-away PostgreSQL cluster on 127.0.0.1:`port` (trust auth, user postgres)."""

    def __init__(self) -> None:
        self.port = own_port()
        self.root = Path(tempfile.mkdtemp(prefix="opsd-own-pg-"))
        self.data = self.root / "data"
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_postgres:
            shutil.chown(self.root, "postgres")
            os.chmod(self.root, 0o755)
        self._run(_pg_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str) -> None:
        subprocess.run([*self.as_postgres, *argv], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off"
        )
        log = str(self.root / "postgres.log")
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-l", log, "-w", "start")

    def stop(self) -> None:
        """A fast shutdown: open connections are closed (a database restart's first half)."""
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def _pids(self) -> list[int]:
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = []
        for stat in glob.glob("/proc/[0-9]*/stat"):
            try:
                fields = Path(stat).read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == postmaster:
                children.append(int(Path(stat).parent.name))
        return [postmaster, *children]

    def pause(self) -> None:
        """SIGSTOP every process of the cluster: the database hangs."""
        for pid in self._pids():
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in self._pids():
            os.kill(pid, signal.SIGCONT)

    def destroy(self) -> None:
        try:
            self.resume()
            self.stop()
        except Exception:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


class OwnRedis:
    """A non-persistent redis-server on 127.0.0.1:`port` (a restart loses every key)."""

    def __init__(self) -> None:
        self.port = own_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.dir = Path(tempfile.mkdtemp(prefix="opsd-own-redis-"))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.process = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
