"""The callback protocol through which a trainer reports to whoever runs it.

The CLI writes these reports to files and a progress bar; the worker writes them to the job
store. The trainer knows nothing about either. `should_stop` is polled between optimizer steps,
between the micro-batches of a step and every few decode steps while sampling: a stop inside a
step abandons that step (:class:`StepCancelled`; no update, no metrics), so a cancellation takes
effect within a fraction of a step.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol


class TrainerCallbacks(Protocol):
    def on_event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        """A lifecycle event: started, resumed, checkpoint, finished, cancelled, warning..."""

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Metrics of one completed optimizer step."""

    def on_checkpoint(self, step: int, path: Path) -> None:
        """A complete checkpoint directory now exists at `path`."""

    def should_stop(self) -> bool:
        """True when the run must stop (cancellation); polled often, so it must be cheap."""


class CheckpointRemovalCallback(Protocol):
    def on_checkpoint_removed(self, step: int, path: Path) -> None:
        """Retention is about to remove the complete checkpoint of `step` at `path` (called
        before the files go, so a record of it is dropped first; a crash in between leaves
        files that are no longer listed, never a listed checkpoint without files)."""


class NullCallbacks:
    """Ignores every report; never asks to stop."""

    def on_event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        return None

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        return None

    def on_checkpoint(self, step: int, path: Path) -> None:
        return None

    def should_stop(self) -> bool:
        return False


class CallbackList:
    """Fans every report out to several callbacks; stops when any of them asks."""

    def __init__(self, callbacks: Sequence[TrainerCallbacks]) -> None:
        self.callbacks = list(callbacks)

    def on_event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        for callback in self.callbacks:
            callback.on_event(kind, message, data)

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for callback in self.callbacks:
            callback.on_metrics(step, metrics)

    def on_checkpoint(self, step: int, path: Path) -> None:
        for callback in self.callbacks:
            callback.on_checkpoint(step, path)

    def on_checkpoint_removed(self, step: int, path: Path) -> None:
        for callback in self.callbacks:  # optional: callbacks written before retention lack it
            if (removed := getattr(callback, "on_checkpoint_removed", None)) is not None:
                removed(step, path)

    def should_stop(self) -> bool:
        return any(callback.should_stop() for callback in self.callbacks)


class StepCancelled(Exception):
    """Raised inside an optimizer step when the run must stop (``should_stop`` said so while
    sampling or between micro-batches): the step is abandoned, no optimizer update, no metrics."""
