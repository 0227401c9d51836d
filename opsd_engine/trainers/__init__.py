"""Trainers, one module per method; `run_training` picks the one a spec asks for."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from opsd_engine.config import JobSpec
from opsd_engine.data import Example
from opsd_engine.events import TrainerCallbacks
from opsd_engine.trainers.opsd import TrainResult


def run_training(
    spec: JobSpec,
    output_dir: str | Path,
    *,
    callbacks: TrainerCallbacks | None = None,
    resume: bool = False,
    examples: Sequence[Example] | None = None,
) -> TrainResult:
    if spec.method == "opsd":
        from opsd_engine.trainers import opsd

        return opsd.train(spec, output_dir, callbacks=callbacks, resume=resume, examples=examples)
    raise ValueError(f"method {spec.method!r} has no trainer in this version")


__all__ = ["TrainResult", "run_training"]
