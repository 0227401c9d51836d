"""Collapse guard: alarms on a run's step metrics, best-evaluation tracking and early stopping.

OPSD runs "tend to collapse" after about 100 steps (the authors' issue #20), so the authors
evaluate every 20 steps and report the best checkpoint. This module owns that rule for every
trainer, through :class:`CollapseGuard`, which the run loop (:func:`opsd_engine.trainers.common.
run_steps`) feeds with each step's metrics and each held-out evaluation's scores:

* **alarms** (``spec.guard``): on the moving average of the last ``window`` steps, rollout-length
  collapse (below ``length_collapse_ratio`` of the first window's mean), entropy collapse
  (student entropy below ``entropy_collapse_ratio`` of its first window), divergence at ~zero
  (below ``divergence_floor``) and clip saturation (share of loss tokens clipped above
  ``clip_saturation``, or with a vocabulary term capped above ``vocab_clip_saturation``). An
  alarm is one ``alarm`` job event when its condition starts to hold (``data``: ``alarm``,
  ``step``, ``value``, ``threshold``); it re-arms once the condition clears.
* **best evaluation** (``spec.eval.select`` / ``select_metric`` / ``min_delta``): which evaluated
  step scored best; with ``select: best`` the caller saves that step's adapter.
* **early stopping** (``spec.eval.patience``, ``spec.guard.stop_on_alarm``): :attr:`stop_reason`.

Its state is a plain JSON-able dict kept in ``TrainerState.extra["guard"]``, so a resumed run
continues the same baselines, best score and patience count. Pure Python (no torch).
"""

from __future__ import annotations

import math
from typing import Any

from opsd_engine.config import JobSpec
from opsd_engine.events import TrainerCallbacks

__all__ = ["ALARMS", "CollapseGuard", "eval_score"]

ALARMS = (
    "rollout_length_collapse",
    "entropy_collapse",
    "divergence_zero",
    "clip_saturation",
    "vocab_clip_saturation",
)

# Which metric each watched quantity is read from (the first one a trainer reports).
_LENGTH = ("rollout_len_mean", "completion_len_mean")
_ENTROPY = ("student_entropy", "entropy")
_DIVERGENCE = ("divergence",)
_CLIPPED = ("clip_frac",)
_VOCAB_CLIPPED = ("vocab_clip_token_frac",)


def eval_score(scores: dict[str, float], select_metric: str) -> float | None:
    """The value of ``select_metric`` (``avg``, ``majority`` or ``pass@k``) among an eval's
    ``eval/...`` metrics, or ``None`` when that evaluation did not report it."""
    if select_metric == "avg":
        value = next((v for k, v in scores.items() if k.startswith("eval/avg@")), None)
    else:
        value = scores.get(f"eval/{select_metric}")
    return None if value is None or not math.isfinite(value) else float(value)


def _first(metrics: dict[str, float], names: tuple[str, ...]) -> float | None:
    values = [metrics[n] for n in names if isinstance(metrics.get(n), (int, float))]
    values = [float(v) for v in values if math.isfinite(v)]
    return max(values) if values else None


class CollapseGuard:
    """Watches one run; see the module docstring. ``state`` is the dict it keeps its state in
    (pass ``trainer.state.extra.setdefault("guard", {})`` so that checkpoints carry it)."""

    def __init__(self, spec: JobSpec, callbacks: TrainerCallbacks, state: dict[str, Any]) -> None:
        self.spec, self.callbacks = spec, callbacks
        self.state = state
        state.setdefault("history", {})  # quantity -> last `window` values
        state.setdefault("baseline", {})  # quantity -> mean of its first `window` values
        state.setdefault("active", [])  # alarms whose condition holds now
        state.setdefault("alarms", [])  # every alarm raised: {alarm, step, value, threshold}
        state.setdefault("best_step", None)
        state.setdefault("best_score", None)
        state.setdefault("evals_since_best", 0)
        state.setdefault("stop_reason", None)

    # ------------------------------------------------------------------------------ alarms
    def observe_step(self, step: int, metrics: dict[str, float]) -> list[str]:
        """Feed one step's metrics; returns the alarms raised at this step (and reports each)."""
        cfg = self.spec.guard
        window = cfg.window
        observed = {
            "length": _first(metrics, _LENGTH),
            "entropy": _first(metrics, _ENTROPY),
            "divergence": _first(metrics, _DIVERGENCE),
            "clipped": _first(metrics, _CLIPPED),
            "vocab_clipped": _first(metrics, _VOCAB_CLIPPED),
        }
        averages: dict[str, float] = {}
        for name, value in observed.items():
            if value is None:
                continue
            history = self.state["history"].setdefault(name, [])
            history.append(value)
            del history[:-window]
            if len(history) == window:
                averages[name] = sum(history) / window
                self.state["baseline"].setdefault(name, averages[name])

        checks: list[tuple[str, str, float | None, bool]] = []  # alarm, quantity, threshold, below
        baseline = self.state["baseline"]
        if cfg.length_collapse_ratio is not None and "length" in baseline:
            checks.append(
                (
                    "rollout_length_collapse",
                    "length",
                    cfg.length_collapse_ratio * baseline["length"],
                    True,
                )
            )
        if cfg.entropy_collapse_ratio is not None and "entropy" in baseline:
            checks.append(
                (
                    "entropy_collapse",
                    "entropy",
                    cfg.entropy_collapse_ratio * baseline["entropy"],
                    True,
                )
            )
        checks.append(("divergence_zero", "divergence", cfg.divergence_floor, True))
        checks.append(("clip_saturation", "clipped", cfg.clip_saturation, False))
        checks.append(("vocab_clip_saturation", "vocab_clipped", cfg.vocab_clip_saturation, False))

        raised: list[str] = []
        active = self.state["active"]
        for alarm, quantity, threshold, below in checks:
            if threshold is None or quantity not in averages:
                continue
            value = averages[quantity]
            holds = value < threshold if below else value > threshold
            if holds and alarm not in active:
                active.append(alarm)
                raised.append(alarm)
                self._raise(step, alarm, value, threshold, below)
            elif not holds and alarm in active:
                active.remove(alarm)
        if raised and cfg.stop_on_alarm and self.state["stop_reason"] is None:
            self.state["stop_reason"] = f"alarm {raised[0]} at step {step}"
        return raised

    def _raise(self, step: int, alarm: str, value: float, threshold: float, below: bool) -> None:
        window = self.spec.guard.window
        words = {
            "rollout_length_collapse": "rollout length collapsed",
            "entropy_collapse": "student entropy collapsed",
            "divergence_zero": "divergence is ~zero (the teacher adds nothing)",
            "clip_saturation": "the per-token clip is saturated",
            "vocab_clip_saturation": "the per-vocabulary clip is saturated",
        }[alarm]
        relation = "<" if below else ">"
        record = {"alarm": alarm, "step": step, "value": value, "threshold": threshold}
        self.state["alarms"].append(record)
        self.callbacks.on_event(
            "alarm",
            f"step {step}: {words}: {window}-step mean {value:.4g} {relation} {threshold:.4g}",
            record,
        )

    # ------------------------------------------------------------------- best / patience
    def observe_eval(self, step: int, scores: dict[str, float]) -> bool:
        """Feed an evaluation of the adapter at ``step``; True when it is the new best."""
        cfg = self.spec.eval
        score = eval_score(scores, cfg.select_metric)
        if score is None:
            return False
        best = self.state["best_score"]
        if best is None or score > best + cfg.min_delta:
            self.state.update(best_step=step, best_score=score, evals_since_best=0)
            return True
        self.state["evals_since_best"] += 1
        waited = self.state["evals_since_best"]
        if cfg.patience is not None and waited >= cfg.patience and not self.state["stop_reason"]:
            self.state["stop_reason"] = (
                f"no better {cfg.select_metric} than {best:.4g} (step {self.state['best_step']}) "
                f"in {waited} evaluations (patience {cfg.patience})"
            )
        return False

    @property
    def best_step(self) -> int | None:
        return self.state["best_step"]

    @property
    def best_score(self) -> float | None:
        return self.state["best_score"]

    @property
    def stop_reason(self) -> str | None:
        return self.state["stop_reason"]
