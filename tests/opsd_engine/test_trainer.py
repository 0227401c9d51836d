"""The OPSD trainer on a real tiny Qwen3 model with real peft LoRA, on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opsd_engine.checkpoint import latest_checkpoint, list_checkpoints, read_state
from opsd_engine.events import NullCallbacks
from opsd_engine.losses import rollout_loss_from_logits
from opsd_engine.prompts import assemble_scoring_batch, rollout_targets
from opsd_engine.rollout import Rollout, SamplingParams
from opsd_engine.trainers.opsd import OPSDTrainer, train


class Recorder(NullCallbacks):
    def __init__(self, stop_after: int | None = None) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.events: list[str] = []
        self.checkpoints: list[int] = []
        self.stop_after = stop_after

    def on_event(self, kind, message, data=None) -> None:
        self.events.append(kind)

    def on_metrics(self, step, metrics) -> None:
        self.metrics.append((step, metrics))

    def on_checkpoint(self, step, path) -> None:
        self.checkpoints.append(step)

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.metrics) >= self.stop_after


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def _probe_batch(trainer: OPSDTrainer):
    pair = trainer._prompt_pair(0)
    return assemble_scoring_batch([pair.teacher_ids], [[5, 6, 7]], pad_id=trainer.pad_id)


def _hidden(trainer: OPSDTrainer, batch, mode: str | None) -> torch.Tensor:
    if mode is None:  # the student, adapter on
        with torch.no_grad():
            return trainer.policy.hidden_states(
                batch.input_ids, batch.attention_mask, batch.position_ids
            )
    with trainer.policy.teacher_view(mode):
        return trainer.policy.hidden_states(
            batch.input_ids, batch.attention_mask, batch.position_ids
        )


def test_teacher_view_is_the_base_model_and_stays_frozen(
    tiny_spec, tiny_model_dir, tmp_path
) -> None:
    from transformers import AutoModelForCausalLM

    trainer = OPSDTrainer(tiny_spec(optim={"max_steps": 2}), tmp_path)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    batch = _probe_batch(trainer)
    with torch.no_grad():
        base_hidden = base.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        ).last_hidden_state
    torch.testing.assert_close(_hidden(trainer, batch, "initial"), base_hidden, rtol=0, atol=0)

    trainer.train_step()
    student = _hidden(trainer, batch, None)
    assert (student - base_hidden).abs().max() > 1e-4, (
        "the optimizer step did not change the student"
    )
    torch.testing.assert_close(_hidden(trainer, batch, "initial"), base_hidden, rtol=0, atol=0)
    torch.testing.assert_close(_hidden(trainer, batch, "current"), student, rtol=0, atol=0)
    base_weights = {k: v for k, v in base.state_dict().items()}
    for name, value in trainer.policy.causal_lm.state_dict().items():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        torch.testing.assert_close(value, base_weights[key], rtol=0, atol=0)


def _fixed_set_divergence(trainer: OPSDTrainer, pairs, rollouts) -> float:
    """Mean per-token JSD, current student vs teacher, on fixed rollouts (no sampling noise)."""
    ids = [r.token_ids for r in rollouts]
    width = max(len(x) for x in ids)
    targets, mask = rollout_targets(ids, width, pad_id=trainer.pad_id)
    teacher = assemble_scoring_batch(
        [p.teacher_ids for p in pairs], ids, pad_id=trainer.pad_id, rollout_width=width
    )
    student = assemble_scoring_batch(
        [p.student_ids for p in pairs], ids, pad_id=trainer.pad_id, rollout_width=width
    )
    t_hidden = teacher.at_rollout(_hidden(trainer, teacher, "initial"))
    s_hidden = student.at_rollout(_hidden(trainer, student, None))
    head = trainer.policy.output_embeddings
    result = rollout_loss_from_logits(head(s_hidden), head(t_hidden), targets, mask, normalizer=1.0)
    return float(result.divergence_sum / result.valid_tokens)


def test_end_to_end_run_reduces_the_divergence(tiny_spec, tmp_path) -> None:
    spec = tiny_spec(optim={"max_steps": 16, "learning_rate": 1e-2}, lora={"r": 8, "alpha": 16})
    recorder = Recorder()
    trainer = OPSDTrainer(spec, tmp_path, callbacks=recorder)
    pairs = [trainer._prompt_pair(i) for i in range(8)]
    torch.manual_seed(1)
    held = trainer.rollouts.generate(
        [p.student_ids for p in pairs], SamplingParams(max_new_tokens=12)
    )
    before = _fixed_set_divergence(trainer, pairs, held)
    result = trainer.train()
    assert result.status == "succeeded" and result.step == 16
    after = _fixed_set_divergence(trainer, pairs, held)
    assert after < 0.75 * before, (before, after)
    divergences = [m["divergence"] for _, m in recorder.metrics]
    assert sum(divergences[-4:]) < sum(divergences[:4]), divergences
    assert recorder.events[0] == "started" and recorder.events[-1] == "finished"


def test_step_metrics_are_complete_and_consistent(tiny_spec, tmp_path) -> None:
    recorder = Recorder()
    train(tiny_spec(optim={"max_steps": 3, "warmup_ratio": 0.5}), tmp_path, callbacks=recorder)
    steps = [step for step, _ in recorder.metrics]
    assert steps == [1, 2, 3]
    expected = {
        "loss",
        "divergence",
        "student_entropy",
        "teacher_entropy",
        "grad_norm",
        "lr",
        "rollout_len_mean",
        "rollout_len_max",
        "generated_tokens",
        "generated_tokens_total",
        "time_generation_s",
        "time_teacher_s",
        "time_student_s",
        "time_optimizer_s",
        "tokens_per_s",
    }
    running = 0.0
    for _, metrics in recorder.metrics:
        assert expected <= metrics.keys()
        running += metrics["generated_tokens"]
        assert metrics["generated_tokens_total"] == running
        assert 1 <= metrics["rollout_len_mean"] <= metrics["rollout_len_max"] <= 12
        assert metrics["loss"] == pytest.approx(metrics["divergence"], rel=1e-5)
    lrs = [m["lr"] for _, m in recorder.metrics]
    assert lrs[0] < lrs[1], "warmup"  # 2 warmup steps of 3


def test_micro_batches_share_one_step_normalizer(tiny_spec, tmp_path) -> None:
    """Gradient of 2 micro-batches x 2 == gradient of 1 micro-batch x 4 (same rollouts)."""
    trainer = OPSDTrainer(tiny_spec(lora={"r": 4, "alpha": 8, "dropout": 0.0}), tmp_path)
    pairs = [trainer._prompt_pair(i) for i in range(4)]
    sampled = trainer.rollouts.generate(
        [p.student_ids for p in pairs], SamplingParams(max_new_tokens=9), seeds=[0, 1, 2, 3]
    )
    # uneven lengths (the 9 - 2i first sampled tokens), so padding differs between groupings
    rollouts = [
        Rollout(r.prompt_index, r.token_ids[: 9 - 2 * i], False) for i, r in enumerate(sampled)
    ]
    assert len({len(r.token_ids) for r in rollouts}) == 4
    total = sum(len(r.token_ids) for r in rollouts)
    # A first step so that LoRA B is non-zero and every LoRA parameter gets a gradient.
    trainer.train_step()

    def grads(groups: list[list[int]]) -> list[torch.Tensor]:
        trainer.optimizer.zero_grad(set_to_none=True)
        for n, group in enumerate(groups):
            trainer._score_and_backward(
                [pairs[i] for i in group],
                [rollouts[i] for i in group],
                total,
                sync=n == len(groups) - 1,
            )
        return [p.grad.clone() for p in trainer.policy.trainable_parameters()]

    together = grads([[0, 1, 2, 3]])
    split = grads([[0, 1], [2, 3]])
    for a, b in zip(together, split, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_resume_is_bit_exact(tiny_spec, tmp_path) -> None:
    spec = tiny_spec(
        optim={"max_steps": 4}, checkpoint_every=2, lora={"r": 4, "alpha": 8, "dropout": 0.1}
    )
    straight = train(spec, tmp_path / "straight")

    interrupted = train(spec, tmp_path / "resumed", callbacks=Recorder(stop_after=2))
    assert interrupted.status == "cancelled" and interrupted.step == 2
    assert read_state(latest_checkpoint(tmp_path / "resumed" / "checkpoints")).step == 2
    resumed = train(spec, tmp_path / "resumed", resume=True)
    assert resumed.status == "succeeded" and resumed.step == 4

    a, b = _adapter(straight.adapter_dir), _adapter(resumed.adapter_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    state = read_state(resumed.last_checkpoint)
    assert state.step == 4 and state.examples_consumed == 4 * 2 * 2
    assert [p.name for p in list_checkpoints(tmp_path / "resumed" / "checkpoints")] == [
        "step-000002",
        "step-000004",
    ]


def test_resume_refuses_a_different_spec(tiny_spec, tmp_path) -> None:
    train(tiny_spec(optim={"max_steps": 1}), tmp_path)
    with pytest.raises(ValueError, match=r"another spec.*Differing: beta: 0\.5 -> 0\.9"):
        train(tiny_spec(optim={"max_steps": 2}, beta=0.9), tmp_path, resume=True)


def test_resume_accepts_other_metadata_checkpointing_and_evals(
    tiny_spec, tiny_dataset, tmp_path
) -> None:
    first = train(
        tiny_spec(optim={"max_steps": 2}, checkpoint_every=1),
        tmp_path,
        callbacks=Recorder(stop_after=1),
    )
    assert first.status == "cancelled" and first.step == 1
    changed = tiny_spec(
        optim={"max_steps": 2},
        checkpoint_every=2,
        metadata={"note": "resumed"},
        eval={"dataset_uri": str(tiny_dataset), "limit": 1, "n": 1, "max_new_tokens": 4},
    )
    resumed = train(changed, tmp_path, resume=True)
    assert resumed.status == "succeeded" and resumed.step == 2


def test_cancellation_stops_between_steps_and_keeps_a_checkpoint(tiny_spec, tmp_path) -> None:
    recorder = Recorder(stop_after=1)
    result = train(tiny_spec(optim={"max_steps": 5}), tmp_path, callbacks=recorder)
    assert result.status == "cancelled" and result.step == 1
    assert result.adapter_dir is None
    assert result.last_checkpoint is not None and read_state(result.last_checkpoint).step == 1
    assert recorder.events[-1] == "cancelled"


def test_final_adapter_loads_with_peft_and_matches_the_student(
    tiny_spec, tiny_model_dir, tmp_path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer = OPSDTrainer(tiny_spec(optim={"max_steps": 2}), tmp_path)
    result = trainer.train()
    assert (result.adapter_dir / "adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()
    batch = _probe_batch(trainer)
    with torch.no_grad():
        expected = trainer.policy.peft_model.eval()(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).logits
        got = loaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("divergence", ["jsd", "forward_kl", "reverse_kl", "sampled_token"])
def test_chunked_and_naive_losses_give_the_same_update(tiny_spec, tmp_path, divergence) -> None:
    adapters = {}
    for implementation in ("naive", "chunked"):
        spec = tiny_spec(
            divergence=divergence,
            optim={"max_steps": 1},
            loss={"implementation": implementation, "chunk_size": 5},
        )
        adapters[implementation] = _adapter(train(spec, tmp_path / implementation).adapter_dir)
    # Adam's first step is lr * g / (|g| + eps): for entries whose gradient is ~eps, fp32 rounding
    # differences in g show up amplified, so the tolerance is 0.1% of one step (lr 5e-3).
    for key, value in adapters["naive"].items():
        torch.testing.assert_close(adapters["chunked"][key], value, rtol=1e-5, atol=5e-6)


@pytest.mark.parametrize(
    "overrides",
    [
        {"teacher": "current"},
        {"generation": {"num_generations": 2}},
        {"loss": {"num_loss_tokens_to_skip": 2, "clip": 0.05}},
        {"divergence": "forward_kl", "loss": {"vocab_clip": 0.001, "implementation": "naive"}},
        {"runtime": {"gradient_checkpointing": True}},
        {"prompts": {"student_thinking": False, "teacher_thinking": False}},
    ],
)
def test_options_run_end_to_end(tiny_spec, tmp_path, overrides) -> None:
    recorder = Recorder()
    result = train(tiny_spec(optim={"max_steps": 2}, **overrides), tmp_path, callbacks=recorder)
    assert result.status == "succeeded"
    for _, metrics in recorder.metrics:
        assert all(v == v for v in metrics.values() if isinstance(v, float)), metrics  # no NaN
    loss = overrides.get("loss", {})
    assert isinstance(loss, dict)
    if "clip" in loss:
        assert "clip_frac" in recorder.metrics[0][1]
    if "vocab_clip" in loss:
        for _, metrics in recorder.metrics:
            # the tiny model's divergences are large enough for a 0.001 cap to bite somewhere
            assert 0.0 < metrics["vocab_clip_frac"] < 1.0
            assert metrics["vocab_clip_frac"] <= metrics["vocab_clip_token_frac"] <= 1.0


class StopOnceDropoutDrew(NullCallbacks):
    """Asks to stop at the first poll of step 2 that comes after LoRA dropout drew random
    numbers in that step (the torch RNG moved since step 1 ended): inside step 2, between its
    student micro-batches. Sampling (seeded per rollout) and the teacher (eval mode) draw none."""

    def __init__(self) -> None:
        self.metrics: list[int] = []
        self.events: list[str] = []
        self.mark: torch.Tensor | None = None
        self.stopped_inside_a_step = False

    def should_stop(self) -> bool:
        if self.mark is None or torch.equal(torch.get_rng_state(), self.mark):
            return False
        self.stopped_inside_a_step = True
        return True

    def on_metrics(self, step, metrics) -> None:
        self.metrics.append(step)
        self.mark = torch.get_rng_state().clone()

    def on_event(self, kind, message, data=None) -> None:
        self.events.append(kind)


def test_a_stop_inside_a_step_abandons_it_and_resumes_exactly(tiny_spec, tmp_path) -> None:
    """The abandoned step leaves no metrics and no update; the checkpoint is step 1's, with the
    RNG state of the end of step 1 (put back after the dropout draws of the abandoned step), so
    the resumed run equals an uninterrupted one."""
    spec = tiny_spec(optim={"max_steps": 3}, lora={"r": 4, "alpha": 8, "dropout": 0.1})
    straight = train(spec, tmp_path / "straight")

    stopper = StopOnceDropoutDrew()
    stopped = train(spec, tmp_path / "stopped", callbacks=stopper)
    assert stopper.stopped_inside_a_step
    assert stopped.status == "cancelled" and stopped.step == 1
    assert stopper.metrics == [1] and stopper.events[-1] == "cancelled"
    assert read_state(stopped.last_checkpoint).step == 1
    assert read_state(stopped.last_checkpoint).examples_consumed == 4

    resumed = train(spec, tmp_path / "stopped", resume=True)
    assert resumed.status == "succeeded" and resumed.step == 3
    a, b = _adapter(straight.adapter_dir), _adapter(resumed.adapter_dir)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_micro_batches_group_similar_lengths_in_grad_accum_groups() -> None:
    from opsd_engine.trainers.common import length_sorted_micro_batches

    lengths = [5, 40, 12, 40, 7, 30, 9]
    groups = length_sorted_micro_batches(lengths, 3)
    assert groups == [[1, 3, 5], [2, 6], [4, 0]]  # longest first; ties keep their order
    assert sorted(i for g in groups for i in g) == list(range(7))
    assert length_sorted_micro_batches([3, 1], 4) == [[0], [1]]  # never an empty micro-batch
    with pytest.raises(ValueError):
        length_sorted_micro_batches(lengths, 0)
