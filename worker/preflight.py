"""Running one pre-flight on this worker: claim, measure, store (no Celery in here).

`run_preflight(preflight_id, ...)` is what the Celery task `opsd.run_preflight` calls and what
the tests call directly. It claims the row under a lease (renewed from a thread), reads the
job's spec, checks the tenant may load its base model and open its dataset (the same access
policy as training, enforced when the engine opens files), and runs
:func:`opsd_engine.preflight.run_preflight` in process with the request's sample sizes. The
outcome goes to three places:

* the row's ``report`` (``GET /jobs/{id}/preflight``): the engine's report document;
* the job's metrics, ``preflight/*`` (:meth:`~opsd_engine.preflight.PreflightReport.metrics`)
  at the job's current step (0 before training);
* the job's events: ``preflight_started``, ``preflight_progress`` per phase, then
  ``preflight_finished`` (status, gap, the checks that did not pass) or ``preflight_failed``.

It ends in exactly one terminal write, unless the lease was lost to another worker. A
pre-flight that finds a failing check still *succeeds* as a run: its report says ``fail``.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

from jobstore.records import JobError
from opsd_service.settings import ServiceSettings
from worker.subtasks import TaskLease, log_failure

log = logging.getLogger("opsd.worker")

SKIPPED = "skipped"
LEASE_LOST = "lease_lost"
PREFLIGHT_LEASE_SECONDS = 300.0
_SETTING_NAMES = (
    "sample_size",
    "samples_per_problem",
    "profile_rollouts",
    "max_new_tokens",
    "min_gap",
)


class _Events:
    """The job's events and the row's progress; store errors are logged, never raised."""

    def __init__(self, store: Any, record: Any, worker_id: str) -> None:
        self.store, self.record, self.worker_id = store, record, worker_id

    def event(self, kind: str, message: str, data: dict[str, Any]) -> None:
        try:
            self.store.add_event(
                self.record.job_id, kind, message, {"preflight_id": self.record.id, **data}
            )
        except Exception as exc:
            log.warning("preflight %s: could not record %s: %s", self.record.id, kind, exc)

    def progress(self, phase: str, done: int, total: int) -> None:
        document = {"phase": phase, "done": done, "total": total}
        try:
            self.store.set_preflight_progress(self.record.id, self.worker_id, document)
        except Exception as exc:
            log.warning("preflight %s: could not record progress: %s", self.record.id, exc)
        if done == total:
            self.event("preflight_progress", f"pre-flight: {phase} {done}/{total}", document)


def run_preflight(
    preflight_id: str,
    *,
    store: Any,
    settings: ServiceSettings,
    worker_id: str,
    lease_seconds: float = PREFLIGHT_LEASE_SECONDS,
) -> str:
    """Claim and run one pre-flight; returns ``succeeded``, ``failed``, ``skipped`` or
    ``lease_lost``."""
    record = store.claim_preflight(preflight_id, worker_id, lease_seconds=lease_seconds)
    if record is None:
        log.info("preflight %s not claimable; skipping", preflight_id)
        return SKIPPED
    events = _Events(store, record, worker_id)
    events.event("preflight_started", f"pre-flight {preflight_id} started", dict(record.config))
    renew = partial(
        store.renew_preflight_lease, preflight_id, worker_id, lease_seconds=lease_seconds
    )
    with TaskLease("preflight", preflight_id, renew, lease_seconds) as lease:
        try:
            report, step = compute_preflight(
                record, store=store, settings=settings, progress=events.progress
            )
        except Exception as exc:
            if lease.lost.is_set():
                return LEASE_LOST
            error = classify_preflight_error(exc)
            log_failure("preflight", preflight_id, error)
            store.fail_preflight(preflight_id, error=error, worker_id=worker_id)
            events.event(
                "preflight_failed",
                f"pre-flight {preflight_id} failed: {error.code}",
                {"code": error.code},
            )
            return "failed"
    if lease.lost.is_set():
        return LEASE_LOST
    document = report.to_dict()
    if not store.finish_preflight(preflight_id, report=document, worker_id=worker_id):
        return LEASE_LOST
    try:
        store.record_metrics(record.job_id, step, report.metrics())
    except Exception as exc:
        log.warning("preflight %s: could not record metrics: %s", preflight_id, exc)
    flagged = {c.name: c.status for c in report.checks if c.status != "pass"}
    gap = f", privileged gap {report.gap:+.1%}" if report.gap is not None else ""
    events.event(
        "preflight_finished",
        f"pre-flight {preflight_id}: {report.status}{gap}"
        + (f" ({', '.join(f'{k}: {v}' for k, v in flagged.items())})" if flagged else ""),
        {
            "status": report.status,
            "gap": report.gap,
            "student_accuracy": report.student_accuracy,
            "teacher_accuracy": report.teacher_accuracy,
            "checks": {c.name: c.status for c in report.checks},
        },
    )
    return "succeeded"


def compute_preflight(
    record: Any, *, store: Any, settings: ServiceSettings, progress: Any = None
) -> tuple[Any, int]:
    """The engine's report for ``record`` and the job step its metrics are recorded at."""
    from opsd_engine.access import enforcing
    from opsd_engine.config import parse_spec
    from opsd_engine.preflight import run_preflight, settings_from_spec
    from worker.access import check_base_model, tenant_guard
    from worker.evals import EvalSetupError

    job = store.get_job(record.job_id)
    if job is None:
        raise EvalSetupError("job_not_found", f"job {record.job_id} no longer exists")
    spec = parse_spec(job.spec, source=f"job {job.id}")
    config = {k: v for k, v in record.config.items() if k in _SETTING_NAMES}
    preflight_settings = settings_from_spec(spec, **config)  # unset fields: the spec's group
    guard = tenant_guard(store, settings, record.tenant_id)
    check_base_model(guard, spec.base_model)
    with enforcing(guard):  # the dataset is opened under the tenant's policy
        report = run_preflight(spec, preflight_settings, on_progress=progress)
    return report, int(job.progress_step or 0)


def classify_preflight_error(exc: BaseException) -> JobError:
    from worker.evals import classify_eval_error

    if isinstance(exc, ValueError) and type(exc) is ValueError:  # bad settings or empty data
        from worker.runner import _clip

        return JobError("invalid_request", _clip(str(exc)), "user")
    return classify_eval_error(exc)
