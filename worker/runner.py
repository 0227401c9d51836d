"""Running one job on this worker: claim, lease, train, report, finish (no Celery in here).

`run_job` is what the Celery task calls and what the tests call directly. It claims the job row
with a lease (a job that is not `queued` any more is a duplicate delivery and is skipped), keeps
the lease alive from a heartbeat thread, runs the engine with `resume=True` (a requeued job
continues from its last checkpoint) and writes every report into the store through
`StoreCallbacks`. It ends in exactly one terminal write: `finish_job` with the published adapter,
`mark_cancelled` (the engine saved a partial checkpoint), or `fail_job` with a readable
`JobError` -- unless the lease was lost, in which case another worker owns the job now and this
one writes nothing. No exception escapes from a claimed job.

Jobs of several GPUs (`resources.gpus` > 1) run as a child process group (`worker.launcher`)
that this thread watches while the heartbeat keeps the lease: the same callbacks receive rank 0's
reports; a rank's user error fails the job, a lost rank requeues it as one unit (`requeued`,
attempt + 1, resumed from its last checkpoint). `run_next_job` claims the next job of a resource
class in tenant round-robin order (what a message of a class's queue is a turn for).

Untrusted tenants: the engine runs under the tenant's dataset guard (`worker.access`), so every
dataset it opens is checked against the deployment's policy at open time, and the base model is
checked before it is loaded. A job stops at its wall-time limit (`OPSD_MAX_JOB_SECONDS`) and
fails with `time_limit_exceeded`. System errors carry a code and an error id; the details go to
the worker's log only.

Store blips: the engine never waits for the store. Metrics, progress, events and checkpoint
records go to an :class:`Outbox` that a writer thread flushes in order, retrying with backoff
while the database is away, so an outage shorter than the lease costs nothing. When no
heartbeat succeeded for a whole lease because the store was unreachable, the engine stops at its
next step (keeping a checkpoint); once the store answers again the job is handed back to the
queue as the same attempt (`release_job`), not failed or requeued with an attempt spent.
"""

from __future__ import annotations

import collections
import gc
import json
import logging
import math
import secrets
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

from jobstore.records import CANCELLING, TERMINAL_STATUSES, JobError
from opsd_service.settings import ServiceSettings, runs_dir
from worker import prometheus as worker_metrics
from worker.access import check_base_model, tenant_guard
from worker.artifacts import ArtifactStore
from worker.inference_client import InferenceError
from worker.served_rollouts import served_rollouts

log = logging.getLogger("opsd.worker")

SKIPPED = "skipped"  # the job was not claimable (duplicate delivery, cancelled, finished)
LEASE_LOST = "lease_lost"  # another worker owns the job now; nothing terminal was written
INTERRUPTED = "interrupted"  # shutting down and the release failed; the lease expiry requeues it
RELEASED = "released"  # shutting down, or the store was away: back in the queue, same attempt
REQUEUED = "requeued"  # a rank of its process group died: back in the queue, attempt + 1
TIME_LIMIT = "time_limit_exceeded"

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
    """A lease owner id unique to this process: `w-<random>`.

    Opaque on purpose: it shows up in job events that tenants read, which must not name the
    worker's host; the worker logs which host and process it is when it starts.
    """
    return f"w-{uuid.uuid4().hex[:12]}"


def is_store_outage(exc: BaseException) -> bool:
    """True for errors that mean "the database is unreachable right now" (worth waiting out)."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(
        exc,
        sa.exc.OperationalError
        | sa.exc.InterfaceError
        | sa.exc.DisconnectionError
        | sa.exc.TimeoutError
        | ConnectionError,
    )


def wait_for_store(call: Callable[[], T], *, what: str, seconds: float) -> T:
    """``call()``, retried with exponential backoff (0.2 s to 5 s) while the store is away, for
    up to ``seconds``; other errors, and the last outage error, are raised."""
    retrying = Retrying(
        retry=retry_if_exception(is_store_outage),
        wait=wait_exponential(multiplier=0.2, max=5.0),
        stop=stop_after_delay(seconds),
        reraise=True,
        before_sleep=lambda state: log.warning(
            "%s: the store is unavailable (%s); retrying", what, state.outcome.exception()
        ),
    )
    return retrying(call)


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


def system_error(code: str, exc: BaseException, what: str = "an internal error") -> JobError:
    """A system error for a tenant's eyes: a code and an error id; the details go to the log."""
    error_id = "err_" + secrets.token_hex(8)
    log.error("%s [%s]: %s: %s", code, error_id, type(exc).__name__, exc, exc_info=exc)
    return JobError(
        code,
        f"{what} stopped the job (error id {error_id}; details in the service's logs)",
        "system",
    )


def classify_error(exc: BaseException) -> JobError:
    """The readable error a failed job carries: a code, a message, user or system at fault.

    User errors say what to fix; system errors say only a code and an error id (the exception,
    with whatever it names of hosts, SQL or paths, goes to the worker's log).
    """
    from opsd_engine.access import AccessDenied
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
    if isinstance(exc, AccessDenied):
        return JobError("access_denied", _clip(str(exc)), "user")
    if isinstance(exc, ModelLoadError):
        return JobError("model_load_error", _clip(str(exc)), "user")
    from opsd_engine.preflight import PreflightFailed

    if isinstance(exc, PreflightFailed):
        return JobError("preflight_failed", _clip(str(exc)), "user")
    if isinstance(exc, InferenceError):
        return system_error("inference_server_error", exc, "an inference server error")
    if _is_oom(exc):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "out of memory"
        return JobError("out_of_memory", _clip(f"{first[:1000]}. {OOM_ADVICE}"), "user")
    if is_store_outage(exc):
        return system_error("store_unavailable", exc, "the job store being unavailable")
    return system_error("internal_error", exc)


# ---------------------------------------------------------------------------------- lease
class LeaseKeeper:
    """Renews the job's lease every `interval` seconds from a daemon thread.

    `status` caches the job's status as the last heartbeat saw it; `lost` is set when the store
    says another worker owns the job; `store_lost` when no heartbeat succeeded for a whole lease
    because the store was unreachable (the job stops, and is released once the store is back).
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
        self.store_lost = threading.Event()
        self.healthy = threading.Event()  # the last heartbeat succeeded
        self.healthy.set()
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
            self.healthy.clear()
            worker_metrics.lease_renewed("error")
            log.warning("heartbeat for job %s failed: %s", self.job_id, exc)
            if (
                time.monotonic() - self._last_ok > self.lease_seconds
                and not self.store_lost.is_set()
            ):
                log.error("job %s: no heartbeat for a whole lease; stopping it", self.job_id)
                self.store_lost.set()
            return
        if status is None:
            worker_metrics.lease_renewed("lost")
            log.warning("job %s: lease lost (another worker owns it now)", self.job_id)
            self.lost.set()
            return
        worker_metrics.lease_renewed("ok")
        self._last_ok = time.monotonic()
        self.healthy.set()
        self.status = status

    def _loop(self) -> None:
        while not self._stop.wait(self.interval) and not self.lost.is_set():
            self.beat()


# ------------------------------------------------------------------------------ callbacks
def compact_event_data(data: dict[str, Any] | None) -> dict[str, Any] | None:
    """Event data small and JSON-able: the whole spec is on the job row, not in every event.

    NaN and infinities become null (JSON columns refuse them).
    """
    if not data:
        return None
    small = {key: value for key, value in data.items() if key != "spec"}
    text = json.dumps(small, default=str)
    if len(text) > MAX_EVENT_DATA:
        return {"truncated": True, "keys": sorted(small)[:50]}
    return json.loads(text, parse_constant=lambda _: None)


class Outbox:
    """The job's store writes, in order, flushed by a writer thread; the engine never waits.

    While the store is unreachable the writes wait here (retried with backoff from 0.2 s to
    5 s); they are written only while this worker still owns the job. :meth:`drain` waits until
    everything is written (before a terminal write).
    """

    def __init__(self, store: Any, job_id: str, worker_id: str, lease: LeaseKeeper) -> None:
        self.store, self.job_id, self.worker_id, self.lease = store, job_id, worker_id, lease
        self._items: collections.deque[tuple[str, tuple[Any, ...]]] = collections.deque()
        self._progress: tuple[int, int | None] | None = None
        self._cond = threading.Condition()
        self._stop = False
        self._busy = False
        self.error: BaseException | None = None  # a write that failed for another reason
        self._thread = threading.Thread(target=self._loop, name=f"outbox-{job_id[:8]}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, kind: str, *args: Any) -> None:
        with self._cond:
            self._items.append((kind, args))
            self._cond.notify()

    def progress(self, step: int, total_steps: int | None) -> None:
        with self._cond:
            self._progress = (step, total_steps)
            self._cond.notify()

    def _pending(self) -> bool:
        return bool(self._items) or self._progress is not None

    def _loop(self) -> None:
        delay = 0.2
        while True:
            with self._cond:
                while not self._stop and not self._pending():
                    self._cond.wait()
                if self._stop and not self._pending():
                    return
                self._busy = True
            try:
                self._flush()
                delay = 0.2
            except Exception as exc:
                if not is_store_outage(exc):
                    log.exception("job %s: a store write failed", self.job_id)
                    self.error = exc
                    with self._cond:
                        self._items.clear()
                        self._progress = None
                else:
                    log.warning("job %s: store unavailable (%s); writes wait", self.job_id, exc)
                    with self._cond:
                        self._cond.wait(delay)
                    delay = min(delay * 2, 5.0)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _flush(self) -> None:
        while True:
            if self.lease.lost.is_set():  # another worker owns the job: its writes win
                with self._cond:
                    self._items.clear()
                    self._progress = None
                return
            with self._cond:
                if not self._items:
                    break
                kind, args = self._items[0]
                batch = [args]
                if kind == "metrics":  # consecutive steps in one transaction
                    for next_kind, next_args in list(self._items)[1:]:
                        if next_kind != "metrics":
                            break
                        batch.append(next_args)
            self._write(kind, batch)
            with self._cond:
                for _ in batch:
                    self._items.popleft()
        with self._cond:
            progress, self._progress = self._progress, None
        if progress is not None:
            try:
                self.store.update_progress(
                    self.job_id, self.worker_id, step=progress[0], total_steps=progress[1]
                )
            except Exception:
                with self._cond:
                    self._progress = self._progress or progress
                raise

    def _write(self, kind: str, batch: list[tuple[Any, ...]]) -> None:
        if kind == "metrics":
            self.store.record_metrics_bulk(self.job_id, [(step, m) for step, m in batch])
        elif kind == "event":
            self.store.add_event(self.job_id, *batch[0])
        elif kind == "checkpoint":
            self.store.add_checkpoint(self.job_id, *batch[0])
        elif kind == "activity":
            self.store.set_activity(self.job_id, self.worker_id, *batch[0])
        elif kind == "checkpoint_removed":
            step, remove_copies = batch[0]
            known = {c.step: c.uri for c in self.store.list_checkpoints(self.job_id)}
            self.store.remove_checkpoint(self.job_id, step)
            remove_copies(known.get(step))
        else:  # pragma: no cover - only the kinds above are put
            raise ValueError(kind)

    def drain(self, timeout: float) -> bool:
        """Wait until every write is in the store (True), or ``timeout`` seconds (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.notify_all()
            while self._pending() or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=10)


class StoreCallbacks:
    """The engine's callback protocol, written into the job store as the run goes.

    Writes go through the :class:`Outbox` (never blocking the engine); `should_stop` answers
    true on a cancellation, a lost lease, a store away for a whole lease, a worker shutdown, and
    once the job's wall-time ``deadline`` (a `time.monotonic()` value) has passed.
    """

    def __init__(
        self,
        store: Any,
        artifacts: ArtifactStore,
        job_id: str,
        worker_id: str,
        lease: LeaseKeeper,
        outbox: Outbox | None = None,
        deadline: float | None = None,
    ) -> None:
        self.store, self.artifacts = store, artifacts
        self.job_id, self.worker_id, self.lease = job_id, worker_id, lease
        if outbox is None:  # used on its own: it writes through an outbox of its own
            outbox = Outbox(store, job_id, worker_id, lease)
            outbox.start()
        self.outbox = outbox
        self.deadline = deadline
        self.total_steps: int | None = None

    @property
    def owned(self) -> bool:
        return not self.lease.lost.is_set()

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until every report so far is in the store (False after ``timeout`` seconds)."""
        return self.outbox.drain(timeout)

    @property
    def timed_out(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def on_event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        if data and isinstance(data.get("total_steps"), int):
            self.total_steps = data["total_steps"]
        if kind == "cancelled" and self.timed_out and self.lease.status != CANCELLING:
            kind, message = "stopped", f"wall-time limit reached; {message}"
        elif kind == "cancelled" and self.lease.store_lost.is_set():
            kind = "interrupted"
            message = f"the job store was unreachable; {message}; the job will resume"
        elif kind == "cancelled" and self.lease.status != CANCELLING and _shutdown.is_set():
            kind = "interrupted"
            message = f"the worker is shutting down; {message}; the job will resume"
        if self.owned:
            payload = compact_event_data(data)
            self.outbox.put("event", kind, message, payload)
            if kind in EVAL_ACTIVITY_EVENTS:  # what the job does while its spec's eval runs
                activity = None if kind == "eval_finished" else {"kind": "eval", **(payload or {})}
                self.outbox.put("activity", activity)

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
        self.outbox.put("metrics", step, finite)
        self.outbox.progress(step, self.total_steps)

    def on_checkpoint(self, step: int, path: Path) -> None:
        if not self.owned:
            return
        uri = self.artifacts.publish_checkpoint(self.job_id, path)
        self.outbox.put("checkpoint", step, uri)
        self.on_event("checkpoint", f"checkpoint at step {step}", {"step": step, "uri": uri})

    def on_checkpoint_removed(self, step: int, path: Path) -> None:
        """Retention removes a checkpoint: the store forgets it first, then its copies go (both
        in the outbox's order, after the writes before it)."""
        if not self.owned:
            return

        def remove_copies(uri: str | None) -> None:
            if uri is None:
                return
            try:
                self.artifacts.remove_published(self.job_id, uri)
            except Exception as exc:  # a stray copy is harmless: the store no longer lists it
                log.warning("job %s: could not delete checkpoint %s: %s", self.job_id, step, exc)

        self.outbox.put("checkpoint_removed", step, remove_copies)
        self.on_event(
            "checkpoint_removed",
            f"removed the checkpoint of step {step} (checkpoint.keep_last)",
            {"step": step},
        )

    def should_stop(self) -> bool:
        return (
            not self.owned
            or self.lease.store_lost.is_set()
            or self.lease.status == CANCELLING
            or _shutdown.is_set()
            or self.timed_out
        )


# --------------------------------------------------------------------------------- runner
def clean_interrupted_writes(checkpoints_dir: Path) -> list[str]:
    """Undo what a worker killed mid-write left in a run's checkpoint folder; the names fixed.

    `.tmp-*` (a checkpoint being written) and `.fetch-*` (one being downloaded) folders are
    removed. An `.old-step-N-*` folder (a checkpoint being replaced) whose `step-N` is missing
    is the last complete copy of that step: it is put back; otherwise it is removed.
    """
    fixed: list[str] = []
    if not checkpoints_dir.is_dir():
        return fixed
    for child in sorted(checkpoints_dir.iterdir()):
        if not child.is_dir():
            continue
        if child.name.startswith((".tmp-", ".fetch-")):
            shutil.rmtree(child, ignore_errors=True)
            fixed.append(child.name)
        elif child.name.startswith(".old-"):
            final = checkpoints_dir / child.name[len(".old-") :].rsplit("-", 1)[0]
            if final.exists():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.rename(final)
            fixed.append(child.name)
    return fixed


def _prepare_run_dir(
    store: Any, artifacts: ArtifactStore, job_id: str, run_dir: Path, known: dict[int, str]
) -> None:
    """Make the latest checkpoint available locally and record local ones the store missed.

    A worker killed between saving a checkpoint and recording it leaves a complete but
    unrecorded directory; a job resumed on another machine has recorded ones but no local copy.
    A worker killed while writing one leaves a `.tmp-*` folder: removed first.
    """
    from opsd_engine import checkpoint as ckpt

    if fixed := clean_interrupted_writes(run_dir / "checkpoints"):
        log.info("job %s: cleaned interrupted checkpoint writes %s", job_id, fixed)
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
                    f"could not fetch the checkpoint of step {newest_step}; starting earlier",
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


def _deadline(job: Any, settings: ServiceSettings) -> float:
    """The `time.monotonic()` at which the job's wall time (since it first started) is up."""
    started = job.started_at or datetime.now(UTC)
    spent = max(0.0, (datetime.now(UTC) - started).total_seconds())
    return time.monotonic() + settings.max_job_seconds - spent


def run_job(
    job_id: str,
    *,
    store: Any,
    settings: ServiceSettings,
    worker_id: str,
    artifacts: ArtifactStore | None = None,
) -> str:
    """Claim and run one job to its end; returns the final status, `skipped` or `lease_lost`.

    When this worker is shutting down mid-run, or the store was unreachable for a whole lease:
    `released` (back in the queue, same attempt; the caller sends a new message) or
    `interrupted` (the release failed; the lease will expire).
    """
    job = store.claim_job(job_id, worker_id, lease_seconds=settings.lease_seconds)
    if job is None:
        current = store.get_job(job_id)
        log.info(
            "job %s not claimable (%s); skipping", job_id, current.status if current else "unknown"
        )
        return SKIPPED
    return _run_with_lease(
        job, store=store, settings=settings, worker_id=worker_id, artifacts=artifacts
    )


def run_next_job(
    gpus: int,
    *,
    store: Any,
    settings: ServiceSettings,
    worker_id: str,
    artifacts: ArtifactStore | None = None,
) -> tuple[str | None, str]:
    """Claim the next queued job of resource class ``gpus`` in fair order (tenant round-robin,
    ``tenant_max_running_jobs``) and run it like :func:`run_job`.

    Returns ``(job id, outcome)``; ``(None, "skipped")`` when no job of the class is claimable.
    """
    job = store.claim_next_job(
        worker_id,
        gpus=gpus,
        lease_seconds=settings.lease_seconds,
        max_running_per_tenant=settings.tenant_max_running_jobs,
    )
    if job is None:
        return None, SKIPPED
    outcome = _run_with_lease(
        job, store=store, settings=settings, worker_id=worker_id, artifacts=artifacts
    )
    return job.id, outcome


def _run_with_lease(
    job: Any,
    *,
    store: Any,
    settings: ServiceSettings,
    worker_id: str,
    artifacts: ArtifactStore | None,
) -> str:
    """Run a job this worker has just claimed: lease heartbeat and outbox around the run."""
    job_id = job.id
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
    outbox = Outbox(store, job_id, worker_id, lease)
    lease.start()
    outbox.start()
    worker_metrics.job_started(job_id, "job")
    try:
        outcome = _run_claimed(
            job,
            store=store,
            settings=settings,
            artifacts=artifacts,
            worker_id=worker_id,
            lease=lease,
            outbox=outbox,
        )
    finally:
        outbox.stop()
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
    outbox: Outbox,
) -> str:
    from opsd_engine.access import enforcing

    job_id = job.id
    wait = settings.store_outage_wait_seconds
    deadline = _deadline(job, settings)
    callbacks = StoreCallbacks(store, artifacts, job_id, worker_id, lease, outbox, deadline)
    guard = None

    def fail(error: JobError) -> str:
        outbox.drain(wait)
        write = lambda: store.fail_job(job_id, error=error, worker_id=worker_id)  # noqa: E731
        return _terminal(store, job_id, "failed", write, wait)

    try:
        from opsd_engine.config import parse_spec

        spec = parse_spec(job.spec, source=f"job {job_id}")
        guard = tenant_guard(store, settings, job.tenant_id)
        check_base_model(guard, spec.base_model)
        run_dir = artifacts.run_dir(job_id)
        known = {c.step: c.uri for c in store.list_checkpoints(job_id)}
        _prepare_run_dir(store, artifacts, job_id, run_dir, known)
        from opsd_engine.trainers import run_training

        if spec.resources.gpus > 1:  # a process group; this thread watches it
            from worker.launcher import run_group

            result = run_group(
                spec,
                run_dir,
                callbacks=callbacks,
                settings=settings,
                tenant=guard.tenant,
                files=_uploaded_files(spec, guard),
                lease=lease,
            )
        else:
            rollouts = served_rollouts(spec, settings, job_id)
            if rollouts is not None:
                callbacks.on_event("rollouts", "rollouts sampled by the inference server")
            try:
                with enforcing(guard):
                    result = run_training(
                        spec, run_dir, callbacks=callbacks, resume=True, rollout_backend=rollouts
                    )
            finally:
                if rollouts is not None:
                    rollouts.close()
    except Exception as exc:
        from worker.launcher import GroupFailed, RankLost

        if lease.lost.is_set():
            log.warning("job %s: lease lost, then %s: %s", job_id, type(exc).__name__, exc)
            return LEASE_LOST
        if isinstance(exc, GroupFailed):
            log.info("job %s failed in its process group: %s", job_id, exc.error.message)
            return fail(exc.error)
        if isinstance(exc, RankLost) and not lease.store_lost.is_set():
            return _requeue_lost_group(store, job_id, worker_id, lease, outbox, wait, exc)
        if is_store_outage(exc) or lease.store_lost.is_set():
            log.warning("job %s: the store is unavailable (%s)", job_id, exc)
            return _release_after_outage(store, job_id, worker_id, lease, outbox, wait)
        error = classify_error(exc)
        if guard is not None and error.category == "user":
            error = JobError(error.code, guard.public_text(error.message), error.category)
            log.info("job %s failed: %s", job_id, error.message)
        return fail(error)

    if lease.lost.is_set():
        log.warning("job %s: lease lost; stopped without a terminal write", job_id)
        return LEASE_LOST
    if result.status != "succeeded" and lease.store_lost.is_set():
        return _release_after_outage(store, job_id, worker_id, lease, outbox, wait)
    if outbox.error is not None:
        return fail(system_error("internal_error", outbox.error))
    if result.status == "succeeded":
        try:
            assert result.adapter_dir is not None
            adapter_uri = artifacts.publish_adapter(job_id, result.adapter_dir)
        except Exception as exc:
            return fail(system_error("artifact_error", exc, "publishing the adapter"))
        if not outbox.drain(wait):
            return INTERRUPTED
        finish = lambda: store.finish_job(job_id, worker_id, adapter_uri=adapter_uri)  # noqa: E731
        return _terminal(store, job_id, "succeeded", finish, wait)
    # The engine stopped early: a cancellation, the wall-time limit, or a shutdown.
    if lease.status != CANCELLING and callbacks.timed_out:
        limit = settings.max_job_seconds
        log.info("job %s reached its wall-time limit (%g s)", job_id, limit)
        message = (
            f"the job ran longer than the wall-time limit of {limit:g} s and stopped at step "
            f"{result.step} (its checkpoint is kept); ask for fewer steps"
        )
        return fail(JobError(TIME_LIMIT, message, "user"))
    if lease.status != CANCELLING and _shutdown.is_set():
        log.warning("job %s interrupted by shutdown at step %s", job_id, result.step)
        outbox.drain(wait)
        lease.stop()  # no heartbeat may renew the lease after the release
        release = lambda: store.release_job(job_id, worker_id)  # noqa: E731
        try:
            if wait_for_store(release, what=f"releasing {job_id}", seconds=10):
                return RELEASED
        except Exception:
            log.exception("job %s: could not release it; its lease will expire", job_id)
        return INTERRUPTED
    outbox.drain(wait)
    cancel = lambda: store.mark_cancelled(job_id, worker_id)  # noqa: E731
    return _terminal(store, job_id, "cancelled", cancel, wait)


def _uploaded_files(spec: Any, guard: Any) -> dict[str, str]:
    """Where the job's uploaded files (``file-...`` ids it names) are, for its ranks' guard."""
    from opsd_engine.access import FILE_ID

    found = {}
    for uri in (spec.dataset_uri, spec.eval.dataset_uri):
        if uri and FILE_ID.fullmatch(uri) and (location := guard.files(uri)) is not None:
            found[uri] = location
    return found


def _requeue_lost_group(
    store: Any,
    job_id: str,
    worker_id: str,
    lease: LeaseKeeper,
    outbox: Outbox,
    wait: float,
    exc: BaseException,
) -> str:
    """A rank of the job's group died (killed, lost its device, a collective timed out): the
    group is gone as a whole; the job goes back to the queue with attempt + 1 (it resumes from
    its last checkpoint) or fails on its last attempt."""
    log.warning("job %s: %s", job_id, exc)
    error = JobError("rank_lost", f"a process of the job's group was lost ({exc})", "system")
    outbox.drain(wait)
    lease.stop()  # no heartbeat may renew the lease after the requeue
    try:
        status = wait_for_store(
            lambda: store.requeue_job(job_id, worker_id, error=error),
            what=f"requeueing {job_id}",
            seconds=wait,
        )
    except Exception:
        log.exception("job %s: could not requeue it; its lease will expire", job_id)
        return INTERRUPTED
    if status is None:
        return LEASE_LOST
    return REQUEUED if status == "queued" else status


def _release_after_outage(
    store: Any, job_id: str, worker_id: str, lease: LeaseKeeper, outbox: Outbox, wait: float
) -> str:
    """The store was away for a whole lease: once it answers, hand the job back (same attempt).

    The engine stopped with a checkpoint; the buffered writes go in first, then `release_job`
    puts the job back to `queued` without spending an attempt (the reaper gives live workers a
    lease of grace after an outage, so it does not requeue the job with attempt + 1 first).
    """
    try:
        wait_for_store(lambda: store.get_job(job_id), what=f"job {job_id}", seconds=wait)
    except Exception:
        log.exception("job %s: the store did not come back; its lease will expire", job_id)
        return INTERRUPTED
    outbox.drain(wait)
    lease.stop()  # no heartbeat may renew the lease after the release
    release = lambda: store.release_job(job_id, worker_id)  # noqa: E731
    try:
        if wait_for_store(release, what=f"releasing {job_id}", seconds=wait):
            log.warning("job %s: released after a store outage (same attempt)", job_id)
            return RELEASED
    except Exception:
        log.exception("job %s: could not release it; its lease will expire", job_id)
        return INTERRUPTED
    return LEASE_LOST  # another worker owns it now


def _terminal(
    store: Any, job_id: str, status: str, write: Callable[[], bool], wait: float = 10.0
) -> str:
    """Write a terminal state (waiting out a store outage up to ``wait`` seconds); when the
    store refuses (or stays away), report what the row says."""
    try:
        if wait_for_store(write, what=f"marking job {job_id} {status}", seconds=wait):
            return status
    except Exception:
        log.exception("job %s: could not write status %s", job_id, status)
    try:
        current = store.get_job(job_id)
    except Exception:
        return "unknown"
    return current.status if current is not None else "unknown"
