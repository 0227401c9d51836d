"""GRPO: advantages and clipped loss against hand-computed values, and the trainer on the CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from opsd_engine.config import parse_spec
from opsd_engine.data import DatasetError
from opsd_engine.events import NullCallbacks
from opsd_engine.rollout import Rollout
from opsd_engine.trainers import run_training
from opsd_engine.trainers.grpo import (
    GRPOTrainer,
    _Group,
    group_advantages,
    grpo_loss,
    train,
)


class Recorder(NullCallbacks):
    def __init__(self, stop_after: int | None = None) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.stop_after = stop_after

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics.append((step, metrics))

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.metrics) >= self.stop_after


# ------------------------------------------------------------------------- the math, by hand
def test_group_advantages_by_hand() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    advantages = group_advantages(rewards)
    # Group 1: mean 1/2, sample std sqrt(4 * 1/4 / 3) = 1/sqrt(3).
    a = 0.5 / (1 / math.sqrt(3) + 1e-4)
    # Group 3: mean 1/4, sample std sqrt((3 * 1/16 + 9/16) / 3) = 1/2.
    b = 1 / (0.5 + 1e-4)
    expected = [[a, -a, -a, a], [0, 0, 0, 0], [-0.25 * b, -0.25 * b, -0.25 * b, 0.75 * b]]
    torch.testing.assert_close(advantages, torch.tensor(expected, dtype=torch.float64))
    assert (advantages[1] == 0).all(), "equal rewards: exactly zero advantage"
    centered = group_advantages(rewards, scale=False)
    torch.testing.assert_close(centered[2], torch.tensor([-0.25, -0.25, -0.25, 0.75]).double())
    assert (group_advantages(torch.tensor([[1.0], [0.0]])) == 0).all(), "G = 1 has no baseline"


def _two_completions() -> dict[str, torch.Tensor]:
    """Completion 1 (A=+1, 2 tokens): rho = 1.5, 0.5. Completion 2 (A=-1, 3 tokens): 1.5, 0.5, 1.

    Column 2 of row 0 is padding and holds garbage that must not matter.
    """
    old = torch.tensor([[-1.0, -2.0, 55.0], [-0.5, -1.5, -3.0]])
    ratios = torch.tensor([[1.5, 0.5, 1.0], [1.5, 0.5, 1.0]])
    logprobs = (old + ratios.log()).clone()
    logprobs[0, 2] = 100.0
    return {
        "logprobs": logprobs.requires_grad_(),
        "old_logprobs": old,
        "advantages": torch.tensor([1.0, -1.0]),
        "mask": torch.tensor([[True, True, False], [True, True, True]]),
    }


def test_clipped_surrogate_by_hand_sequence_normalization() -> None:
    inputs = _two_completions()
    result = grpo_loss(**inputs, epsilon=0.2, normalization="sequence", normalizer=2)
    # A=+1: min(1.5, 1.2) = 1.2 (clipped), min(0.5, 0.8) = 0.5 -> per-token loss -1.2, -0.5.
    # A=-1: min(-1.5, -1.2) = -1.5, min(-0.5, -0.8) = -0.8 (clipped), -1 -> 1.5, 0.8, 1.0.
    # Eq. 5: mean over completions of each completion's token mean.
    expected = ((-1.2 - 0.5) / 2 + (1.5 + 0.8 + 1.0) / 3) / 2
    assert float(result.loss) == pytest.approx(expected)
    assert int(result.clipped_tokens) == 2
    result.loss.backward()
    # d/dlogp of -rho*A is -rho*A where the unclipped term is the minimum, 0 where clipped.
    grad = inputs["logprobs"].grad
    expected_grad = torch.tensor([[0.0, -0.5 / (2 * 2), 0.0], [1.5 / (3 * 2), 0.0, 1.0 / (3 * 2)]])
    torch.testing.assert_close(grad, expected_grad)


def test_clipped_surrogate_by_hand_token_normalization_and_kl() -> None:
    inputs = _two_completions()
    result = grpo_loss(**inputs, epsilon=0.2, normalization="token", normalizer=5)
    assert float(result.loss) == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8 + 1.0) / 5)

    # k3 KL: with log pi_ref - log pi = ln 2 on every token, each adds 2 - ln 2 - 1.
    inputs = _two_completions()
    ref = inputs["logprobs"].detach() + math.log(2.0)
    with_kl = grpo_loss(
        **inputs,
        epsilon=0.2,
        normalization="token",
        normalizer=5,
        ref_logprobs=ref,
        kl_beta=0.1,
    )
    k3 = 2 - math.log(2) - 1
    assert float(with_kl.loss) == pytest.approx(float(result.loss) + 0.1 * k3)
    assert float(with_kl.kl_sum) == pytest.approx(5 * k3)


def test_zero_variance_groups_give_exactly_zero_gradient() -> None:
    inputs = _two_completions()
    advantages = group_advantages(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    assert (advantages == 0).all()
    inputs["advantages"] = advantages.reshape(-1)[:2].float()
    result = grpo_loss(**inputs, epsilon=0.2, normalization="sequence", normalizer=2)
    result.loss.backward()
    assert float(result.loss) == 0.0
    assert (inputs["logprobs"].grad == 0).all()


# --------------------------------------------------------------------------- the trainer
def test_groups_where_nothing_is_correct_leave_the_adapter_unchanged(tiny_spec, tmp_path) -> None:
    """The random tiny model never answers correctly: every group is all-zero, no gradient."""
    recorder = Recorder()
    trainer = GRPOTrainer(
        tiny_spec(method="grpo", generation={"num_generations": 4}, optim={"max_steps": 1}),
        tmp_path,
        callbacks=recorder,
    )
    before = {k: v.clone() for k, v in trainer.policy.peft_model.state_dict().items()}
    metrics = trainer.train_step()
    assert metrics["reward_mean"] == 0 and metrics["zero_variance_group_frac"] == 1.0
    assert metrics["grad_norm"] == 0 and metrics["loss"] == 0
    for key, value in trainer.policy.peft_model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_step_moves_probability_towards_the_rewarded_completion(tiny_spec, tmp_path) -> None:
    trainer = GRPOTrainer(
        tiny_spec(method="grpo", generation={"num_generations": 2}, optim={"max_steps": 2}),
        tmp_path,
    )
    trainer.train_step()  # LoRA B leaves zero, so every LoRA parameter gets a gradient
    prompt = trainer._prompt(0)
    good, bad = [5, 6, 7, 8], [9, 10, 11]
    rollouts = [Rollout(0, good, False), Rollout(0, bad, False)]
    advantages = group_advantages(torch.tensor([[1.0, 0.0]]))[0].tolist()
    group = _Group(prompt, rollouts, [1.0, 0.0], advantages)

    def logprob_sums() -> list[float]:
        from opsd_engine.prompts import assemble_scoring_batch

        sums = []
        for ids in (good, bad):
            batch = assemble_scoring_batch([prompt], [ids], pad_id=trainer.pad_id)
            with torch.no_grad():
                logits = trainer.policy.peft_model(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids,
                ).logits
                logits = batch.at_rollout(logits)[0]
            sums.append(float(logits.log_softmax(-1).gather(-1, torch.tensor([ids]).T).sum()))
        return sums

    trainer.optimizer.zero_grad(set_to_none=True)
    before = logprob_sums()
    trainer._score_and_backward([(group, 0), (group, 1)], 2.0, sync=True)
    with torch.no_grad():
        for param in trainer.policy.trainable_parameters():
            param -= 0.05 * param.grad
    after = logprob_sums()
    assert after[0] > before[0] and after[1] < before[1], (before, after)


def test_grpo_run_reports_its_metrics_and_token_accounting(tiny_spec, tmp_path) -> None:
    recorder = Recorder()
    spec = tiny_spec(method="grpo", generation={"num_generations": 3}, optim={"max_steps": 2})
    result = run_training(spec, tmp_path, callbacks=recorder)
    assert result.status == "succeeded" and result.step == 2
    expected = {
        "loss",
        "reward_mean",
        "reward_std",
        "zero_variance_group_frac",
        "completion_len_mean",
        "completion_len_max",
        "clip_frac",
        "grad_norm",
        "lr",
        "generated_tokens",
        "generated_tokens_total",
        "time_generation_s",
        "time_reward_s",
        "time_step_s",
    }
    running = 0.0
    completions = 2 * 2 * 3  # batch 2 x accumulation 2 x G 3
    for _, metrics in recorder.metrics:
        assert expected <= metrics.keys()
        running += metrics["generated_tokens"]
        assert metrics["generated_tokens_total"] == running
        assert metrics["generated_tokens"] == pytest.approx(
            metrics["completion_len_mean"] * completions
        )
        assert 1 <= metrics["completion_len_mean"] <= metrics["completion_len_max"] <= 12
        assert 0 <= metrics["zero_variance_group_frac"] <= 1


def test_grpo_resume_is_bit_exact(tiny_spec, tmp_path: Path) -> None:
    spec = tiny_spec(
        method="grpo",
        generation={"num_generations": 2},
        optim={"max_steps": 4},
        checkpoint_every=2,
        lora={"r": 4, "alpha": 8, "dropout": 0.1},
    )
    straight = train(spec, tmp_path / "straight")
    stopped = train(spec, tmp_path / "resumed", callbacks=Recorder(stop_after=2))
    assert stopped.status == "cancelled" and stopped.step == 2
    resumed = train(spec, tmp_path / "resumed", resume=True)
    a = load_file(str(straight.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reference_answer_is_the_answer_field_or_the_last_box(
    tiny_spec, tmp_path: Path, tiny_model_dir: Path
) -> None:
    rows = [
        {"problem": "1 + 1?", "solution": "1 + 1 = 2. \\boxed{2}"},
        {"problem": "2 + 2?", "solution": "no box here", "answer": "4"},
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = GRPOTrainer(
        tiny_spec(method="grpo", dataset_uri=str(data), optim={"max_steps": 1}), tmp_path / "a"
    )
    assert trainer.answers == ["2", "4"]
    assert trainer.reward(Rollout(0, trainer.tokenizer.encode("so \\boxed{4}"), True), "4") == 1
    assert trainer.reward(Rollout(0, trainer.tokenizer.encode("so \\boxed{5}"), True), "4") == 0

    data.write_text(json.dumps({"problem": "3 + 3?", "solution": "six"}) + "\n")
    with pytest.raises(DatasetError, match="no reference answer"):
        GRPOTrainer(tiny_spec(method="grpo", dataset_uri=str(data)), tmp_path / "b")


def test_grpo_spec_defaults_to_eight_generations() -> None:
    body: dict[str, Any] = {"base_model": "m", "dataset_uri": "d.jsonl", "method": "grpo"}
    assert parse_spec(body).generation.num_generations == 8
    assert parse_spec(body).grpo.loss_normalization == "sequence"
    explicit = parse_spec({**body, "generation": {"num_generations": 4}})
    assert explicit.generation.num_generations == 4
    assert parse_spec({**body, "method": "opsd"}).generation.num_generations == 1


def test_grpo_reports_spec_eval_metrics(tiny_spec, tmp_path: Path) -> None:
    bench = tmp_path / "bench.jsonl"
    bench.write_text('{"problem": "1 + 1?", "answer": "2"}\n{"problem": "2 + 3?", "answer": "5"}\n')
    recorder = Recorder()
    spec = tiny_spec(
        method="grpo",
        generation={"num_generations": 2},
        optim={"max_steps": 2},
        eval={"dataset_uri": str(bench), "n": 2, "max_new_tokens": 6},
    )
    train(spec, tmp_path / "run", callbacks=recorder)
    evals = [(step, m) for step, m in recorder.metrics if "eval/avg@2" in m]
    assert [step for step, _ in evals] == [2]  # at_end only by default
