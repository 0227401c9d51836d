"""The expired-lease reaper: puts jobs, evals and pre-flights of lost workers back on the queue.

A worker that dies mid-run stops renewing its lease. `reap_once` asks the store to requeue every
job whose lease expired (attempt + 1, or `failed` with `worker_lost` when attempts are used up)
and sends a fresh message for each requeued job; the job then resumes from its last checkpoint
on whichever worker claims it. Every worker process runs `Reaper` in a background thread; the
store's conditional UPDATEs make concurrent reapers harmless, and a duplicate message is skipped
by the claim. It also re-sends queued jobs left untouched for long (a message lost with a killed
worker). Evals and pre-flights get the same two sweeps (one lost on its last attempt fails
with `worker_lost`). The same loop prunes old processed-message files of the file-backed broker.

Outages: after a round that could not reach the store (or one that stalled), the reaper gives
workers one lease of grace before it requeues expired leases: a live worker whose heartbeats
failed only because the store was away renews its lease or releases its job (same attempt)
meanwhile, instead of losing an attempt to the reaper. When the broker comes back after being
unreachable, or restarted (Redis's run id changed: a non-persistent Redis lost its messages),
every queued job and eval is sent again at once (a duplicate is skipped by the claim), so lost
messages wait one reaper interval, not `requeue_queued_after_seconds`.
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

from worker.queue import (
    broker_identity,
    enqueue_eval,
    enqueue_job,
    enqueue_preflight,
    job_gpus,
)

log = logging.getLogger("opsd.reaper")

PROCESSED_MESSAGE_MAX_AGE_SECONDS = 24 * 3600.0


def reap_once(
    store: Any,
    celery: Celery,
    *,
    stale_queued_after: timedelta | None = None,
    requeue_expired: bool = True,
) -> list[str]:
    """Requeue jobs, evals and pre-flights with expired leases and re-enqueue each; returns
    their ids.

    With `stale_queued_after`, queued jobs and evals untouched that long get a fresh message too
    (their first one may have been lost with a killed worker; `timedelta(0)`: every queued one).
    `requeue_expired=False` skips the expired leases (the grace after a store outage).
    """
    lost = "its worker was lost; requeued"
    sent: list[str] = []
    if requeue_expired:
        sent += _send(celery, store, enqueue_job, store.requeue_expired(), lost)
        sent += _send(celery, store, enqueue_eval, store.requeue_lost_evals(), lost)
        sent += _send(celery, store, enqueue_preflight, store.requeue_lost_preflights(), lost)
    if stale_queued_after is not None:
        stale = f"queued for over {stale_queued_after}; sent again"
        jobs = store.requeue_stale_queued(older_than=stale_queued_after)
        sent += _send(celery, store, enqueue_job, jobs, stale)
        evals = store.resend_stale_queued_evals(older_than=stale_queued_after)
        sent += _send(celery, store, enqueue_eval, evals, stale)
        preflights = store.resend_stale_queued_preflights(older_than=stale_queued_after)
        sent += _send(celery, store, enqueue_preflight, preflights, stale)
    return sent


def record_gpus(store: Any, record_id: str) -> int | None:
    """The resource class of a job (`job_…`) or of the job an eval (`eval_…`) evaluates; None
    for a pre-flight (`pf_…`, sent to the plain queue)."""
    job_id = record_id
    if record_id.startswith("pf_"):
        return None
    if record_id.startswith("eval_"):
        record = store.get_eval(record_id)
        if record is None:
            return 1
        job_id = record.job_id
    job = store.get_job(job_id)
    return job_gpus(job.spec) if job is not None else 1


def _send(
    celery: Celery,
    store: Any,
    enqueue: Callable[..., str],
    record_ids: list[str],
    why: str,
) -> list[str]:
    for record_id in record_ids:
        gpus = record_gpus(store, record_id)
        if gpus is None:  # a pre-flight: the plain queue, which every worker consumes
            enqueue(celery, record_id)
        else:
            enqueue(celery, record_id, gpus=gpus)
        log.warning("%s: %s", record_id, why)  # ids name their kind: job_… / eval_… / pf_…
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
    """Runs `reap_once` every `interval` seconds in a daemon thread until `stop()`.

    `lease_seconds` is the grace given to workers after a store outage (see the module doc).
    """

    def __init__(
        self,
        store: Any,
        celery: Celery,
        *,
        interval: float,
        processed_folder: str | Path | None = None,
        stale_queued_after: timedelta | None = None,
        lease_seconds: float = 30.0,
    ) -> None:
        self.store, self.celery, self.interval = store, celery, interval
        self.stale_queued_after = stale_queued_after
        self.processed_folder = processed_folder
        self.lease_seconds = lease_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="opsd-reaper", daemon=True)
        self._last_ok: float | None = None
        self._store_failed = False
        self._grace_until = 0.0
        self._broker: str | None = None
        self._broker_failed = False

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)

    def _broker_came_back(self) -> bool:
        """True when the broker answers again after failing, or restarted since last time."""
        try:
            identity = broker_identity(self.celery)
        except Exception as exc:
            if not self._broker_failed:
                log.warning("broker unreachable: %s", exc)
            self._broker_failed = True
            return False
        back = self._broker_failed or (
            identity is not None and self._broker is not None and identity != self._broker
        )
        self._broker, self._broker_failed = identity, False
        return back

    def round(self) -> list[str]:
        """One pass: expired leases (unless in grace), lost messages, old broker files."""
        now = time.monotonic()
        stalled = self._last_ok is not None and now - self._last_ok > 2 * self.interval + 5
        if self._store_failed or stalled:
            self._grace_until = now + self.lease_seconds
            log.warning("the store was unavailable; no lease expires for %ss", self.lease_seconds)
        resend_all = self._broker_came_back()
        stale = timedelta(0) if resend_all else self.stale_queued_after
        try:
            sent = reap_once(
                self.store,
                self.celery,
                stale_queued_after=stale,
                requeue_expired=now >= self._grace_until,
            )
        except Exception:
            self._store_failed = True
            raise
        self._store_failed = False
        self._last_ok = time.monotonic()
        if resend_all:
            log.warning("the broker is back: sent every queued job and eval again")
        prune_processed(self.processed_folder, max_age_seconds=PROCESSED_MESSAGE_MAX_AGE_SECONDS)
        return sent

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.round()
            except Exception:  # the database or broker is away: try again next round
                log.exception("reaper round failed")
