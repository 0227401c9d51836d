"""Typed response models of the SDK: what the service's JSON answers parse into.

The field names and types mirror the service's response schemas (a test checks them against the
live server's OpenAPI document). Unknown fields from a newer server are kept, not rejected.
Objects returned by a client remember it, so `job.wait()` and `job.refresh()` work on them;
`AsyncClient` returns `AsyncJob` / `AsyncEval`, whose methods are awaitable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

__all__ = [
    "TERMINAL_STATUSES",
    "ApiKey",
    "ApiKeyList",
    "AsyncEval",
    "AsyncEvalList",
    "AsyncJob",
    "AsyncJobList",
    "Checkpoint",
    "CheckpointList",
    "Eval",
    "EvalList",
    "EvalResults",
    "EvalStatus",
    "Event",
    "EventList",
    "File",
    "FileDeleted",
    "FileList",
    "Job",
    "JobError",
    "JobList",
    "JobStatus",
    "MetricSeries",
    "Metrics",
    "Progress",
]

JobStatus = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
EvalStatus = Literal["queued", "running", "succeeded", "failed"]
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class JobError(_Model):
    """Why a job failed: `category` is `user` (fix the spec or data) or `system` (retry)."""

    code: str
    message: str
    category: Literal["user", "system"]


class EvalProgress(_Model):
    """How far a running evaluation is: `done` of `total` problems sampled for `role`
    (`adapter` or `base`), at `samples_per_s`; `step` is the training step a job's own eval
    scores (`None` for evals made with `client.evals.create`)."""

    role: str
    done: int
    total: int
    samples_per_s: float = 0.0
    step: int | None = None

    def describe(self) -> str:
        """One line for people: `evaluating the adapter: 40/128 problems, 12.3 samples/s`."""
        at = f" (step {self.step})" if self.step is not None else ""
        return (
            f"evaluating the {self.role}{at}: {self.done}/{self.total} problems, "
            f"{self.samples_per_s:.1f} samples/s"
        )


class Progress(_Model):
    step: int
    total_steps: int | None = None
    eval: EvalProgress | None = None  # set while the job's spec `eval` group runs

    @property
    def fraction(self) -> float | None:
        """Completed share of the optimizer steps, when the total is known."""
        if not self.total_steps:
            return None
        return min(1.0, self.step / self.total_steps)


class _JobFields(_Model):
    id: str
    object: Literal["job"] = "job"
    status: JobStatus
    attempt: int
    progress: Progress
    error: JobError | None = None
    adapter_uri: str | None = None
    spec: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def is_terminal(self) -> bool:
        """True once the job is `succeeded`, `failed` or `cancelled` (it never changes again)."""
        return self.status in TERMINAL_STATUSES


class Job(_JobFields):
    """A training job, as `GET /jobs/{id}` answers it."""

    _client: Any = PrivateAttr(default=None)

    def wait(
        self,
        *,
        timeout: float | None = None,
        poll: float = 2.0,
        on_update: Callable[[Job], None] | None = None,
    ) -> Job:
        """Block until the job finishes; return it when it succeeded.

        Raises `JobFailedError` / `JobCancelledError` with the server's reason otherwise, and
        `WaitTimeoutError` when `timeout` seconds pass first. `on_update` sees every poll.
        """
        return _bound(self).jobs.wait(self.id, timeout=timeout, poll=poll, on_update=on_update)

    def refresh(self) -> Job:
        """The job's current state (a new object)."""
        return _bound(self).jobs.retrieve(self.id)


class AsyncJob(_JobFields):
    """A training job returned by `AsyncClient`; `wait` and `refresh` are coroutines."""

    _client: Any = PrivateAttr(default=None)

    async def wait(
        self,
        *,
        timeout: float | None = None,
        poll: float = 2.0,
        on_update: Callable[[AsyncJob], Any] | None = None,
    ) -> AsyncJob:
        """Await the job's end; see `Job.wait`."""
        return await _bound(self).jobs.wait(
            self.id, timeout=timeout, poll=poll, on_update=on_update
        )

    async def refresh(self) -> AsyncJob:
        return await _bound(self).jobs.retrieve(self.id)


class JobList(_Model):
    """One page of `GET /jobs`; `client.jobs.list()` follows `next_cursor` for you."""

    object: Literal["list"] = "list"
    data: list[Job]
    next_cursor: str | None = None


class AsyncJobList(_Model):
    """One page of `GET /jobs` from `AsyncClient`."""

    object: Literal["list"] = "list"
    data: list[AsyncJob]
    next_cursor: str | None = None


class MetricSeries(_Model):
    """One metric over optimizer steps: `values[i]` was logged at `steps[i]`."""

    steps: list[int]
    values: list[float | None]

    def __len__(self) -> int:
        return len(self.steps)

    def points(self) -> list[tuple[int, float | None]]:
        return list(zip(self.steps, self.values, strict=False))

    @property
    def last(self) -> float | None:
        """The latest value (None when the series is empty)."""
        return self.values[-1] if self.values else None


class Metrics(_Model):
    """`GET /jobs/{id}/metrics`: series by name; `metrics["loss"].values`."""

    job_id: str
    metrics: dict[str, MetricSeries]
    max_points: int | None = None

    def __getitem__(self, name: str) -> MetricSeries:
        return self.metrics[name]

    def __contains__(self, name: object) -> bool:
        return name in self.metrics

    @property
    def names(self) -> list[str]:
        return sorted(self.metrics)

    def rows(self, names: list[str] | None = None) -> Iterator[tuple[int, dict[str, float | None]]]:
        """(step, {name: value}) for every step any of `names` (default: all) was logged at."""
        chosen = names if names is not None else self.names
        by_step: dict[int, dict[str, float | None]] = {}
        for name in chosen:
            series = self.metrics.get(name)
            if series is None:
                continue
            for step, value in series.points():
                by_step.setdefault(step, {})[name] = value
        for step in sorted(by_step):
            yield step, by_step[step]


class Event(_Model):
    """A job event (`queued`, `running`, `checkpoint`, `succeeded`, ...), ordered by `id`."""

    id: int
    kind: str
    message: str
    data: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime | None = None


class EventList(_Model):
    object: Literal["list"] = "list"
    data: list[Event]


class Checkpoint(_Model):
    step: int
    uri: str
    created_at: datetime


class CheckpointList(_Model):
    object: Literal["list"] = "list"
    data: list[Checkpoint]


class EvalResults(_Model):
    """Summaries by model: `adapter` (the trained job) and `base` (when asked for)."""

    adapter: dict[str, Any] | None = None
    base: dict[str, Any] | None = None


class _EvalFields(_Model):
    id: str
    object: Literal["eval"] = "eval"
    job_id: str
    status: EvalStatus
    config: dict[str, Any] = Field(default_factory=dict)
    results: EvalResults | None = None
    error: JobError | str | None = None
    progress: EvalProgress | None = None  # sampling progress (kept once finished)
    created_at: datetime
    finished_at: datetime | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in ("succeeded", "failed")


class Eval(_EvalFields):
    """An evaluation of a job's adapter (avg@n, pass@k on a benchmark)."""

    _client: Any = PrivateAttr(default=None)

    def wait(
        self,
        *,
        timeout: float | None = None,
        poll: float = 2.0,
        on_update: Callable[[Eval], None] | None = None,
    ) -> Eval:
        """Block until the eval finishes (`on_update` sees every poll, with its `progress`);
        raises `EvalFailedError` when it failed."""
        return _bound(self).evals.wait(self.id, timeout=timeout, poll=poll, on_update=on_update)

    def refresh(self) -> Eval:
        return _bound(self).evals.retrieve(self.id)


class AsyncEval(_EvalFields):
    """An evaluation returned by `AsyncClient`; `wait` and `refresh` are coroutines."""

    _client: Any = PrivateAttr(default=None)

    async def wait(
        self,
        *,
        timeout: float | None = None,
        poll: float = 2.0,
        on_update: Callable[[AsyncEval], None] | None = None,
    ) -> AsyncEval:
        return await _bound(self).evals.wait(
            self.id, timeout=timeout, poll=poll, on_update=on_update
        )

    async def refresh(self) -> AsyncEval:
        return await _bound(self).evals.retrieve(self.id)


class EvalList(_Model):
    """`GET /jobs/{id}/evals`."""

    object: Literal["list"] = "list"
    data: list[Eval]


class AsyncEvalList(_Model):
    object: Literal["list"] = "list"
    data: list[AsyncEval]


def _bound(obj: Any) -> Any:
    client = obj._client
    if client is None:
        raise RuntimeError(
            f"this {type(obj).__name__} was not returned by a client; use client.jobs / "
            "client.evals methods with its id instead"
        )
    return client


class File(_Model):
    """An uploaded dataset (`POST /files`): use its `id` as a job's `dataset_uri`."""

    id: str
    object: Literal["file"] = "file"
    filename: str
    format: str
    bytes: int
    rows: int
    fields: list[str] = Field(default_factory=list)
    sha256: str
    created_at: datetime


class FileList(_Model):
    object: Literal["list"] = "list"
    data: list[File]


class FileDeleted(_Model):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class ApiKey(_Model):
    """An API key as admins see it (`GET /keys`): never the secret."""

    id: str
    object: Literal["api_key"] = "api_key"
    tenant: str
    prefix: str
    label: str | None = None
    admin: bool = False
    created_at: datetime
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None


class ApiKeyList(_Model):
    object: Literal["list"] = "list"
    data: list[ApiKey]


# ------------------------------------------------------------------------------- pre-flight
PreflightStatus = Literal["queued", "running", "succeeded", "failed"]
CheckStatus = Literal["pass", "warn", "fail"]


class PreflightCheck(_Model):
    """One named alignment check of a pre-flight: `status` pass|warn|fail, what was found
    (`message`) and the suggested `fix`."""

    name: str
    status: CheckStatus
    message: str
    fix: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class PreflightReport(_Model):
    """What a pre-flight found. `status` is the worst check's; accuracies are fractions (None
    without reference answers); `divergence_profile[n]` is the mean divergence (nats) at rollout
    position n over `profile_counts[n]` rollouts (the first 512 positions);
    `divergence_by_tenth` the means over each tenth of the rollout span."""

    status: CheckStatus | None = None
    checks: list[PreflightCheck] = Field(default_factory=list)
    n_problems: int | None = None
    samples_per_problem: int | None = None
    student_accuracy: float | None = None
    teacher_accuracy: float | None = None
    gap: float | None = None
    gap_interval: list[float] | None = None
    divergence: str | None = None
    divergence_profile: list[float] = Field(default_factory=list)
    profile_counts: list[int] = Field(default_factory=list)
    divergence_by_tenth: list[float] = Field(default_factory=list)
    divergence_mean: float | None = None
    seconds: float | None = None

    def check(self, name: str) -> PreflightCheck:
        """The check called `name` (KeyError if the report has none)."""
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(name)


class PreflightProgress(_Model):
    """Which phase a running pre-flight is in (student, teacher, profile): `done` of `total`."""

    phase: str
    done: int
    total: int


class _PreflightFields(_Model):
    id: str
    object: Literal["preflight"] = "preflight"
    job_id: str
    status: PreflightStatus
    config: dict[str, Any] = Field(default_factory=dict)
    report: PreflightReport | None = None
    progress: PreflightProgress | None = None
    error: JobError | str | None = None
    created_at: datetime
    finished_at: datetime | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in ("succeeded", "failed")


class Preflight(_PreflightFields):
    """A job's pre-flight (`POST /jobs/{id}/preflight`): the privileged gap, the divergence
    profile and the alignment checks. `status` is the run's; the verdict is `report.status`."""

    _client: Any = PrivateAttr(default=None)

    def wait(self, *, timeout: float | None = None, poll: float = 1.0) -> Preflight:
        """Block until the pre-flight finished (succeeded or failed) and return it."""
        return _bound(self).jobs.wait_preflight(self.job_id, timeout=timeout, poll=poll)


class AsyncPreflight(_PreflightFields):
    """A pre-flight returned by `AsyncClient`; `wait` is a coroutine."""

    _client: Any = PrivateAttr(default=None)

    async def wait(self, *, timeout: float | None = None, poll: float = 1.0) -> AsyncPreflight:
        return await _bound(self).jobs.wait_preflight(self.job_id, timeout=timeout, poll=poll)


class PreflightList(_Model):
    """`GET /jobs/{id}/preflights`."""

    object: Literal["list"] = "list"
    data: list[Preflight]


class AsyncPreflightList(_Model):
    object: Literal["list"] = "list"
    data: list[AsyncPreflight]


class UsageTotals(_Model):
    """Usage sums (`GET /usage`): device-seconds and token counts."""

    steps: int
    device_seconds: float
    generated_tokens: int
    teacher_scored_tokens: int
    student_scored_tokens: int
    eval_tokens: int


class JobUsage(UsageTotals):
    job_id: str


class Usage(_Model):
    """`GET /usage`: the tenant's usage in `[start, end)`, in total and per job."""

    object: Literal["usage"] = "usage"
    start: datetime
    end: datetime
    totals: UsageTotals
    jobs: list[JobUsage] = Field(default_factory=list)
