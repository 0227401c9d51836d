"""The collapse guard: alarms on step metrics, best-evaluation selection, early stopping.

Unit tests feed :class:`CollapseGuard` metric sequences with a known answer; the run test makes
a tiny OPSD run collapse-prone (learning rate 1.0, no gradient clipping), evaluates it every step
and checks that it stops early on patience and publishes the best evaluation's adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from opsd_engine.config import parse_spec
from opsd_engine.guard import CollapseGuard, eval_score
from opsd_engine.trainers.opsd import train
from tests.evals.helpers import write_benchmark

MINIMAL = {"base_model": "m", "dataset_uri": "s3://b/d.jsonl"}


class Events:
    """The trainer callback protocol, keeping what it is told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.metrics: dict[int, dict[str, float]] = {}

    def on_event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.events.append((kind, message, data or {}))

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics.setdefault(step, {}).update(metrics)

    def on_checkpoint(self, step: int, path: Path) -> None:
        return None

    def should_stop(self) -> bool:
        return False

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [data for k, _, data in self.events if k == kind]


def _guard(**guard: Any) -> tuple[CollapseGuard, Events, dict[str, Any]]:
    spec = parse_spec({**MINIMAL, "guard": guard})
    events, state = Events(), {}
    return CollapseGuard(spec, events, state), events, state


def test_length_and_entropy_collapse_fire_once_and_re_arm() -> None:
    guard, events, _ = _guard(window=2, length_collapse_ratio=0.5, entropy_collapse_ratio=0.5)
    lengths = [100, 100, 90, 60, 30, 20, 80, 100, 20, 10]
    entropies = [2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 0.5, 0.5, 0.5]
    raised = {}
    for step, (length, entropy) in enumerate(zip(lengths, entropies, strict=True), start=1):
        got = guard.observe_step(
            step, {"rollout_len_mean": length, "student_entropy": entropy, "divergence": 1.0}
        )
        if got:
            raised[step] = got
    # baseline 100 (first 2 steps): mean(60, 30) = 45 < 50 at step 5; clears at step 7-8
    # (mean(20, 80) = 50, mean(80, 100)); fires again at step 10 (mean(20, 10) = 15).
    # entropy: baseline 2.0, mean(2.0, 0.5) = 1.25 is not < 1.0; mean(0.5, 0.5) at step 9 is.
    assert raised == {
        5: ["rollout_length_collapse"],
        9: ["entropy_collapse"],
        10: ["rollout_length_collapse"],
    }
    first = events.of("alarm")[0]
    assert first == {
        "alarm": "rollout_length_collapse",
        "step": 5,
        "value": 45.0,
        "threshold": 50.0,
    }
    assert guard.stop_reason is None  # alarms only report unless stop_on_alarm


def test_divergence_floor_and_clip_saturation_and_stop_on_alarm() -> None:
    guard, _, _ = _guard(window=1, divergence_floor=1e-3, clip_saturation=0.8)
    assert guard.observe_step(1, {"divergence": 0.5, "clip_frac": 0.1}) == []
    assert guard.observe_step(2, {"divergence": 1e-5, "clip_frac": 0.9}) == [
        "divergence_zero",
        "clip_saturation",
    ]
    assert guard.stop_reason is None
    stopping, _, _ = _guard(window=1, divergence_floor=1e-3, stop_on_alarm=True)
    stopping.observe_step(1, {"divergence": 1e-5})
    assert stopping.stop_reason == "alarm divergence_zero at step 1"
    # the vocabulary clip's saturation alarm is off unless a threshold is set
    quiet, _, _ = _guard(window=1)
    assert quiet.observe_step(1, {"divergence": 1.0, "vocab_clip_token_frac": 1.0}) == []


def test_best_evaluation_and_patience() -> None:
    spec = parse_spec(
        {
            **MINIMAL,
            "eval": {
                "dataset_uri": "s3://b/e.jsonl",
                "every_steps": 1,
                "select": "best",
                "patience": 2,
                "min_delta": 0.01,
            },
        }
    )
    guard = CollapseGuard(spec, Events(), {})
    assert guard.observe_eval(1, {"eval/avg@4": 0.2, "eval/pass@1": 0.2})
    assert guard.observe_eval(2, {"eval/avg@4": 0.5})
    assert not guard.observe_eval(3, {"eval/avg@4": 0.505})  # within min_delta
    assert guard.stop_reason is None
    assert not guard.observe_eval(4, {"eval/avg@4": 0.1})
    assert (guard.best_step, guard.best_score) == (2, 0.5)
    assert guard.stop_reason is not None and "patience 2" in guard.stop_reason
    assert eval_score({"eval/majority": 0.3}, "majority") == 0.3
    assert eval_score({"eval/pass@2": 0.7}, "pass@2") == 0.7
    assert eval_score({"eval/avg@4": 0.1}, "pass@2") is None


@pytest.mark.parametrize(
    ("group", "field"),
    [
        ({"patience": 2, "dataset_uri": "s3://b/e.jsonl"}, "eval"),  # no every_steps
        ({"select": "best"}, "eval"),  # no dataset
        ({"select_metric": "median"}, "eval.select_metric"),
    ],
)
def test_selection_settings_are_validated(group: dict[str, Any], field: str) -> None:
    from opsd_engine.config import SpecError

    with pytest.raises(SpecError) as info:
        parse_spec({**MINIMAL, "eval": group})
    assert info.value.first_field == field


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def test_a_collapsing_run_stops_early_and_publishes_the_best_adapter(
    tiny_spec: Any, tmp_path: Path
) -> None:
    bench = write_benchmark(tmp_path / "bench.jsonl", n=2)
    spec = tiny_spec(
        optim={"learning_rate": 1.0, "max_grad_norm": None, "max_steps": 8},
        checkpoint_every=1,
        eval={
            "dataset_uri": str(bench),
            "n": 1,
            "max_new_tokens": 4,
            "every_steps": 1,
            "select": "best",
            "patience": 2,
        },
        # a floor above any divergence: the alarm must fire once the window is full
        guard={"window": 2, "divergence_floor": 1e6},
    )
    events = Events()
    result = train(spec, tmp_path / "run", callbacks=events)

    assert result.status == "succeeded"
    evals = {s: m for s, m in events.metrics.items() if "eval/avg@1" in m}
    best = max(evals, key=lambda s: (evals[s]["eval/avg@1"], -s))  # the first best
    # stopped 2 evaluations after the best one, well before the 8 steps
    assert result.step == best + 2 < 8
    assert sorted(evals) == list(range(1, result.step + 1))
    (stopped,) = events.of("early_stopped")
    assert stopped["step"] == result.step and stopped["best_step"] == best
    assert [d["step"] for d in events.of("best_checkpoint")][-1] == best
    finished = events.of("finished")[-1]
    assert finished["adapter_step"] == best and finished["select"] == "best"
    # the published adapter is the best step's (as its checkpoint holds it), not the last's
    published = _adapter(result.adapter_dir)
    at_best = _adapter(tmp_path / "run" / "checkpoints" / f"step-{best:06d}" / "adapter")
    last = _adapter(tmp_path / "run" / "adapter_last")
    assert published.keys() == at_best.keys()
    for key, value in published.items():
        torch.testing.assert_close(value, at_best[key], rtol=0, atol=0)
    assert any(not torch.equal(value, last[key]) for key, value in published.items())
    # the alarm is a job event carrying its step, value and threshold
    (alarm,) = [a for a in events.of("alarm") if a["alarm"] == "divergence_zero"]
    assert alarm["step"] == 2 and alarm["threshold"] == 1e6


def test_checkpoints_of_the_previous_version_still_resume() -> None:
    """A checkpoint's recorded spec from before `recipe`, `loss.vocab_clip` and `guard` existed
    resumes with a spec that leaves them at their defaults, and not with one that sets one."""
    from opsd_engine.checkpoint import ResumeMismatchError, TrainerState
    from opsd_engine.config import spec_to_dict
    from opsd_engine.trainers.common import check_resumable

    spec = parse_spec(MINIMAL)
    old = spec_to_dict(spec)
    for name in ("recipe", "guard"):
        old.pop(name)
    old["loss"].pop("vocab_clip")
    saved = TrainerState(step=2, spec=old)
    assert check_resumable(saved, spec, total_steps=10) == []
    with pytest.raises(ResumeMismatchError, match=r"loss\.vocab_clip: None -> 0\.05"):
        check_resumable(saved, parse_spec({**MINIMAL, "loss": {"vocab_clip": 0.05}}), 10)
