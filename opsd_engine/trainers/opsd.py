"""The OPSD trainer: paper Algorithm 1 with LoRA, read top to bottom.

Per optimizer step:
1. take the step's problems from the seeded example stream (this rank's share);
2. the student samples all of the step's rollouts (token ids) from the problem-only prompt in
   one backend call; each rollout draws from its own generator keyed by (seed, epoch, example,
   generation), so the rollouts do not depend on batching or on the number of processes;
3. count the loss tokens of the whole step, summed over data-parallel ranks: every micro-batch's
   loss is divided by that one number, so gradient accumulation and DDP give exactly the mean
   over all valid tokens of the step;
4. per micro-batch (rollouts of similar length grouped together, `grad_accum` of them): teacher
   hidden states at the rollout positions (problem + reference solution + transition prompt +
   rollout) under no_grad with the adapter disabled (`teacher: initial`; one teacher view for
   all micro-batches of the step); then student hidden states with grad; the per-token
   divergence at the rollout positions; backward;
5. clip, AdamW step, LR schedule; metrics, events and (atomic) checkpoints through callbacks.

A stop asked for while sampling or between micro-batches abandons the step (no update).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import get_scheduler

from opsd_engine import checkpoint as ckpt
from opsd_engine.chunked_loss import rollout_loss_from_hidden
from opsd_engine.config import JobSpec
from opsd_engine.data import Example, load_examples
from opsd_engine.events import NullCallbacks, TrainerCallbacks
from opsd_engine.losses import RolloutLoss, rollout_loss_from_logits
from opsd_engine.modeling import PolicyModel, load_policy
from opsd_engine.prompts import (
    PromptPair,
    assemble_scoring_batch,
    build_prompt_pair,
    rollout_targets,
)
from opsd_engine.rollout import Rollout, RolloutFactory, SamplingParams, rollout_seed
from opsd_engine.trainers.common import (
    ExampleStream,
    HiddenStateScorer,
    SpecEvaluator,
    TrainResult,
    build_rollouts,
    length_sorted_micro_batches,
    make_accelerator,
    resume_run,
    run_steps,
    sample_step_rollouts,
    save_run_checkpoint,
    spec_fingerprint,
    step_share,
    stop_point,
    total_optimizer_steps,
)
from opsd_engine.trainers.common import grad_norm as _grad_norm

__all__ = ["ExampleStream", "OPSDTrainer", "TrainResult", "train"]


class OPSDTrainer:
    """Holds the model, optimizer and data for one run; `train()` runs it to the end or a stop."""

    def __init__(
        self,
        spec: JobSpec,
        output_dir: str | Path,
        *,
        callbacks: TrainerCallbacks | None = None,
        examples: Sequence[Example] | None = None,
        accelerator: Accelerator | None = None,
        rollout_backend: RolloutFactory | None = None,
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
        scheduler = get_scheduler(
            optim.lr_schedule if optim.lr_schedule != "constant" else "constant_with_warmup",
            optimizer,
            num_warmup_steps=math.ceil(optim.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )
        # The scheduler is not handed to accelerate: it would step it once per process, while
        # total_steps above already counts optimizer steps of the whole data-parallel group.
        self.scheduler = scheduler
        self.scorer, self.optimizer = self.accelerator.prepare(
            HiddenStateScorer(self.policy), optimizer
        )
        self.rollouts = build_rollouts(
            spec, self.policy, self.accelerator, lambda: self.state.step, rollout_backend
        )
        self.stream = ExampleStream(len(self.examples), spec.seed)
        self.state = ckpt.TrainerState(
            total_steps=self.total_steps, spec_fingerprint=spec_fingerprint(spec)
        )
        self._prompt_cache: dict[int, PromptPair] = {}
        self.evaluator = SpecEvaluator(spec, self.policy, self.accelerator, self.callbacks)

    # ----------------------------------------------------------------- resume / checkpoints
    def resume_from(self, checkpoint: Path) -> None:
        resume_run(self, checkpoint)

    def save_checkpoint(self) -> Path | None:
        return save_run_checkpoint(self)

    # ----------------------------------------------------------------------------- training
    def train(self) -> TrainResult:
        started = f"OPSD training: {self.total_steps} steps on {len(self.examples)} examples"
        return run_steps(self, started)

    def _prompt_pair(self, index: int) -> PromptPair:
        if index not in self._prompt_cache:
            example = self.examples[index]
            assert example.solution is not None
            self._prompt_cache[index] = build_prompt_pair(
                self.tokenizer,
                problem=example.problem,
                solution=example.solution,
                answer=example.answer,
                prompts=self.spec.prompts,
                system_prompt=example.system_prompt,
            )
        return self._prompt_cache[index]

    def train_step(self) -> dict[str, float]:
        spec, acc = self.spec, self.accelerator
        step_start = time.perf_counter()
        params = SamplingParams(
            max_new_tokens=spec.max_new_tokens,
            temperature=spec.generation.temperature,
            top_p=spec.generation.top_p,
            top_k=spec.generation.top_k,
            num_generations=spec.generation.num_generations,
        )

        # 1-2. Student rollouts for every problem of the step, in one call.
        t0 = time.perf_counter()
        share = step_share(self)
        pairs = [self._prompt_pair(index) for _, index in share]
        seeds = [rollout_seed(spec.seed, epoch, index) for epoch, index in share]
        rollouts = sample_step_rollouts(
            self, self.rollouts, [p.student_ids for p in pairs], params, seeds
        )
        rows = [(pairs[r.prompt_index], r) for r in rollouts]
        time_generation = time.perf_counter() - t0

        # 3. One normalizer for the whole step, across accumulation and ranks.
        skip = spec.loss.num_loss_tokens_to_skip
        local_tokens = sum(max(len(r.token_ids) - skip, 0) for _, r in rows)
        step_tokens = int(
            acc.reduce(torch.tensor(local_tokens, device=acc.device), reduction="sum").item()
        )
        # DDP averages gradients over ranks; multiplying by world size turns that into a sum.
        normalizer = max(step_tokens, 1) / acc.num_processes

        # 4. Teacher scoring, student forward/backward per micro-batch of similar lengths.
        totals = {
            "loss": 0.0,
            "div": 0.0,
            "h_s": 0.0,
            "h_t": 0.0,
            "clipped": 0.0,
            "vocab_entries": 0.0,
            "vocab_tokens": 0.0,
        }
        time_student = 0.0
        lr = float(self.scheduler.get_last_lr()[0])
        micro_batches = length_sorted_micro_batches(
            [len(p.teacher_ids) + len(r.token_ids) for p, r in rows], spec.optim.grad_accum
        )
        batches = [([rows[i][0] for i in g], [rows[i][1] for i in g]) for g in micro_batches]
        # The teacher's hidden states at the rollout positions of every micro-batch, under one
        # teacher view (the adapter is switched off and on once per step, not per micro-batch).
        t0 = time.perf_counter()
        teacher_hidden = []
        with self.policy.teacher_view(spec.teacher):
            for pairs_, rollouts_ in batches:
                stop_point(self)
                teacher_hidden.append(self._teacher_hidden(pairs_, rollouts_))
        time_teacher = time.perf_counter() - t0
        for position, (pairs_, rollouts_) in enumerate(batches):
            stop_point(self)
            is_last = position == len(batches) - 1
            result, _, t_student = self._score_and_backward(
                pairs_, rollouts_, normalizer, sync=is_last, teacher_hidden=teacher_hidden[position]
            )
            teacher_hidden[position] = None  # freed as soon as used
            time_student += t_student
            totals["loss"] += float(result.loss.detach())
            totals["div"] += float(result.divergence_sum)
            totals["h_s"] += float(result.student_entropy_sum)
            totals["h_t"] += float(result.teacher_entropy_sum)
            totals["clipped"] += float(result.clipped_tokens)
            totals["vocab_entries"] += float(result.vocab_clipped_entries)
            totals["vocab_tokens"] += float(result.vocab_clipped_tokens)

        # 5. Optimizer step.
        t0 = time.perf_counter()
        grad_norm = float("nan")
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

        lengths = [len(r.token_ids) for r in rollouts]
        reduced = acc.reduce(
            torch.tensor(
                [
                    totals["div"],
                    totals["h_s"],
                    totals["h_t"],
                    totals["clipped"],
                    totals["loss"],
                    float(sum(lengths)),
                    float(len(lengths)),
                    float(sum(r.finished for r in rollouts)),
                    totals["vocab_entries"],
                    totals["vocab_tokens"],
                    float(sum(len(p.teacher_ids) + len(r.token_ids) for p, r in rows)),
                    float(sum(len(p.student_ids) + len(r.token_ids) for p, r in rows)),
                ],
                dtype=torch.float64,
                device=acc.device,
            ),
            reduction="sum",
        ).tolist()
        generated, count, finished = int(reduced[5]), max(reduced[6], 1.0), reduced[7]
        longest = acc.reduce(
            torch.tensor(max(lengths, default=0), device=acc.device), reduction="max"
        ).item()
        self.state.step += 1
        self.state.examples_consumed += (
            spec.optim.batch_size * spec.optim.grad_accum * acc.num_processes
        )
        self.state.generated_tokens_total += generated
        self.state.loss_tokens_total += step_tokens
        step_time = time.perf_counter() - step_start
        denominator = max(step_tokens, 1)
        metrics = {
            "loss": reduced[4] / acc.num_processes,
            "divergence": reduced[0] / denominator,
            "student_entropy": reduced[1] / denominator,
            "teacher_entropy": reduced[2] / denominator,
            "grad_norm": grad_norm,
            "lr": lr,
            "rollout_len_mean": generated / count,
            "rollout_len_max": float(longest),
            "rollout_finished_frac": finished / count,
            "generated_tokens": float(generated),
            "generated_tokens_total": float(self.state.generated_tokens_total),
            "loss_tokens": float(step_tokens),
            "epoch": self.state.examples_consumed / len(self.examples),
            "time_generation_s": time_generation,
            "time_teacher_s": time_teacher,
            "time_student_s": time_student,
            "time_optimizer_s": time_optimizer,
            "time_step_s": step_time,
            "tokens_per_s": generated / step_time if step_time > 0 else 0.0,
            # usage: tokens through the teacher's and the student's scoring forward passes
            # (prompt + rollout, no padding), and device time (all processes)
            "teacher_scored_tokens": reduced[10],
            "student_scored_tokens": reduced[11],
            "time_device_s": step_time * acc.num_processes,
        }
        if spec.loss.clip is not None:
            metrics["clip_frac"] = reduced[3] / denominator
        if spec.loss.vocab_clip is not None:
            # Share of the (loss token, vocabulary entry) terms the per-vocabulary clip capped,
            # and share of loss tokens with at least one capped term.
            vocab = int(self.policy.output_embeddings.weight.shape[0])
            metrics["vocab_clip_frac"] = reduced[8] / (denominator * vocab)
            metrics["vocab_clip_token_frac"] = reduced[9] / denominator
        return metrics

    def _teacher_hidden(self, pairs: list[PromptPair], rollouts: list[Rollout]) -> torch.Tensor:
        """The teacher's final hidden states ``[B, R, H]`` that predict the rollout tokens (call
        inside ``policy.teacher_view``)."""
        ids = [r.token_ids for r in rollouts]
        width = max(max((len(x) for x in ids), default=0), 1)
        batch = assemble_scoring_batch(
            [p.teacher_ids for p in pairs], ids, pad_id=self.pad_id, rollout_width=width
        )
        with self.accelerator.autocast():
            hidden = self.policy.hidden_states(
                batch.input_ids, batch.attention_mask, batch.position_ids
            )
            return batch.at_rollout(hidden)

    def _score_and_backward(
        self,
        pairs: list[PromptPair],
        rollouts: list[Rollout],
        normalizer: float,
        *,
        sync: bool,
        teacher_hidden: torch.Tensor | None = None,
    ) -> tuple[RolloutLoss, float, float]:
        """One micro-batch: its loss (over ``normalizer``) and backward; the teacher pass too
        unless ``teacher_hidden`` is given. Returns the loss and the teacher/student seconds."""
        spec, acc = self.spec, self.accelerator
        ids = [r.token_ids for r in rollouts]
        width = max(max((len(x) for x in ids), default=0), 1)
        targets, mask = rollout_targets(
            ids, width, pad_id=self.pad_id, skip_first=spec.loss.num_loss_tokens_to_skip
        )
        targets, mask = targets.to(acc.device), mask.to(acc.device)
        student_batch = assemble_scoring_batch(
            [p.student_ids for p in pairs], ids, pad_id=self.pad_id, rollout_width=width
        )

        t0 = time.perf_counter()
        if teacher_hidden is None:
            with self.policy.teacher_view(spec.teacher):
                teacher_hidden = self._teacher_hidden(pairs, rollouts)
        t1 = time.perf_counter()

        context = acc.no_sync(self.scorer) if not sync else contextlib.nullcontext()
        with context:
            with acc.autocast():
                student_hidden = student_batch.at_rollout(
                    self.scorer(
                        student_batch.input_ids,
                        student_batch.attention_mask,
                        student_batch.position_ids,
                    )
                )
                result = self._loss(student_hidden, teacher_hidden, targets, mask, normalizer)
            acc.backward(result.loss)
        t2 = time.perf_counter()
        return result, t1 - t0, t2 - t1

    def _loss(
        self,
        student_hidden: torch.Tensor,
        teacher_hidden: torch.Tensor,
        targets: torch.Tensor,
        mask: torch.Tensor,
        normalizer: float,
    ) -> RolloutLoss:
        spec = self.spec
        head = self.policy.output_embeddings
        common: dict[str, Any] = {
            "loss": spec.divergence,
            "beta": spec.beta,
            "temperature": spec.loss.temperature,
            "clip": spec.loss.clip,
            "vocab_clip": spec.loss.vocab_clip,
            "normalizer": normalizer,
        }
        if spec.loss.implementation == "chunked":
            return rollout_loss_from_hidden(
                student_hidden,
                teacher_hidden,
                head.weight,
                getattr(head, "bias", None),
                targets,
                mask,
                chunk_size=spec.loss.chunk_size,
                **common,
            )
        student_logits = head(student_hidden)
        with torch.no_grad():
            teacher_logits = head(teacher_hidden)
        return rollout_loss_from_logits(student_logits, teacher_logits, targets, mask, **common)


def train(
    spec: JobSpec,
    output_dir: str | Path,
    *,
    callbacks: TrainerCallbacks | None = None,
    resume: bool = False,
    examples: Sequence[Example] | None = None,
    rollout_backend: RolloutFactory | None = None,
    accelerator: Accelerator | None = None,
) -> TrainResult:
    """Run (or, with `resume`, continue from the latest complete checkpoint) an OPSD job."""
    trainer = OPSDTrainer(
        spec,
        output_dir,
        callbacks=callbacks,
        examples=examples,
        accelerator=accelerator,
        rollout_backend=rollout_backend,
    )
    if resume and (latest := ckpt.latest_checkpoint(trainer.checkpoint_dir)) is not None:
        trainer.resume_from(latest)
    return trainer.train()
