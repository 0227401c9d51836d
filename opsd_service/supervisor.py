"""A small process supervisor for `opsd up`: start children, restart crashes, stop cleanly.

Each child runs in its own session, so a Ctrl-C in the terminal reaches only the supervisor,
which then stops the children itself (SIGTERM, a grace period, SIGKILL as a last resort) and
reaps them. A child that exits on its own is restarted after an exponential backoff, at most
`max_restarts` times in a row (a child that stayed up for `stable_seconds` starts a new count);
past that the supervisor stops everything and reports the failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO


@dataclass
class ChildSpec:
    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    log_file: Path | None = None  # stdout+stderr appended here; None inherits the terminal


@dataclass
class _Child:
    spec: ChildSpec
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    restart_at: float | None = None
    log: IO[bytes] | None = field(default=None, repr=False)


class Supervisor:
    """Runs children until `stop` is requested or one of them keeps crashing."""

    def __init__(
        self,
        children: Sequence[ChildSpec],
        *,
        max_restarts: int = 5,
        backoff_seconds: float = 1.0,
        max_backoff_seconds: float = 30.0,
        stable_seconds: float = 60.0,
        grace_seconds: float = 30.0,
        say: Callable[[str], None] = print,
    ) -> None:
        self.children = [_Child(spec) for spec in children]
        self.max_restarts = max_restarts
        self.backoff_seconds, self.max_backoff_seconds = backoff_seconds, max_backoff_seconds
        self.stable_seconds, self.grace_seconds = stable_seconds, grace_seconds
        self.say = say
        self.stopping = threading.Event()
        self.failed: str | None = None

    # ---------------------------------------------------------------------------- children
    def _spawn(self, child: _Child) -> None:
        spec = child.spec
        out: IO[bytes] | int | None = None
        if spec.log_file is not None:
            spec.log_file.parent.mkdir(parents=True, exist_ok=True)
            if child.log is None:
                child.log = open(spec.log_file, "ab")  # noqa: SIM115 - kept open for the child
            out = child.log
        child.process = subprocess.Popen(
            list(spec.argv),
            env=dict(spec.env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            start_new_session=True,
        )
        child.started_at = time.monotonic()
        child.restart_at = None
        self.say(f"started {spec.name} (pid {child.process.pid})")

    def start(self) -> None:
        for child in self.children:
            self._spawn(child)

    def pids(self) -> dict[str, int]:
        return {c.spec.name: c.process.pid for c in self.children if c.process is not None}

    def exit_code(self, name: str) -> int | None:
        """The exit code of child `name` if its current process has exited (not restarted yet),
        else None. Lets a caller notice a child that died while starting before `check` restarts
        it."""
        for child in self.children:
            if child.spec.name == name and child.process is not None:
                return child.process.poll()
        return None

    def check(self) -> None:
        """One supervision round: notice exits, schedule and perform restarts."""
        now = time.monotonic()
        for child in self.children:
            if self.stopping.is_set():
                return
            process = child.process
            if process is not None and process.poll() is not None:
                code = process.returncode
                uptime = now - child.started_at
                child.process = None
                if uptime >= self.stable_seconds:
                    child.restarts = 0
                child.restarts += 1
                if child.restarts > self.max_restarts:
                    self.failed = (
                        f"{child.spec.name} exited with code {code} and was restarted "
                        f"{self.max_restarts} times; giving up"
                        + (f" (see {child.spec.log_file})" if child.spec.log_file else "")
                    )
                    self.say(self.failed)
                    self.stopping.set()
                    return
                delay = min(
                    self.max_backoff_seconds, self.backoff_seconds * 2 ** (child.restarts - 1)
                )
                child.restart_at = now + delay
                self.say(
                    f"{child.spec.name} exited with code {code}; restarting in {delay:.0f}s "
                    f"({child.restarts}/{self.max_restarts})"
                )
            elif process is None and child.restart_at is not None and now >= child.restart_at:
                self._spawn(child)

    def run(self, *, poll_seconds: float = 0.5) -> int:
        """Supervise until `stopping` is set; stop the children; 0 on a requested stop."""
        while not self.stopping.wait(poll_seconds):
            self.check()
        self.stop_children()
        return 1 if self.failed else 0

    def request_stop(self, *_: object) -> None:
        self.stopping.set()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self.request_stop)

    def stop_children(self) -> None:
        """SIGTERM every child, wait up to the grace period, SIGKILL what is left, reap all."""
        running = [c for c in self.children if c.process is not None and c.process.poll() is None]
        for child in running:
            assert child.process is not None
            self.say(f"stopping {child.spec.name} (pid {child.process.pid})")
            _signal(child.process, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_seconds
        for child in running:
            assert child.process is not None
            try:
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(f"{child.spec.name} did not stop in {self.grace_seconds:.0f}s; killing")
                _signal(child.process, signal.SIGKILL, group=True)
                child.process.wait()
        for child in self.children:
            if child.log is not None:
                child.log.close()
                child.log = None


def _signal(process: subprocess.Popen[bytes], sig: int, *, group: bool = False) -> None:
    try:
        if group:
            os.killpg(process.pid, sig)  # the child leads its own session and group
        else:
            process.send_signal(sig)
    except ProcessLookupError:
        pass
