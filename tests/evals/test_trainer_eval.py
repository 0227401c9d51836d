"""The `eval` group of a job spec: the OPSD trainer evaluates the student every N steps and at the
end (and the base model at step 0), reporting `eval/*` metrics at the training step, and the
training itself is bit-identical with and without those evals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from opsd_engine.trainers.opsd import train
from tests.evals.helpers import write_benchmark

TIMING = ("time_", "tokens_per_s")


class Recorder:
    """A real implementation of the trainer's callback protocol that keeps what it is told."""

    def __init__(self) -> None:
        self.metrics: dict[int, dict[str, float]] = {}

    def on_event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        return None

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics.setdefault(step, {}).update(metrics)

    def on_checkpoint(self, step: int, path: Path) -> None:
        return None

    def should_stop(self) -> bool:
        return False


def test_eval_group_reports_eval_metrics_without_changing_training(
    tiny_spec: Any, tmp_path: Path
) -> None:
    bench = write_benchmark(tmp_path / "bench.jsonl", n=3)
    eval_group = {
        "dataset_uri": str(bench),
        "limit": 2,
        "n": 2,
        "max_new_tokens": 6,
        "every_steps": 2,
        "include_base": True,
    }
    with_eval, plain = Recorder(), Recorder()
    result = train(tiny_spec(eval=eval_group), tmp_path / "with", callbacks=with_eval)
    reference = train(tiny_spec(), tmp_path / "plain", callbacks=plain)
    assert result.status == reference.status == "succeeded"

    names = {"eval/avg@2", "eval/pass@1", "eval/pass@2", "eval/majority"}
    evals = {
        step: {k: v for k, v in values.items() if k.startswith("eval/")}
        for step, values in with_eval.metrics.items()
    }
    assert {step for step, found in evals.items() if found} == {0, 2, 3}
    assert {s for s, m in with_eval.metrics.items() if m.get("eval_tokens", 0) > 0} == {0, 2, 3}
    for step in (0, 2, 3):
        assert set(evals[step]) == names
        assert all(0.0 <= v <= 1.0 for v in evals[step].values())
        assert evals[step]["eval/pass@1"] == evals[step]["eval/avg@2"]
    # step 0: the base model only, no training yet
    assert set(with_eval.metrics[0]) == names | {"eval_tokens", "time_eval_device_s"}

    for step in (1, 2, 3):
        trained = {k: v for k, v in with_eval.metrics[step].items() if not k.startswith(TIMING)}
        trained = {k: v for k, v in trained.items() if not k.startswith(("eval/", "eval_"))}
        trained.pop("time_eval_device_s", None)
        expected = {k: v for k, v in plain.metrics[step].items() if not k.startswith(TIMING)}
        assert trained == expected, step
    weights = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    expected_weights = load_file(str(reference.adapter_dir / "adapter_model.safetensors"))
    assert weights.keys() == expected_weights.keys()
    assert all(torch.equal(weights[k], expected_weights[k]) for k in weights)
