"""The `opsd up` supervisor with real child processes: restarts with backoff, gives up after N,
stops children on request (SIGKILL for one that ignores SIGTERM) and reaps them all."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from opsd_service.supervisor import ChildSpec, Supervisor

SLEEPER = "import time; time.sleep(60)"


def _child(name: str, code: str, tmp_path: Path) -> ChildSpec:
    return ChildSpec(name, [sys.executable, "-c", code], dict(os.environ), tmp_path / f"{name}.log")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_restarts_a_crashed_child_then_stops_cleanly(tmp_path: Path) -> None:
    marker = tmp_path / "crashed-once"
    flaky = (
        "import os, sys, time\n"
        f"if not os.path.exists({str(marker)!r}):\n"
        f"    open({str(marker)!r}, 'w').close(); print('crashing'); sys.exit(3)\n"
        "time.sleep(60)\n"
    )
    lines: list[str] = []
    supervisor = Supervisor(
        [_child("steady", SLEEPER, tmp_path), _child("flaky", flaky, tmp_path)],
        backoff_seconds=0.05,
        say=lines.append,
    )
    supervisor.start()
    first = supervisor.pids()
    stopper = threading.Timer(2.0, supervisor.request_stop)
    stopper.start()

    assert supervisor.run(poll_seconds=0.05) == 0

    assert any("flaky exited with code 3; restarting" in line for line in lines), lines
    pids = supervisor.pids()
    assert pids["steady"] == first["steady"] and pids["flaky"] != first["flaky"]
    assert all(_gone(pid) for pid in pids.values())
    assert "crashing" in (tmp_path / "flaky.log").read_text()


def test_gives_up_after_max_restarts(tmp_path: Path) -> None:
    lines: list[str] = []
    supervisor = Supervisor(
        [_child("steady", SLEEPER, tmp_path), _child("broken", "raise SystemExit(2)", tmp_path)],
        max_restarts=2,
        backoff_seconds=0.01,
        say=lines.append,
    )
    supervisor.start()
    assert supervisor.run(poll_seconds=0.02) == 1
    assert supervisor.failed and "broken exited with code 2" in supervisor.failed
    assert sum("started broken" in line for line in lines) == 3
    assert all(_gone(pid) for pid in supervisor.pids().values())


def test_a_child_ignoring_sigterm_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    supervisor = Supervisor(
        [_child("stubborn", stubborn, tmp_path)], grace_seconds=0.5, say=lambda _: None
    )
    supervisor.start()
    threading.Timer(0.5, supervisor.request_stop).start()
    assert supervisor.run(poll_seconds=0.05) == 0
    assert _gone(supervisor.pids()["stubborn"])
