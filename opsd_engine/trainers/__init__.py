"""Trainers, one module per method; `run_training` picks the one a spec's `method` asks for.

`opsd` (on-policy self-distillation), `sft` (supervised fine-tuning on the reference solutions)
and `grpo` (group-relative policy optimisation with a verifiable 0/1 reward). All three take the
same job spec, report through the same callbacks, write the same checkpoints and count
`generated_tokens` (sampled tokens per step) and `generated_tokens_total` the same way. The
methods that sample (`opsd`, `grpo`) take a `rollout_backend` factory (default: in process).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from accelerate import Accelerator

from opsd_engine.config import JobSpec
from opsd_engine.data import Example
from opsd_engine.events import TrainerCallbacks
from opsd_engine.rollout import RolloutFactory
from opsd_engine.trainers.common import TrainResult


def run_training(
    spec: JobSpec,
    output_dir: str | Path,
    *,
    callbacks: TrainerCallbacks | None = None,
    resume: bool = False,
    examples: Sequence[Example] | None = None,
    rollout_backend: RolloutFactory | None = None,
    accelerator: Accelerator | None = None,
) -> TrainResult:
    """Run ``spec`` with its method's trainer. ``accelerator``: the run's (already created, e.g.
    to know the rank before any file is written); default: one made from the spec."""
    # Experiment trackers mirror every metric and the spec (trackers.py), from rank 0 only.
    if spec.report_to and (accelerator is None or accelerator.is_main_process):
        from opsd_engine.events import CallbackList, NullCallbacks
        from opsd_engine.trackers import make_trackers

        trackers = make_trackers(spec, output_dir, Path(output_dir).name)
        try:
            return _run_method(
                spec,
                output_dir,
                callbacks=CallbackList([callbacks or NullCallbacks(), *trackers]),
                resume=resume,
                examples=examples,
                rollout_backend=rollout_backend,
                accelerator=accelerator,
            )
        finally:
            for tracker in trackers:
                tracker.close()
    return _run_method(
        spec,
        output_dir,
        callbacks=callbacks,
        resume=resume,
        examples=examples,
        rollout_backend=rollout_backend,
        accelerator=accelerator,
    )


def _run_method(
    spec: JobSpec,
    output_dir: str | Path,
    *,
    callbacks: TrainerCallbacks | None,
    resume: bool,
    examples: Sequence[Example] | None,
    rollout_backend: RolloutFactory | None,
    accelerator: Accelerator | None,
) -> TrainResult:
    if spec.method == "sft":
        from opsd_engine.trainers import sft

        return sft.train(
            spec,
            output_dir,
            callbacks=callbacks,
            resume=resume,
            examples=examples,
            accelerator=accelerator,
        )
    if spec.method in ("opsd", "grpo"):
        from opsd_engine.trainers import grpo, opsd

        return (opsd if spec.method == "opsd" else grpo).train(
            spec,
            output_dir,
            callbacks=callbacks,
            resume=resume,
            examples=examples,
            rollout_backend=rollout_backend,
            accelerator=accelerator,
        )
    raise ValueError(f"method {spec.method!r} has no trainer in this version")


__all__ = ["TrainResult", "run_training"]
