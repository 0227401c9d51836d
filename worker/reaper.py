"""The expired-lease reaper: puts jobs and evals of lost workers back on the queue.

A worker that dies mid-run stops renewing its lease. `reap_once` asks the store to requeue every
job whose lease expired (attempt + 1, or `failed` with `worker_lost` when attempts are used up)
and sends a fresh message for each requeued job; the job then resumes from its last checkpoint
on whichever worker claims it. Every worker process runs `Reaper` in a background thread; the
store's conditional UPDATEs make concurrent reapers harmless, and a duplicate message is skipped
by the claim. It also re-sends queued jobs left untouched for long (a message lost with a killed
worker). Evals get the same two sweeps (an eval lost on its last attempt fails with
`worker_lost`). The same loop prunes old processed-message files of the file-backed broker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from celery import Celery

from worker.queue import enqueue_eval, enqueue_job

log = logging.getLogger("opsd.reaper")

PROCESSED_MESSAGE_MAX_AGE_SECONDS = 24 * 3600.0


def reap_once(
    store: Any, celery: Celery, *, stale_queued_after: timedelta | None = None
) -> list[str]:
    """Requeue jobs and evals with expired leases and re-enqueue each; returns their ids.

    With `stale_queued_after`, queued jobs and evals untouched that long get a fresh message too
    (their first one may have been lost with a killed worker).
    """
    lost = "its worker was lost; requeued"
    sent = _send(celery, enqueue_job, store.requeue_expired(), lost)
    sent += _send(celery, enqueue_eval, store.requeue_lost_evals(), lost)
    if stale_queued_after is not None:
        stale = f"queued for over {stale_queued_after}; sent again"
        jobs = store.requeue_stale_queued(older_than=stale_queued_after)
        sent += _send(celery, enqueue_job, jobs, stale)
        evals = store.resend_stale_queued_evals(older_than=stale_queued_after)
        sent += _send(celery, enqueue_eval, evals, stale)
    return sent


def _send(
    celery: Celery, enqueue: Callable[[Celery, str], str], record_ids: list[str], why: str
) -> list[str]:
    for record_id in record_ids:
        enqueue(celery, record_id)
        log.warning("%s: %s", record_id, why)  # ids name their kind: job_… / eval_…
    return list(record_ids)


def prune_processed(folder: str | Path | None, *, max_age_seconds: float) -> int:
    """Delete processed broker message files older than `max_age_seconds`; returns the count."""
    if folder is None:
        return 0
    folder, cutoff, removed = Path(folder), time.time() - max_age_seconds, 0
    if not folder.is_dir():
        return 0
    for path in folder.glob("*.msg"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed


class Reaper:
    """Runs `reap_once` every `interval` seconds in a daemon thread until `stop()`."""

    def __init__(
        self,
        store: Any,
        celery: Celery,
        *,
        interval: float,
        processed_folder: str | Path | None = None,
        stale_queued_after: timedelta | None = None,
    ) -> None:
        self.store, self.celery, self.interval = store, celery, interval
        self.stale_queued_after = stale_queued_after
        self.processed_folder = processed_folder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="opsd-reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                reap_once(self.store, self.celery, stale_queued_after=self.stale_queued_after)
                prune_processed(
                    self.processed_folder, max_age_seconds=PROCESSED_MESSAGE_MAX_AGE_SECONDS
                )
            except Exception:  # the database or broker is away: try again next round
                log.exception("reaper round failed")
