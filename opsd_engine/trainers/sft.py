"""The SFT baseline: supervised fine-tuning on (student prompt, reference solution), top to bottom.

SFT is the off-policy counterpart of OPSD (paper Section 3.1, Table 4): the model imitates the
reference solutions of the dataset instead of learning on its own rollouts. Same job spec, same
LoRA, optimizer, LR schedule, checkpoints, callbacks and step accounting as the OPSD trainer.

Per optimizer step:
1. take the step's problems from the seeded example stream (this rank's share);
2. build each training sequence from token ids: the student prompt (exactly the prompt OPSD's
   student and the evaluation see, chat template included) + the tokenized reference solution +
   EOS. Prompt tokens are masked out: only solution tokens (and the EOS) carry loss;
3. count the solution tokens of the whole step, summed over data-parallel ranks: every
   micro-batch's summed negative log-likelihood is divided by that one number, so gradient
   accumulation and DDP give exactly the mean over all target tokens of the step;
4. per micro-batch (sequences of similar length together, `grad_accum` of them): forward with
   grad to final hidden states, log-probabilities of the solution tokens a chunk of positions at
   a time (never a full ``[T, V]`` logits tensor), backward; a stop asked for between
   micro-batches abandons the step;
5. clip, AdamW step, LR schedule; metrics, events and (atomic) checkpoints through callbacks;
   `spec.eval` benchmark evaluations as in the OPSD trainer.

SFT samples nothing, so ``generated_tokens`` is 0 at every step (the token axis on which the
methods are compared counts sampled tokens); ``train_tokens`` reports what it learns from.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import get_scheduler

from opsd_engine import checkpoint as ckpt
from opsd_engine.config import JobSpec
from opsd_engine.data import Example, load_examples
from opsd_engine.events import NullCallbacks, TrainerCallbacks
from opsd_engine.modeling import PolicyModel, load_policy
from opsd_engine.prompts import (
    ScoringBatch,
    assemble_scoring_batch,
    encode_prompt,
    render_student_text,
    rollout_targets,
)
from opsd_engine.trainers.common import (
    ExampleStream,
    HiddenStateScorer,
    SpecEvaluator,
    TrainResult,
    length_sorted_micro_batches,
    make_accelerator,
    resume_run,
    run_steps,
    save_run_checkpoint,
    spec_fingerprint,
    step_share,
    stop_point,
    token_logprobs_from_hidden,
    total_optimizer_steps,
)
from opsd_engine.trainers.common import grad_norm as _grad_norm

__all__ = ["SFTBatch", "SFTTrainer", "sft_batch", "train"]


@dataclass
class SFTBatch:
    """Prompt + target sequences of one micro-batch, laid out for one forward pass.

    ``layout`` is the engine's scoring layout (`[left pad][prompt][target]`), so
    ``layout.at_rollout(hidden)`` holds the hidden states that predict ``target_ids``; ``mask`` is
    True exactly on real target tokens. Prompt tokens are never targets.
    """

    layout: ScoringBatch
    target_ids: torch.Tensor  # [B, W] right-padded target ids
    mask: torch.Tensor  # [B, W] bool

    def labels(self, ignore_index: int = -100) -> torch.Tensor:
        """The same supervision as full-length labels ``[B, L]`` (``ignore_index`` elsewhere),
        in the convention of transformers' causal-LM loss (which shifts them by one)."""
        labels = torch.full_like(self.layout.input_ids, ignore_index)
        columns = self.layout.rollout_columns + 1  # the target's own column
        values = torch.where(self.mask.cpu(), self.target_ids.cpu(), ignore_index)
        rows = torch.arange(labels.shape[0]).unsqueeze(1).expand_as(columns)
        keep = self.mask.cpu()
        labels[rows[keep], columns[keep]] = values[keep]
        return labels


def sft_batch(prompts: list[list[int]], targets: list[list[int]], *, pad_id: int) -> SFTBatch:
    """Lay out ``prompt + target`` rows; the loss mask covers the target tokens only."""
    layout = assemble_scoring_batch(prompts, targets, pad_id=pad_id)
    target_ids, mask = rollout_targets(targets, layout.rollout_width, pad_id=pad_id)
    return SFTBatch(layout=layout, target_ids=target_ids, mask=mask)


class SFTTrainer:
    """Holds the model, optimizer and data for one run; `train()` runs it to the end or a stop."""

    def __init__(
        self,
        spec: JobSpec,
        output_dir: str | Path,
        *,
        callbacks: TrainerCallbacks | None = None,
        examples: Sequence[Example] | None = None,
        accelerator: Accelerator | None = None,
    ) -> None:
        self.spec = spec
        self.output_dir = Path(output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.callbacks = callbacks or NullCallbacks()
        self.accelerator = accelerator or make_accelerator(spec)
        set_seed(spec.seed)
        self.examples = (
            list(examples)
            if examples is not None
            else load_examples(
                spec.dataset_uri,
                problem_field=spec.dataset.problem_field,
                solution_field=spec.dataset.solution_field,
                answer_field=spec.dataset.answer_field,
                require_solution=True,
                limit=spec.dataset.limit,
            )
        )
        self.policy: PolicyModel = load_policy(spec, device=self.accelerator.device)
        self.tokenizer = self.policy.tokenizer
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.eos_id = self.policy.stop_token_ids[0]
        optim = spec.optim
        optimizer = torch.optim.AdamW(
            self.policy.trainable_parameters(),
            lr=optim.learning_rate,
            betas=(optim.adam_beta1, optim.adam_beta2),
            eps=optim.adam_epsilon,
            weight_decay=optim.weight_decay,
        )
        world = self.accelerator.num_processes
        self.total_steps = total_optimizer_steps(spec, len(self.examples), world)
        # Not handed to accelerate, which would step it once per process (see the OPSD trainer).
        self.scheduler = get_scheduler(
            optim.lr_schedule if optim.lr_schedule != "constant" else "constant_with_warmup",
            optimizer,
            num_warmup_steps=math.ceil(optim.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )
        self.scorer, self.optimizer = self.accelerator.prepare(
            HiddenStateScorer(self.policy), optimizer
        )
        self.stream = ExampleStream(len(self.examples), spec.seed)
        self.state = ckpt.TrainerState(
            total_steps=self.total_steps, spec_fingerprint=spec_fingerprint(spec)
        )
        self.evaluator = SpecEvaluator(spec, self.policy, self.accelerator, self.callbacks)
        self._sequence_cache: dict[int, tuple[list[int], list[int]]] = {}

    # ----------------------------------------------------------------- resume / checkpoints
    def resume_from(self, checkpoint: Path) -> None:
        resume_run(self, checkpoint)

    def save_checkpoint(self) -> Path | None:
        return save_run_checkpoint(self)

    # ----------------------------------------------------------------------------- training
    def train(self) -> TrainResult:
        started = f"SFT training: {self.total_steps} steps on {len(self.examples)} examples"
        return run_steps(self, started)

    def sequence(self, index: int) -> tuple[list[int], list[int]]:
        """``(prompt_ids, target_ids)`` of example ``index``: student prompt; solution + EOS."""
        if index not in self._sequence_cache:
            example = self.examples[index]
            assert example.solution is not None
            prompts = self.spec.prompts
            prompt = encode_prompt(
                self.tokenizer,
                render_student_text(example.problem, prompts),
                prompts,
                thinking=prompts.student_thinking,
                system_prompt=example.system_prompt,
            )
            solution = self.tokenizer(example.solution, add_special_tokens=False)["input_ids"]
            self._sequence_cache[index] = (prompt, [*solution, self.eos_id])
        return self._sequence_cache[index]

    def train_step(self) -> dict[str, float]:
        spec, acc = self.spec, self.accelerator
        step_start = time.perf_counter()
        sequences = [self.sequence(index) for _, index in step_share(self)]
        micro_batches = [
            [sequences[i] for i in group]
            for group in length_sorted_micro_batches(
                [len(p) + len(t) for p, t in sequences], spec.optim.grad_accum
            )
        ]

        # 3. One normalizer for the whole step, across accumulation and ranks.
        local_tokens = sum(len(target) for _, target in sequences)
        step_tokens = int(
            acc.reduce(torch.tensor(local_tokens, device=acc.device), reduction="sum").item()
        )
        # DDP averages gradients over ranks; multiplying by world size turns that into a sum.
        normalizer = max(step_tokens, 1) / acc.num_processes

        # 4. Forward/backward per micro-batch.
        t0 = time.perf_counter()
        totals = torch.zeros(3, dtype=torch.float64)  # nll sum, argmax hits, loss
        lr = float(self.scheduler.get_last_lr()[0])
        for position, batch in enumerate(micro_batches):
            stop_point(self)
            nll, hits, loss = self._forward_backward(
                batch, normalizer, sync=position == len(micro_batches) - 1
            )
            totals += torch.tensor([nll, hits, loss], dtype=torch.float64)
        time_forward_backward = time.perf_counter() - t0

        # 5. Optimizer step.
        t0 = time.perf_counter()
        if spec.optim.max_grad_norm is not None:
            grad_norm = float(
                acc.clip_grad_norm_(self.policy.trainable_parameters(), spec.optim.max_grad_norm)
            )
        else:
            grad_norm = float(_grad_norm(self.policy.trainable_parameters()))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        time_optimizer = time.perf_counter() - t0

        lengths = [len(p) + len(t) for p, t in sequences]
        totals = torch.cat(
            [totals, torch.tensor([sum(lengths), len(lengths)], dtype=torch.float64)]
        )
        reduced = acc.reduce(totals.to(acc.device), reduction="sum").tolist()
        longest = acc.reduce(
            torch.tensor(max(lengths, default=0), device=acc.device), reduction="max"
        ).item()
        self.state.step += 1
        self.state.examples_consumed += (
            spec.optim.batch_size * spec.optim.grad_accum * acc.num_processes
        )
        self.state.loss_tokens_total += step_tokens
        step_time = time.perf_counter() - step_start
        denominator = max(step_tokens, 1)
        return {
            "loss": reduced[2] / acc.num_processes,
            "nll": reduced[0] / denominator,
            "token_accuracy": reduced[1] / denominator,
            "grad_norm": grad_norm,
            "lr": lr,
            "seq_len_mean": reduced[3] / max(reduced[4], 1.0),
            "seq_len_max": float(longest),
            "train_tokens": float(step_tokens),
            "train_tokens_total": float(self.state.loss_tokens_total),
            # usage: every prompt + reference sequence goes through the policy once
            "student_scored_tokens": reduced[3],
            "teacher_scored_tokens": 0.0,
            "loss_tokens": float(step_tokens),
            "generated_tokens": 0.0,
            "generated_tokens_total": float(self.state.generated_tokens_total),
            "epoch": self.state.examples_consumed / len(self.examples),
            "time_forward_backward_s": time_forward_backward,
            "time_optimizer_s": time_optimizer,
            "time_step_s": step_time,
            "tokens_per_s": step_tokens / step_time if step_time > 0 else 0.0,
        }

    def _forward_backward(
        self, batch: list[tuple[list[int], list[int]]], normalizer: float, *, sync: bool
    ) -> tuple[float, float, float]:
        """Summed NLL and argmax hits over the batch's target tokens; backward of NLL/normalizer."""
        acc = self.accelerator
        sft = sft_batch([p for p, _ in batch], [t for _, t in batch], pad_id=self.pad_id)
        layout = sft.layout
        target_ids, mask = sft.target_ids.to(acc.device), sft.mask.to(acc.device)
        context = acc.no_sync(self.scorer) if not sync else contextlib.nullcontext()
        with context:
            with acc.autocast():
                hidden = layout.at_rollout(
                    self.scorer(layout.input_ids, layout.attention_mask, layout.position_ids)
                )
                head = self.policy.output_embeddings
                scored = token_logprobs_from_hidden(
                    hidden,
                    head.weight,
                    getattr(head, "bias", None),
                    target_ids,
                    mask,
                    temperature=self.spec.loss.temperature,
                    chunk_size=self.spec.loss.chunk_size or 1024,
                )
                nll_sum = -(scored.logprobs * mask).sum()
                loss = nll_sum / normalizer
            acc.backward(loss)
        hits = float((scored.argmax_hit * mask).sum())
        return float(nll_sum.detach()), hits, float(loss.detach())


def train(
    spec: JobSpec,
    output_dir: str | Path,
    *,
    callbacks: TrainerCallbacks | None = None,
    resume: bool = False,
    examples: Sequence[Example] | None = None,
    accelerator: Accelerator | None = None,
) -> TrainResult:
    """Run (or, with `resume`, continue from the latest complete checkpoint) an SFT job."""
    trainer = SFTTrainer(
        spec, output_dir, callbacks=callbacks, examples=examples, accelerator=accelerator
    )
    if resume and (latest := ckpt.latest_checkpoint(trainer.checkpoint_dir)) is not None:
        trainer.resume_from(latest)
    return trainer.train()
