"""What running a job's sub-task (an eval, a pre-flight) on this worker shares: the lease
keeper and how a failure is logged.

The store's claim gives the worker a lease of ``lease_seconds`` on the task's row;
:class:`TaskLease` renews it from a daemon thread every third of that, and sets ``lost`` once
the store answers that another worker holds it now (the runner then stops writing). A renewal
that fails (the store is away for a moment) is logged and tried again at the next tick. Jobs
have their own heartbeat (:mod:`worker.runner`), which also carries their status.

:func:`log_failure` logs a failed task: a system error at ERROR with its traceback, a user's
(bad data, a missing file) at INFO.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from jobstore.records import JobError

log = logging.getLogger("opsd.worker")


class TaskLease:
    """Renews a sub-task's lease from a daemon thread while inside ``with``.

    ``renew()`` extends the lease by ``lease_seconds`` and returns False if the task is not held
    any more; ``kind`` and ``task_id`` name the task in logs and in the thread's name
    (``<kind>-lease``); ``on_renewal``, if given, is told each outcome: ``ok``, ``lost`` or
    ``error`` (the Prometheus counter).
    """

    def __init__(
        self,
        kind: str,
        task_id: str,
        renew: Callable[[], bool],
        lease_seconds: float,
        *,
        on_renewal: Callable[[str], None] | None = None,
    ) -> None:
        self.kind, self.task_id, self.renew = kind, task_id, renew
        self.lease_seconds = lease_seconds
        self.on_renewal = on_renewal
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"{kind}-lease", daemon=True)

    def __enter__(self) -> TaskLease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                owned = self.renew()
            except Exception as exc:  # the database is away for a moment: try again later
                self._count("error")
                log.warning("%s %s: lease renewal failed: %s", self.kind, self.task_id, exc)
                continue
            self._count("ok" if owned else "lost")
            if not owned:
                self.lost.set()
                return

    def _count(self, result: str) -> None:
        if self.on_renewal is not None:
            self.on_renewal(result)


def log_failure(kind: str, task_id: str, error: JobError) -> None:
    """Log that the ``kind`` task ``task_id`` failed with ``error`` (a system error at ERROR with
    the traceback being handled, a user error at INFO)."""
    system = error.category == "system"
    log.log(
        logging.ERROR if system else logging.INFO,
        "%s %s failed: %s",
        kind,
        task_id,
        error.message,
        exc_info=system,
    )
