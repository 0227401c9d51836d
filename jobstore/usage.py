"""Usage accounting: what each job consumed, when, for `GET /usage` (revision ``0007_usage``).

A :class:`jobstore.Store` mixin (like :mod:`jobstore.evals`). The ledger table ``job_usage`` has
one row per job, step and source (``train``: an optimizer step; ``eval``: the job's own held-out
evaluation at that step), written in the same transaction as the step's metrics
(:func:`usage_rows`), from these metrics:

==========================  ===========================================================
ledger column               metric (per step)
==========================  ===========================================================
``device_seconds``          ``time_device_s`` (train: step time x processes) or
                            ``time_eval_device_s`` (eval)
``generated_tokens``        ``generated_tokens`` (rollout tokens sampled)
``teacher_scored_tokens``   ``teacher_scored_tokens`` (prompt + rollout through the teacher;
                            GRPO: the reference pass when ``kl_beta > 0``; SFT: 0)
``student_scored_tokens``   ``student_scored_tokens`` (prompt + rollout through the student;
                            GRPO: old log-probs + policy pass; SFT: prompt + reference)
``eval_tokens``             ``eval_tokens`` (tokens of the evaluation's samples)
==========================  ===========================================================

So a job's usage is exactly the sum of its recorded per-step metrics; like the metrics, a step
recorded twice (a resumed job redoing steps) keeps its first record. ``recorded_at`` is when the
row was written; a time range selects rows by it. Rows go with their job (ON DELETE CASCADE).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from jobstore.tables import UTCDateTime, jobs, metadata

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Session

USAGE_FIELDS = (
    "device_seconds",
    "generated_tokens",
    "teacher_scored_tokens",
    "student_scored_tokens",
    "eval_tokens",
)

job_usage = sa.Table(
    "job_usage",
    metadata,
    sa.Column(
        "job_id", sa.String(40), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column("step", sa.Integer(), primary_key=True),
    sa.Column("source", sa.String(8), primary_key=True),
    sa.Column("recorded_at", UTCDateTime(), nullable=False),
    sa.Column("device_seconds", sa.Double(), nullable=False),
    sa.Column("generated_tokens", sa.BigInteger(), nullable=False),
    sa.Column("teacher_scored_tokens", sa.BigInteger(), nullable=False),
    sa.Column("student_scored_tokens", sa.BigInteger(), nullable=False),
    sa.Column("eval_tokens", sa.BigInteger(), nullable=False),
    sa.Index(None, "recorded_at"),
)

_TRAIN_METRICS = (
    "time_device_s",
    "generated_tokens",
    "teacher_scored_tokens",
    "student_scored_tokens",
)


@dataclass(frozen=True)
class JobUsage:
    """One job's usage over a time range (sums of its ledger rows)."""

    job_id: str
    steps: int  # optimizer steps recorded in the range
    device_seconds: float
    generated_tokens: int
    teacher_scored_tokens: int
    student_scored_tokens: int
    eval_tokens: int


def _count(metrics: dict[str, float], name: str) -> int:
    value = metrics.get(name, 0.0)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0
    return round(number) if number == number and abs(number) != float("inf") else 0


def _seconds(metrics: dict[str, float], name: str) -> float:
    number = float(metrics.get(name, 0.0))
    return number if number == number and abs(number) != float("inf") else 0.0


def usage_rows(
    job_id: str, steps: Iterable[tuple[int, dict[str, float]]], recorded_at: datetime
) -> list[dict[str, Any]]:
    """Ledger rows for metrics about to be recorded (see the module table); a metrics dict
    that carries no usage gives none."""
    rows = []
    for step, metrics in steps:
        base = {"job_id": job_id, "step": int(step), "recorded_at": recorded_at}
        if "eval_tokens" in metrics:
            rows.append(
                {
                    **base,
                    "source": "eval",
                    "device_seconds": _seconds(metrics, "time_eval_device_s"),
                    "generated_tokens": 0,
                    "teacher_scored_tokens": 0,
                    "student_scored_tokens": 0,
                    "eval_tokens": _count(metrics, "eval_tokens"),
                }
            )
        elif any(name in metrics for name in _TRAIN_METRICS):
            rows.append(
                {
                    **base,
                    "source": "train",
                    "device_seconds": _seconds(metrics, "time_device_s"),
                    "generated_tokens": _count(metrics, "generated_tokens"),
                    "teacher_scored_tokens": _count(metrics, "teacher_scored_tokens"),
                    "student_scored_tokens": _count(metrics, "student_scored_tokens"),
                    "eval_tokens": 0,
                }
            )
    return rows


class UsageQueries:
    """The usage ledger of :class:`jobstore.Store` (mixed in)."""

    if TYPE_CHECKING:

        def _read(self) -> AbstractContextManager[Connection]: ...

        def _write(self) -> AbstractContextManager[Session]: ...

    def usage(self, tenant_id: str, *, start: datetime, end: datetime) -> list[JobUsage]:
        """Per job of ``tenant_id``, the usage recorded in ``[start, end)`` (aware datetimes),
        ordered by job id; jobs with nothing recorded in the range are left out."""
        u = job_usage.c
        query = (
            sa.select(
                u.job_id,
                sa.func.sum(sa.case((u.source == "train", 1), else_=0)).label("steps"),
                *(sa.func.sum(getattr(u, name)).label(name) for name in USAGE_FIELDS),
            )
            .join(jobs, jobs.c.id == u.job_id)
            .where(jobs.c.tenant_id == tenant_id, u.recorded_at >= start, u.recorded_at < end)
            .group_by(u.job_id)
            .order_by(u.job_id)
        )
        with self._read() as connection:
            rows = connection.execute(query).all()
        return [
            JobUsage(
                job_id=row.job_id,
                steps=int(row.steps or 0),
                device_seconds=float(row.device_seconds or 0.0),
                generated_tokens=int(row.generated_tokens or 0),
                teacher_scored_tokens=int(row.teacher_scored_tokens or 0),
                student_scored_tokens=int(row.student_scored_tokens or 0),
                eval_tokens=int(row.eval_tokens or 0),
            )
            for row in rows
        ]
