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
