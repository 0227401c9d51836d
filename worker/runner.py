"""Running one job on this worker: claim, lease, train, report, finish (no Celery in here).

`run_job` is what the Celery task calls and what the tests call directly. It claims the job row
with a lease (a job that is not `queued` any more is a duplicate delivery and is skipped), keeps
the lease alive from a heartbeat thread, runs the engine with `resume=True` (a requeued job
continues from its last checkpoint) and writes every report into the store through
`StoreCallbacks`. It ends in exactly one terminal write: `finish_job` with the published adapter,
`mark_cancelled` (the engine saved a partial checkpoint), or `fail_job` with a readable
`JobError` -- unless the lease was lost, in which case another worker owns the job now and this
one writes nothing. No exception escapes from a claimed job.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from jobstore.records import CANCELLING, TERMINAL_STATUSES, JobError
from opsd_service.settings import ServiceSettings, runs_dir
from worker import prometheus as worker_metrics
from worker.artifacts import ArtifactStore
from worker.inference_client import InferenceError
from worker.served_rollouts import served_rollouts

log = logging.getLogger("opsd.worker")

SKIPPED = "skipped"  # the job was not claimable (duplicate delivery, cancelled, finished)
LEASE_LOST = "lease_lost"  # another worker owns the job now; nothing terminal was written
INTERRUPTED = "interrupted"  # shutting down and the release failed; the lease expiry requeues it
RELEASED = "released"  # shutting down: handed back to the queue as the same attempt

EVAL_ACTIVITY_EVENTS = ("eval_started", "eval_progress", "eval_finished")
MAX_ERROR_MESSAGE = 4000
MAX_EVENT_DATA = 4000
OOM_ADVICE = (
    "Lower optim.batch_size (raise optim.grad_accum to keep the effective batch), lower "
    "max_new_tokens, and keep runtime.gradient_checkpointing enabled."
)

_shutdown = threading.Event()
T = TypeVar("T")


def request_shutdown() -> None:
    """Ask the running job (if any) to stop at its next step boundary: the process is leaving.

    The job is handed back to the queue (`release_job`, same attempt) and resumes elsewhere from
    the checkpoint the engine saves on the way out; if that write fails, its lease expires and
    the reaper requeues it.
    """
    _shutdown.set()


def shutdown_requested() -> bool:
    return _shutdown.is_set()


def new_worker_id() -> str:
    """A lease owner id unique to this process: `hostname:pid:random`."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------------- errors
def _is_oom(exc: BaseException) -> bool:
    try:
        import torch

        oom_types = tuple(
            t
            for t in (
                getattr(torch, "OutOfMemoryError", None),
                getattr(torch.cuda, "OutOfMemoryError", None),
            )
            if isinstance(t, type)
        )
    except ImportError:  # pragma: no cover - torch is always there on a worker
        oom_types = ()
    if oom_types and isinstance(exc, oom_types):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _clip(text: str, limit: int = MAX_ERROR_MESSAGE) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def classify_error(exc: BaseException) -> JobError:
    """The readable error a failed job carries: a code, a message, user or system at fault."""
    from opsd_engine.checkpoint import ResumeMismatchError
    from opsd_engine.config import SpecError
    from opsd_engine.data import DatasetError
    from opsd_engine.modeling import ModelLoadError

    if isinstance(exc, ResumeMismatchError):
        return JobError("resume_mismatch", _clip(str(exc)), "user")
    if isinstance(exc, SpecError):
        return JobError("invalid_spec", _clip(str(exc)), "user")
    if isinstance(exc, DatasetError):
        return JobError("dataset_error", _clip(str(exc)), "user")
    if isinstance(exc, ModelLoadError):
        return JobError("model_load_error", _clip(str(exc)), "user")
    if isinstance(exc, InferenceError):
        return JobError("inference_server_error", _clip(str(exc)), "system")
    if _is_oom(exc):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "out of memory"
        return JobError("out_of_memory", _clip(f"{first[:1000]}. {OOM_ADVICE}"), "user")
    return JobError("internal_error", _clip(f"{type(exc).__name__}: {exc}"), "system")


# ---------------------------------------------------------------------------------- lease
class LeaseKeeper:
    """Renews the job's lease every `interval` seconds from a daemon thread.

    `status` caches the job's status as the last heartbeat saw it; `lost` is set when the store
    says another worker owns the job, or when no heartbeat succeeded for a whole lease.
    """

    def __init__(
        self,
        store: Any,
        job_id: str,
        worker_id: str,
        *,
        lease_seconds: float,
        interval: float,
        status: str,
    ) -> None:
        self.store, self.job_id, self.worker_id = store, job_id, worker_id
        self.lease_seconds, self.interval = lease_seconds, interval
        self.status = status
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._last_ok = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name=f"lease-{job_id[:8]}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval + 5)

    def beat(self) -> None:
        try:
            status = self.store.heartbeat(
                self.job_id, self.worker_id, lease_seconds=self.lease_seconds
            )
        except Exception as exc:  # the database is away: keep trying until the lease is over
            worker_metrics.lease_renewed("error")
            log.warning("heartbeat for job %s failed: %s", self.job_id, exc)
            if time.monotonic() - self._last_ok > self.lease_seconds:
                log.error("job %s: no heartbeat for a whole lease; giving it up", self.job_id)
                self.lost.set()
            return
        if status is None:
            worker_metrics.lease_renewed("lost")
            log.warning("job %s: lease lost (another worker owns it now)", self.job_id)
            self.lost.set()
            return
        worker_metrics.lease_renewed("ok")
        self._last_ok = time.monotonic()
        self.status = status

    def _loop(self) -> None:
        while not self._stop.wait(self.interval) and not self.lost.is_set():
            self.beat()


# ------------------------------------------------------------------------------ callbacks
def _retry(call: Callable[[], T], *, what: str, attempts: int = 3) -> T:
    """A store write, retried briefly through transient database errors."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as exc:
            if attempt == attempts:
                raise
            log.warning("%s failed (%s); retrying", what, exc)
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


def compact_event_data(data: dict[str, Any] | None) -> dict[str, Any] | None:
    """Event data small and JSON-able: the whole spec is on the job row, not in every event."""
    if not data:
        return None
    small = {key: value for key, value in data.items() if key != "spec"}
    text = json.dumps(small, default=str)
    if len(text) > MAX_EVENT_DATA:
        return {"truncated": True, "keys": sorted(small)[:50]}
    return json.loads(text)


class StoreCallbacks:
    """The engine's callback protocol, written into the job store as the run goes."""

    def __init__(
        self,
        store: Any,
        artifacts: ArtifactStore,
        job_id: str,
        worker_id: str,
        lease: LeaseKeeper,
    ) -> None:
        self.store, self.artifacts = store, artifacts
        self.job_id, self.worker_id, self.lease = job_id, worker_id, lease
        self.total_steps: int | None = None

    @property
    def owned(self) -> bool:
        return not self.lease.lost.is_set()

    def on_event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        if data and isinstance(data.get("total_steps"), int):
            self.total_steps = data["total_steps"]
        if kind == "cancelled" and self.lease.status != CANCELLING and _shutdown.is_set():
            kind = "interrupted"
            message = f"the worker is shutting down; {message}; the job will resume"
        if self.owned:
            payload = compact_event_data(data)
            _retry(
                lambda: self.store.add_event(self.job_id, kind, message, payload),
                what=f"event {kind}",
            )
            if kind in EVAL_ACTIVITY_EVENTS:  # what the job does while its spec's eval runs
                activity = None if kind == "eval_finished" else {"kind": "eval", **(payload or {})}
                _retry(
                    lambda: self.store.set_activity(self.job_id, self.worker_id, activity),
                    what="activity",
                )

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if not self.owned:
            return
        # NaN/inf (e.g. grad_norm without clipping) are left out: not every database stores them.
        finite = {
            name: float(value)
            for name, value in metrics.items()
            if isinstance(value, int | float) and math.isfinite(value)
        }
        worker_metrics.observe_step(finite)
        _retry(lambda: self.store.record_metrics(self.job_id, step, finite), what="metrics")
        _retry(
            lambda: self.store.update_progress(
                self.job_id, self.worker_id, step=step, total_steps=self.total_steps
            ),
            what="progress",
        )

    def on_checkpoint(self, step: int, path: Path) -> None:
        if not self.owned:
            return
        uri = self.artifacts.publish_checkpoint(self.job_id, path)
        _retry(lambda: self.store.add_checkpoint(self.job_id, step, uri), what="checkpoint")
        self.on_event("checkpoint", f"checkpoint at step {step}", {"step": step, "uri": uri})

    def on_checkpoint_removed(self, step: int, path: Path) -> None:
        """Retention removes a checkpoint: the store forgets it first, then its copies go."""
        if not self.owned:
            return
        known = {c.step: c.uri for c in self.store.list_checkpoints(self.job_id)}
        _retry(lambda: self.store.remove_checkpoint(self.job_id, step), what="checkpoint removal")
        if step in known:
            try:
                self.artifacts.remove_published(self.job_id, known[step])
            except Exception as exc:  # a stray copy is harmless: the store no longer lists it
                log.warning("job %s: could not delete checkpoint %s: %s", self.job_id, step, exc)
        self.on_event(
            "checkpoint_removed",
            f"removed the checkpoint of step {step} (checkpoint.keep_last)",
            {"step": step},
        )

    def should_stop(self) -> bool:
        return not self.owned or self.lease.status == CANCELLING or _shutdown.is_set()


# --------------------------------------------------------------------------------- runner
def _prepare_run_dir(
    store: Any, artifacts: ArtifactStore, job_id: str, run_dir: Path, known: dict[int, str]
) -> None:
    """Make the latest checkpoint available locally and record local ones the store missed.

    A worker killed between saving a checkpoint and recording it leaves a complete but
    unrecorded directory; a job resumed on another machine has recorded ones but no local copy.
    """
    from opsd_engine import checkpoint as ckpt

    local = ckpt.list_checkpoints(run_dir / "checkpoints")
    if known:
        newest_step = max(known)
        local_steps = {ckpt.read_state(path).step for path in local}
        if not local_steps or max(local_steps) < newest_step:
            try:
                artifacts.fetch_checkpoint(job_id, known[newest_step])
            except Exception as exc:
                log.warning("job %s: cannot fetch checkpoint %s: %s", job_id, newest_step, exc)
                store.add_event(
                    job_id,
                    "warning",
                    f"could not fetch the checkpoint of step {newest_step}: {exc}"[:500],
                    {"step": newest_step},
                )
    for path in ckpt.list_checkpoints(run_dir / "checkpoints"):
        step = ckpt.read_state(path).step
        if step not in known:
            uri = artifacts.publish_checkpoint(job_id, path)
            store.add_checkpoint(job_id, step, uri)
            known[step] = uri


def _release_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - best effort
        pass


def run_job(
    job_id: str,
    *,
    store: Any,
    settings: ServiceSettings,
    worker_id: str,
    artifacts: ArtifactStore | None = None,
) -> str:
    """Claim and run one job to its end; returns the final status, `skipped` or `lease_lost`.

    When this worker is shutting down mid-run: `released` (back in the queue, same attempt; the
    caller sends a new message) or `interrupted` (the release failed; the lease will expire).
    """
    job = store.claim_job(job_id, worker_id, lease_seconds=settings.lease_seconds)
    if job is None:
        current = store.get_job(job_id)
        log.info(
            "job %s not claimable (%s); skipping", job_id, current.status if current else "unknown"
        )
        return SKIPPED
    log.info("job %s claimed by %s (attempt %s)", job_id, worker_id, job.attempt)
    artifacts = artifacts or ArtifactStore(settings.artifacts_uri, scratch_dir=runs_dir(settings))
    lease = LeaseKeeper(
        store,
        job_id,
        worker_id,
        lease_seconds=settings.lease_seconds,
        interval=settings.heartbeat_seconds,
        status=job.status,
    )
    lease.start()
    worker_metrics.job_started(job_id, "job")
    try:
        outcome = _run_claimed(
            job,
            store=store,
            settings=settings,
            artifacts=artifacts,
            worker_id=worker_id,
            lease=lease,
        )
    finally:
        lease.stop()
        worker_metrics.job_finished()
        _release_memory()
    if outcome in TERMINAL_STATUSES:
        artifacts.remove_run_dir(job_id)  # remote roots: the scratch copy is no longer needed
    return outcome


def _run_claimed(
    job: Any,
    *,
    store: Any,
    settings: ServiceSettings,
    artifacts: ArtifactStore,
    worker_id: str,
    lease: LeaseKeeper,
) -> str:
    job_id = job.id
    try:
        from opsd_engine.config import parse_spec

        spec = parse_spec(job.spec, source=f"job {job_id}")
        run_dir = artifacts.run_dir(job_id)
        known = {c.step: c.uri for c in store.list_checkpoints(job_id)}
        _prepare_run_dir(store, artifacts, job_id, run_dir, known)
        callbacks = StoreCallbacks(store, artifacts, job_id, worker_id, lease)
        from opsd_engine.trainers import run_training

        rollouts = served_rollouts(spec, settings, job_id)
        if rollouts is not None:
            where = rollouts.client.base_url
            store.add_event(job_id, "rollouts", f"rollouts sampled by the inference server {where}")
        try:
            result = run_training(
                spec, run_dir, callbacks=callbacks, resume=True, rollout_backend=rollouts
            )
        finally:
            if rollouts is not None:
                rollouts.close()
    except Exception as exc:
        if lease.lost.is_set():
            log.warning("job %s: lease lost, then %s: %s", job_id, type(exc).__name__, exc)
            return LEASE_LOST
        error = classify_error(exc)
        log.log(
            logging.ERROR if error.category == "system" else logging.INFO,
            "job %s failed: %s",
            job_id,
            error.message,
            exc_info=error.category == "system",
        )
        return _terminal(
            store,
            job_id,
            "failed",
            lambda: store.fail_job(job_id, error=error, worker_id=worker_id),
        )

    if lease.lost.is_set():
        log.warning("job %s: lease lost; stopped without a terminal write", job_id)
        return LEASE_LOST
    if result.status == "succeeded":
        try:
            assert result.adapter_dir is not None
            adapter_uri = artifacts.publish_adapter(job_id, result.adapter_dir)
        except Exception as exc:
            error = JobError(
                "artifact_error", _clip(f"publishing the adapter failed: {exc}"), "system"
            )
            return _terminal(
                store,
                job_id,
                "failed",
                lambda: store.fail_job(job_id, error=error, worker_id=worker_id),
            )
        return _terminal(
            store,
            job_id,
            "succeeded",
            lambda: store.finish_job(job_id, worker_id, adapter_uri=adapter_uri),
        )
    # The engine stopped early: a cancellation, or this process is shutting down.
    if lease.status != CANCELLING and _shutdown.is_set():
        log.warning("job %s interrupted by shutdown at step %s", job_id, result.step)
        lease.stop()  # no heartbeat may renew the lease after the release
        try:
            if _retry(lambda: store.release_job(job_id, worker_id), what=f"releasing {job_id}"):
                return RELEASED
        except Exception:
            log.exception("job %s: could not release it; its lease will expire", job_id)
        return INTERRUPTED
    return _terminal(store, job_id, "cancelled", lambda: store.mark_cancelled(job_id, worker_id))


def _terminal(store: Any, job_id: str, status: str, write: Callable[[], bool]) -> str:
    """Write a terminal state; when the store refuses (or fails), report what the row says."""
    try:
        if _retry(write, what=f"marking job {job_id} {status}"):
            return status
    except Exception:
        log.exception("job %s: could not write status %s", job_id, status)
    try:
        current = store.get_job(job_id)
    except Exception:
        return "unknown"
    return current.status if current is not None else "unknown"
