"""A local training run in an output directory: metrics/events files and a progress bar.

`DIR/metrics.jsonl` gets one JSON object per optimizer step (`step` plus the metrics),
`DIR/events.jsonl` the lifecycle events, `DIR/spec.json` the resolved spec, `DIR/checkpoints/`
the atomic checkpoints and `DIR/adapter/` the final PEFT adapter. On resume, metric rows past the
checkpoint being resumed are dropped first: those steps are recomputed (bit-exactly on the CPU),
so every step appears once.

Under `torchrun` / `accelerate launch` every rank calls :func:`run_local`; rank 0 alone writes
those files (metrics are already summed over ranks), every rank trains. A stop asked for on any
rank (``stop_file`` appearing, SIGTERM when :class:`StopRequest` handles it) stops all
ranks together at the next poll, with a checkpoint and a `cancelled` event.

Ctrl-C stops the run at the end of the current optimizer step with a checkpoint (a second
Ctrl-C stops at once, keeping the last checkpoint); either way an `interrupted` event is
recorded and :class:`RunInterrupted` tells the caller where the run can be resumed from.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opsd_engine import checkpoint as ckpt
from opsd_engine.config import JobSpec, spec_to_dict
from opsd_engine.events import CallbackList, NullCallbacks, TrainerCallbacks
from opsd_engine.trainers import TrainResult, run_training

if TYPE_CHECKING:
    from accelerate import Accelerator

METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"


class RunDirectoryError(ValueError):
    pass


class RunInterrupted(Exception):
    """The user interrupted the run (Ctrl-C); `step` steps are done, `checkpoint` is the latest
    complete checkpoint (None before the first), from which `--resume` continues."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint yet"
        super().__init__(f"interrupted after step {step} ({where})")
        self.step, self.checkpoint = step, checkpoint


def interrupted_at(output_dir: Path) -> RunInterrupted:
    """The :class:`RunInterrupted` of a run directory as it is now: the last step with metrics
    (0 when none) and the latest complete checkpoint (None when none)."""
    rows = read_metrics(output_dir)
    return RunInterrupted(
        rows[-1]["step"] if rows else 0, ckpt.latest_checkpoint(output_dir / "checkpoints")
    )


class CtrlC:
    """SIGINT during a run: the first asks the trainer to stop after its current step (it saves
    a checkpoint), the second raises KeyboardInterrupt at once. A callback (`should_stop`)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nCtrl-C: stopping after the current step (a checkpoint is saved); "
            "press Ctrl-C again to stop at once",
            file=sys.stderr,
            flush=True,
        )

    def on_event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        return None

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        return None

    def on_checkpoint(self, step: int, path: Path) -> None:
        return None

    def should_stop(self) -> bool:
        return self.requested


class JsonlRecorder:
    """Appends metrics and events of a run to JSONL files in its output directory."""

    def __init__(self, output_dir: Path, interrupt: CtrlC | None = None) -> None:
        self.metrics_path = output_dir / METRICS_FILE
        self.events_path = output_dir / EVENTS_FILE
        self.interrupt = interrupt

    def on_event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        if kind == "cancelled" and self.interrupt is not None and self.interrupt.requested:
            kind, message = "interrupted", f"interrupted by Ctrl-C: {message}"
        row = {"time": time.time(), "kind": kind, "message": message, "data": data or {}}
        _append(self.events_path, row)

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        _append(self.metrics_path, {"step": step, **metrics})

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.on_event("checkpoint", f"checkpoint at step {step}", {"step": step, "path": str(path)})

    def on_checkpoint_removed(self, step: int, path: Path) -> None:
        self.on_event(
            "checkpoint_removed",
            f"removed the checkpoint of step {step} (checkpoint.keep_last)",
            {"step": step, "path": str(path)},
        )

    def should_stop(self) -> bool:
        return False


class ProgressBar:
    """A tqdm bar over optimizer steps: loss, divergence (or reward / NLL), generated tokens."""

    def __init__(self, *, disable: bool = False) -> None:
        self.disable = disable
        self.bar: Any = None

    def on_event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        from tqdm.auto import tqdm

        data = data or {}
        if kind == "started" and self.bar is None:
            self.bar = tqdm(
                total=data.get("total_steps"),
                initial=data.get("start_step", 0),
                desc="opsd train",
                unit="step",
                disable=self.disable,
                dynamic_ncols=True,
            )
        elif kind in ("finished", "cancelled", "interrupted") and self.bar is not None:
            self.bar.close()
        elif self.bar is not None and kind != "checkpoint":
            self.bar.write(message)

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self.bar is None:
            return
        # Every method reports loss and generated tokens; the third figure is its own signal.
        shown = {"loss": f"{metrics['loss']:.4f}"}
        for key, label in (("divergence", "div"), ("reward_mean", "reward"), ("nll", "nll")):
            if key in metrics:
                shown[label] = f"{metrics[key]:.4f}"
                break
        self.bar.set_postfix(**shown, tok=int(metrics["generated_tokens_total"]), refresh=False)
        self.bar.update(step - self.bar.n)

    def on_checkpoint(self, step: int, path: Path) -> None:
        if self.bar is not None:
            self.bar.write(f"checkpoint: {path}")

    def should_stop(self) -> bool:
        return False


class StopRequest(NullCallbacks):
    """Asks the run to stop when ``stop_file`` exists or, after :meth:`handle_signals`, when the
    process got SIGTERM (a second one is not caught: it ends the process as usual; Ctrl-C is
    :class:`CtrlC`'s). The run then stops at its next poll (within a fraction of a step), keeps
    a checkpoint of the last complete step and reports `cancelled`."""

    def __init__(self, stop_file: Path | None = None) -> None:
        self.stop_file = stop_file
        self.signalled = threading.Event()

    def handle_signals(self) -> None:
        """Catch the first SIGTERM (main thread only, as Python requires)."""

        def handler(signum: int, _frame: Any) -> None:
            self.signalled.set()
            signal.signal(signum, signal.SIG_DFL)

        signal.signal(signal.SIGTERM, handler)

    def should_stop(self) -> bool:
        return self.signalled.is_set() or (self.stop_file is not None and self.stop_file.exists())


def _append(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(output_dir: Path, keep_through_step: int) -> None:
    rows = [row for row in read_metrics(output_dir) if row["step"] <= keep_through_step]
    path = output_dir / METRICS_FILE
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tmp.replace(path)


def run_local(
    spec: JobSpec,
    output_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    extra_callbacks: list[TrainerCallbacks] | None = None,
    stop: StopRequest | None = None,
) -> TrainResult:
    """Train `spec` into `output_dir` (or continue it with `resume`).

    Launched as a process group (``torchrun``, ``accelerate launch``), each rank calls this; the
    group forms first (:func:`~opsd_engine.trainers.common.make_accelerator`), every rank checks
    the directory, then rank 0 alone writes the run's files and reports to ``extra_callbacks``
    and the progress bar; ``stop`` is polled on every rank. Raises :class:`RunDirectoryError`
    (on every rank) when `output_dir` already holds a run and `resume` is off, and
    :class:`RunInterrupted` after Ctrl-C (an `interrupted` event is recorded first).
    """
    from opsd_engine.trainers.common import make_accelerator

    output_dir = Path(output_dir)
    accelerator = make_accelerator(spec)
    try:
        result = _train_in_group(
            spec,
            output_dir,
            accelerator,
            resume=resume,
            progress=progress,
            extra_callbacks=extra_callbacks,
            stop=stop,
        )
        accelerator.wait_for_everyone()  # every rank is done before the group is taken down
        return result
    finally:
        leave_process_group()


def leave_process_group() -> None:
    """Destroy this rank's process group, if one was formed. A group left to the interpreter's
    exit can abort the rank ("terminate called without an active exception", exit -6) while the
    backend's threads are torn down, which fails the launch of a run that had finished."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _train_in_group(
    spec: JobSpec,
    output_dir: Path,
    accelerator: Accelerator,
    *,
    resume: bool,
    progress: bool,
    extra_callbacks: list[TrainerCallbacks] | None,
    stop: StopRequest | None,
) -> TrainResult:
    """:func:`run_local` once the group has formed."""
    latest = ckpt.latest_checkpoint(output_dir / "checkpoints")
    if not resume and (latest is not None or (output_dir / METRICS_FILE).exists()):
        raise RunDirectoryError(
            f"{output_dir} already holds a run; pass --resume to continue it "
            "or choose another --out"
        )
    accelerator.wait_for_everyone()  # every rank has looked before rank 0 writes anything
    main = accelerator.is_main_process
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            truncate_metrics(output_dir, ckpt.read_state(latest).step if latest else 0)
        (output_dir / "spec.json").write_text(json.dumps(spec_to_dict(spec), indent=2))
    accelerator.wait_for_everyone()
    with CtrlC() as interrupt:
        recorder = JsonlRecorder(output_dir, interrupt) if main else None
        reporters: list[TrainerCallbacks] = [interrupt, *([stop] if stop is not None else [])]
        if recorder is not None:
            reporters = [
                recorder,
                ProgressBar(disable=not progress),
                *reporters,
                *(extra_callbacks or []),
            ]
        try:
            result = run_training(
                spec,
                output_dir,
                callbacks=CallbackList(reporters),
                resume=resume,
                accelerator=accelerator,
            )
        except KeyboardInterrupt:
            interrupted = interrupted_at(output_dir)
            if recorder is not None:
                recorder.on_event(
                    "interrupted",
                    f"interrupted by Ctrl-C during step {interrupted.step + 1}",
                    {
                        "step": interrupted.step,
                        "checkpoint": str(interrupted.checkpoint)
                        if interrupted.checkpoint
                        else None,
                    },
                )
            raise interrupted from None
    if result.status == "cancelled" and interrupt.requested:
        raise RunInterrupted(result.step, result.last_checkpoint)
    return result
