"""The SFT trainer on a real tiny Qwen3 model with real peft LoRA, on the CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from opsd_engine.checkpoint import latest_checkpoint, read_state
from opsd_engine.events import NullCallbacks
from opsd_engine.prompts import encode_prompt, render_student_text
from opsd_engine.trainers import run_training
from opsd_engine.trainers.sft import SFTTrainer, sft_batch, train


class Recorder(NullCallbacks):
    def __init__(self, stop_after: int | None = None) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.events: list[str] = []
        self.stop_after = stop_after

    def on_event(self, kind: str, message: str, data: Any = None) -> None:
        self.events.append(kind)

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics.append((step, metrics))

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.metrics) >= self.stop_after


def test_sequences_are_the_student_prompt_then_solution_and_eos(tiny_spec, tmp_path) -> None:
    trainer = SFTTrainer(tiny_spec(method="sft"), tmp_path)
    example = trainer.examples[0]
    prompt, target = trainer.sequence(0)
    prompts = trainer.spec.prompts
    assert prompt == encode_prompt(
        trainer.tokenizer, render_student_text(example.problem, prompts), prompts, thinking=None
    )
    assert target[-1] == trainer.tokenizer.eos_token_id
    assert trainer.tokenizer.decode(target[:-1]) == example.solution


def test_only_solution_tokens_carry_loss(tiny_spec, tmp_path) -> None:
    trainer = SFTTrainer(tiny_spec(method="sft"), tmp_path)
    pairs = [trainer.sequence(i) for i in range(3)]
    batch = sft_batch([p for p, _ in pairs], [t for _, t in pairs], pad_id=trainer.pad_id)

    # The mask covers exactly each row's solution + EOS, and the labels put them right after
    # the prompt: every prompt (and padding) position is ignored.
    labels = batch.labels()
    for row, (prompt, target) in enumerate(pairs):
        assert int(batch.mask[row].sum()) == len(target)
        supervised = labels[row][labels[row] != -100].tolist()
        assert supervised == target
        prompt_end = batch.layout.input_ids.shape[1] - len(target)
        assert (labels[row, :prompt_end] == -100).all()
        assert batch.layout.input_ids[row, prompt_end - len(prompt) : prompt_end].tolist() == prompt

    # The trainer's loss is transformers' causal-LM loss with the prompt labels ignored...
    nll_sum, _, _ = trainer._forward_backward(pairs, 1.0, sync=True)
    model = trainer.policy.peft_model
    with torch.no_grad():
        masked = model(
            input_ids=batch.layout.input_ids,
            attention_mask=batch.layout.attention_mask,
            position_ids=batch.layout.position_ids,
            labels=labels,
        ).loss
        everything = labels.clone()
        everything[batch.layout.attention_mask.bool()] = batch.layout.input_ids[
            batch.layout.attention_mask.bool()
        ]
        unmasked = model(
            input_ids=batch.layout.input_ids,
            attention_mask=batch.layout.attention_mask,
            position_ids=batch.layout.position_ids,
            labels=everything,
        ).loss
    n_targets = sum(len(t) for _, t in pairs)
    assert nll_sum / n_targets == pytest.approx(float(masked), rel=1e-5)
    # ...which is not the loss over the whole sequence.
    assert abs(float(unmasked) - float(masked)) > 1e-3


def test_sft_learns_the_reference_solutions_with_complete_metrics(tiny_spec, tmp_path) -> None:
    recorder = Recorder()
    spec = tiny_spec(method="sft", optim={"max_steps": 12, "learning_rate": 1e-2})
    result = run_training(spec, tmp_path, callbacks=recorder)
    assert result.status == "succeeded" and result.step == 12
    assert (result.adapter_dir / "adapter_config.json").is_file()
    expected = {
        "loss",
        "nll",
        "token_accuracy",
        "grad_norm",
        "lr",
        "train_tokens",
        "train_tokens_total",
        "generated_tokens",
        "generated_tokens_total",
        "time_step_s",
        "tokens_per_s",
    }
    running = 0.0
    for _, metrics in recorder.metrics:
        assert expected <= metrics.keys()
        assert metrics["generated_tokens"] == 0 and metrics["generated_tokens_total"] == 0
        running += metrics["train_tokens"]
        assert metrics["train_tokens_total"] == running
        assert metrics["loss"] == pytest.approx(metrics["nll"], rel=1e-5)
    losses = [m["loss"] for _, m in recorder.metrics]
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses
    assert recorder.events[0] == "started" and recorder.events[-1] == "finished"


def test_sft_resume_is_bit_exact(tiny_spec, tmp_path: Path) -> None:
    spec = tiny_spec(method="sft", optim={"max_steps": 4}, checkpoint_every=2)
    straight = train(spec, tmp_path / "straight")
    stopped = train(spec, tmp_path / "resumed", callbacks=Recorder(stop_after=2))
    assert stopped.status == "cancelled"
    assert read_state(latest_checkpoint(tmp_path / "resumed" / "checkpoints")).step == 2
    resumed = train(spec, tmp_path / "resumed", resume=True)
    a = load_file(str(straight.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sft_reports_spec_eval_metrics(tiny_spec, tmp_path: Path) -> None:
    bench = tmp_path / "bench.jsonl"
    bench.write_text('{"problem": "1 + 1?", "answer": "2"}\n{"problem": "2 + 3?", "answer": "5"}\n')
    recorder = Recorder()
    eval_group = {"dataset_uri": str(bench), "n": 2, "max_new_tokens": 6, "every_steps": 2}
    spec = tiny_spec(
        method="sft", optim={"max_steps": 3}, eval={**eval_group, "include_base": True}
    )
    train(spec, tmp_path / "run", callbacks=recorder)
    evals = [(step, m) for step, m in recorder.metrics if "eval/avg@2" in m]
    assert [step for step, _ in evals] == [0, 2, 3]
    scores = {"eval/avg@2", "eval/pass@1", "eval/pass@2", "eval/majority"}
    usage = {"eval_tokens", "time_eval_device_s"}  # the evaluation's usage, with its scores
    assert all(set(m) == scores | usage for _, m in evals)
