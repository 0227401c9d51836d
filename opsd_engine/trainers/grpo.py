"""The GRPO baseline (paper Section 2.2, Eq. 4-5) with LoRA, read top to bottom.

Per optimizer step:
1. take the step's problems from the seeded example stream (this rank's share);
2. sample a group of G = `generation.num_generations` completions per problem (token ids) from
   the problem-only prompt, the same student prompt OPSD and the evaluation use: all of the
   step's completions in one call, each from its own generator keyed by (seed, epoch, example,
   generation), so they do not depend on batching or on the number of processes;
3. reward each completion 1/0 with the evaluation's grader (`opsd_engine.grading.grade`, answer
   extracted from the decoded text) against the reference answer: the `answer` field, else the
   last ``\\boxed{}`` of the solution;
4. group-normalised advantages (Eq. 4): ``A_i = (r_i - mean(r)) / (std(r) + 1e-4)`` per group,
   ``std`` the sample standard deviation (Bessel-corrected, as TRL); `grpo.scale_rewards: false`
   keeps ``r_i - mean(r)`` (Dr. GRPO). A group whose rewards are all equal has every advantage
   exactly 0, hence no gradient: `zero_variance_group_frac` shows how much sampling was spent on
   such groups, the known weakness of the method;
5. normalisation over the whole optimizer step (all micro-batches and data-parallel ranks):
   `grpo.loss_normalization: sequence` (default, Eq. 5 as written) weights token n of completion
   i by ``1 / (|o_i| * N)`` with N the completions of the step, i.e. the mean over completions of
   each completion's token mean; `token` weights every token by ``1 / (total completion tokens
   of the step)`` (DAPO / Dr. GRPO), which does not favour short completions;
6. per micro-batch (completions of similar length together): old log-probabilities of the
   sampled tokens from the sampling policy (adapter on, eval mode, no grad; computed once per
   step, before the update), reference log-probs from the initial policy (adapter disabled) when
   `grpo.kl_beta > 0`, then the policy forward with grad and the clipped surrogate of Eq. 5 with
   ``rho = exp(logp - logp_old)``::

       per_token = -min(rho * A_i, clip(rho, 1 - eps, 1 + eps) * A_i) + kl_beta * k3
       k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1     (unbiased estimator of KL(pi||ref))

   With one optimizer step per batch ``rho`` is 1 in value (the gradient is the policy gradient
   ``A_i * grad log pi``); the clipped form matters when the policy already moved, e.g. LoRA
   dropout makes the training forward differ from the sampler;
7. clip, AdamW step, LR schedule; metrics, events and (atomic) checkpoints through callbacks;
   `spec.eval` benchmark evaluations as in the OPSD trainer.

Log-probabilities use the loss temperature (`loss.temperature`, default 1), not the sampling
temperature. Multiple optimizer iterations per sampled batch (GRPO's mu) are not supported.
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
from torch import Tensor
from transformers import get_scheduler

from opsd_engine import checkpoint as ckpt
from opsd_engine.config import JobSpec
from opsd_engine.data import DatasetError, Example, load_examples
from opsd_engine.events import NullCallbacks, TrainerCallbacks
from opsd_engine.grading import grade
from opsd_engine.modeling import PolicyModel, load_policy
from opsd_engine.prompts import (
    assemble_scoring_batch,
    encode_prompt,
    render_student_text,
    rollout_targets,
)
from opsd_engine.rollout import Rollout, RolloutFactory, SamplingParams, rollout_seed
from opsd_engine.trainers.common import (
    ExampleStream,
    HiddenStateScorer,
    SpecEvaluator,
    TokenLogprobs,
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
    token_logprobs_from_hidden,
    total_optimizer_steps,
)
from opsd_engine.trainers.common import grad_norm as _grad_norm

__all__ = ["GRPOLoss", "GRPOTrainer", "group_advantages", "grpo_loss", "train"]

ADVANTAGE_EPS = 1e-4


# ------------------------------------------------------------------------- the math (pure)
def group_advantages(rewards: Tensor, *, scale: bool = True, eps: float = ADVANTAGE_EPS) -> Tensor:
    """Eq. 4 for ``rewards`` of shape ``[groups, G]``: ``(r - mean) / (std + eps)`` per group.

    ``std`` is the sample (Bessel-corrected) standard deviation of the group, 0 for G = 1;
    ``scale=False`` returns ``r - mean``. A group of equal rewards gets exactly 0 everywhere.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [groups, G], got shape {tuple(rewards.shape)}")
    rewards = rewards.to(torch.float64)
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centered
    if rewards.shape[1] < 2:
        return torch.zeros_like(rewards)
    return centered / (rewards.std(dim=1, keepdim=True) + eps)


@dataclass
class GRPOLoss:
    """One micro-batch's GRPO loss (with grad) and detached statistics (sums over valid tokens)."""

    loss: Tensor
    clipped_tokens: Tensor
    kl_sum: Tensor
    ratio_sum: Tensor


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    epsilon: float,
    normalization: str,
    normalizer: float,
    ref_logprobs: Tensor | None = None,
    kl_beta: float = 0.0,
) -> GRPOLoss:
    """The clipped surrogate of Eq. 5 (as a loss to minimise) for completions ``[B, T]``.

    Args:
        logprobs: ``[B, T]`` log pi_theta of the sampled tokens (with grad).
        old_logprobs: ``[B, T]`` log pi_theta_old of the same tokens (the sampling policy).
        advantages: ``[B]`` one advantage per completion, shared by all its tokens.
        mask: ``[B, T]`` bool, true on real completion tokens.
        epsilon: clip range of the ratio.
        normalization: ``"sequence"``: token n of completion i weighs ``1 / (|o_i| * N)``;
            ``"token"``: every token weighs ``1 / N``.
        normalizer: N, for the whole optimizer step (all micro-batches and ranks): the number
            of completions (``sequence``) or of completion tokens (``token``).
        ref_logprobs: ``[B, T]`` log pi_ref (initial policy), needed when ``kl_beta > 0``.
        kl_beta: weight of the k3 KL estimate added to every token's loss.
    """
    if normalization not in ("sequence", "token"):
        raise ValueError(f"normalization must be 'sequence' or 'token', got {normalization!r}")
    if not normalizer > 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    if kl_beta > 0 and ref_logprobs is None:
        raise ValueError("kl_beta > 0 needs ref_logprobs")
    mask = mask.bool()
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    # Masked-out positions may hold anything: keep them out of exp() as well as out of the sum.
    log_ratio = torch.where(mask, logprobs - old_logprobs.detach(), zero)
    ratio = log_ratio.exp()
    adv = advantages.detach().to(logprobs.dtype).unsqueeze(1)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - epsilon, 1.0 + epsilon) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(per_token)
    if kl_beta > 0:
        assert ref_logprobs is not None
        delta = torch.where(mask, ref_logprobs.detach() - logprobs, zero)
        kl = delta.exp() - delta - 1.0
        per_token = per_token + kl_beta * kl
    if normalization == "sequence":
        lengths = mask.sum(dim=1, keepdim=True).clamp_min(1).to(logprobs.dtype)
        weights = mask / lengths / normalizer
    else:
        weights = mask / normalizer
    loss = (torch.where(mask, per_token, zero) * weights).sum()
    with torch.no_grad():
        return GRPOLoss(
            loss=loss,
            clipped_tokens=((clipped < unclipped) & mask).sum(),
            kl_sum=torch.where(mask, kl, zero).sum(),
            ratio_sum=torch.where(mask, ratio, zero).sum(),
        )


# ------------------------------------------------------------------------------ the trainer
@dataclass
class _Group:
    """One problem's G completions with their rewards and advantages."""

    prompt_ids: list[int]
    rollouts: list[Rollout]
    rewards: list[float]
    advantages: list[float]


class GRPOTrainer:
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
        from opsd_engine.evaluation import EvalDataError, reference_answers

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
                require_solution=False,  # the reward needs an answer, not a worked solution
                limit=spec.dataset.limit,
            )
        )
        try:  # the evaluation's rule: `answer`, else the last \boxed{} of the solution
            self.answers = reference_answers(self.examples)
        except EvalDataError as exc:
            raise DatasetError(spec.dataset_uri, str(exc), field=spec.dataset.answer_field) from exc
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
        self.rollouts = build_rollouts(
            spec, self.policy, self.accelerator, lambda: self.state.step, rollout_backend
        )
        self.stream = ExampleStream(len(self.examples), spec.seed)
        self.state = ckpt.TrainerState(
            total_steps=self.total_steps, spec_fingerprint=spec_fingerprint(spec)
        )
        self.evaluator = SpecEvaluator(spec, self.policy, self.accelerator, self.callbacks)
        self._prompt_cache: dict[int, list[int]] = {}

    # ----------------------------------------------------------------- resume / checkpoints
    def resume_from(self, checkpoint: Path) -> None:
        resume_run(self, checkpoint)

    def save_checkpoint(self) -> Path | None:
        return save_run_checkpoint(self)

    # ----------------------------------------------------------------------------- training
    def train(self) -> TrainResult:
        return run_steps(
            self,
            (
                f"GRPO training: {self.total_steps} steps on {len(self.examples)} examples, "
                f"{self.spec.generation.num_generations} completions per problem"
            ),
        )

    def _prompt(self, index: int) -> list[int]:
        if index not in self._prompt_cache:
            prompts = self.spec.prompts
            self._prompt_cache[index] = encode_prompt(
                self.tokenizer,
                render_student_text(self.examples[index].problem, prompts),
                prompts,
                thinking=prompts.student_thinking,
                system_prompt=self.examples[index].system_prompt,
            )
        return self._prompt_cache[index]

    def reward(self, rollout: Rollout, answer: str) -> float:
        """1.0 when the decoded completion's final answer equals ``answer``, else 0.0."""
        text = self.tokenizer.decode(rollout.token_ids, skip_special_tokens=True)
        return 1.0 if grade(text, answer).correct else 0.0

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
        size = spec.generation.num_generations

        # 1-2. G completions per problem for every problem of the step, in one call; each
        # completion draws from its own generator keyed by (seed, epoch, example, generation).
        t0 = time.perf_counter()
        share = step_share(self)
        prompts = [self._prompt(index) for _, index in share]
        seeds = [rollout_seed(spec.seed, epoch, index) for epoch, index in share]
        rollouts = sample_step_rollouts(self, self.rollouts, prompts, params, seeds)
        time_generation = time.perf_counter() - t0

        # 3-4. Rewards and group-normalised advantages.
        t0 = time.perf_counter()
        all_groups: list[_Group] = []
        for position, (_, index) in enumerate(share):
            members = [r for r in rollouts if r.prompt_index == position]
            assert len(members) == size
            rewards = [self.reward(r, self.answers[index]) for r in members]
            advantages = group_advantages(torch.tensor([rewards]), scale=spec.grpo.scale_rewards)[
                0
            ].tolist()
            all_groups.append(_Group(prompts[position], members, rewards, advantages))
        time_reward = time.perf_counter() - t0

        # 5. One normalizer for the whole step, across accumulation and ranks.
        lengths = [len(r.token_ids) for g in all_groups for r in g.rollouts]
        local = len(lengths) if spec.grpo.loss_normalization == "sequence" else sum(lengths)
        step_count = int(acc.reduce(torch.tensor(local, device=acc.device), reduction="sum").item())
        # DDP averages gradients over ranks; multiplying by world size turns that into a sum.
        normalizer = max(step_count, 1) / acc.num_processes

        # 6. Old/reference log-probs and the policy forward/backward per micro-batch.
        totals = torch.zeros(5, dtype=torch.float64)  # loss, clipped, kl, ratio, entropy
        time_scoring = time_policy = 0.0
        lr = float(self.scheduler.get_last_lr()[0])
        # Completions of similar length share a micro-batch (a group may span several: every
        # completion's loss is its own, divided by the step's one normaliser).
        rows = [(g, k) for g in all_groups for k in range(len(g.rollouts))]
        micro_batches = length_sorted_micro_batches(
            [len(g.prompt_ids) + len(g.rollouts[k].token_ids) for g, k in rows],
            spec.optim.grad_accum,
        )
        for position, batch in enumerate(micro_batches):
            stop_point(self)
            stats, t_scoring, t_policy = self._score_and_backward(
                [rows[i] for i in batch], normalizer, sync=position == len(micro_batches) - 1
            )
            totals += stats
            time_scoring += t_scoring
            time_policy += t_policy

        # 7. Optimizer step.
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

        rewards = [r for g in all_groups for r in g.rewards]
        group_stds = [float(torch.tensor(g.rewards).std()) if size > 1 else 0.0 for g in all_groups]
        zero_variance = [float(len(set(g.rewards)) == 1) for g in all_groups]
        finished = [float(r.finished) for g in all_groups for r in g.rollouts]
        local_sums = [
            *totals.tolist(),
            float(sum(rewards)),
            float(sum(group_stds)),
            float(sum(zero_variance)),
            float(len(all_groups)),
            float(len(rewards)),
            float(sum(lengths)),
            float(sum(finished)),
            float(sum(len(g.prompt_ids) + len(g.rollouts[k].token_ids) for g, k in rows)),
        ]
        reduced = acc.reduce(
            torch.tensor(local_sums, dtype=torch.float64, device=acc.device), reduction="sum"
        ).tolist()
        loss_sum, clipped, kl_sum, ratio_sum, entropy_sum = reduced[:5]
        reward_sum, std_sum, zero_sum, n_groups, n_completions = reduced[5:10]
        generated, finished_sum = int(reduced[10]), reduced[11]
        sequence_tokens = reduced[12]  # prompt + completion, over every completion of the step
        max_len = acc.reduce(
            torch.tensor(max(lengths, default=0), device=acc.device), reduction="max"
        ).item()
        self.state.step += 1
        self.state.examples_consumed += (
            spec.optim.batch_size * spec.optim.grad_accum * acc.num_processes
        )
        self.state.generated_tokens_total += generated
        self.state.loss_tokens_total += generated
        step_time = time.perf_counter() - step_start
        tokens = max(generated, 1)
        metrics = {
            "loss": loss_sum / acc.num_processes,
            "reward_mean": reward_sum / max(n_completions, 1),
            "reward_std": std_sum / max(n_groups, 1),
            "zero_variance_group_frac": zero_sum / max(n_groups, 1),
            "completion_len_mean": generated / max(n_completions, 1),
            "completion_len_max": float(max_len),
            "completion_finished_frac": finished_sum / max(n_completions, 1),
            "clip_frac": clipped / tokens,
            "ratio_mean": ratio_sum / tokens,
            "entropy": entropy_sum / tokens,
            "grad_norm": grad_norm,
            "lr": lr,
            "generated_tokens": float(generated),
            "generated_tokens_total": float(self.state.generated_tokens_total),
            "loss_tokens": float(generated),
            # usage: the policy scores every sequence twice (old log-probs, then with grad); the
            # reference (adapter off, the "teacher" role) once when kl_beta > 0
            "student_scored_tokens": 2.0 * sequence_tokens,
            "teacher_scored_tokens": sequence_tokens if spec.grpo.kl_beta > 0 else 0.0,
            "epoch": self.state.examples_consumed / len(self.examples),
            "time_generation_s": time_generation,
            "time_reward_s": time_reward,
            "time_scoring_s": time_scoring,
            "time_policy_s": time_policy,
            "time_optimizer_s": time_optimizer,
            "time_step_s": step_time,
            "tokens_per_s": generated / step_time if step_time > 0 else 0.0,
        }
        if spec.grpo.kl_beta > 0:
            metrics["kl"] = kl_sum / tokens
        return metrics

    def _score_and_backward(
        self, rows: list[tuple[_Group, int]], normalizer: float, *, sync: bool
    ) -> tuple[Tensor, float, float]:
        """Loss and backward of the completions ``rows`` (each: its group, its index there)."""
        spec, acc, policy = self.spec, self.accelerator, self.policy
        prompts = [g.prompt_ids for g, _ in rows]
        ids = [g.rollouts[k].token_ids for g, k in rows]
        advantages = torch.tensor(
            [g.advantages[k] for g, k in rows], dtype=torch.float32, device=acc.device
        )
        width = max(max((len(x) for x in ids), default=0), 1)
        targets, mask = rollout_targets(ids, width, pad_id=self.pad_id)
        targets, mask = targets.to(acc.device), mask.to(acc.device)
        batch = assemble_scoring_batch(prompts, ids, pad_id=self.pad_id, rollout_width=width)
        head = policy.output_embeddings

        def score(hidden: Tensor) -> TokenLogprobs:
            return token_logprobs_from_hidden(
                hidden,
                head.weight,
                getattr(head, "bias", None),
                targets,
                mask,
                temperature=spec.loss.temperature,
                chunk_size=spec.loss.chunk_size or 1024,
            )

        t0 = time.perf_counter()
        inputs = (batch.input_ids, batch.attention_mask, batch.position_ids)
        # The sampling policy: adapter on, eval mode (as `generate` ran), no grad.
        with policy.teacher_view("current"), acc.autocast():
            old = score(batch.at_rollout(policy.hidden_states(*inputs))).logprobs
        ref = None
        if spec.grpo.kl_beta > 0:  # the initial policy: adapter disabled
            with policy.teacher_view("initial"), acc.autocast():
                ref = score(batch.at_rollout(policy.hidden_states(*inputs))).logprobs
        t1 = time.perf_counter()

        context = acc.no_sync(self.scorer) if not sync else contextlib.nullcontext()
        with context:
            with acc.autocast():
                scored = score(batch.at_rollout(self.scorer(*inputs)))
                result = grpo_loss(
                    scored.logprobs,
                    old,
                    advantages,
                    mask,
                    epsilon=spec.grpo.epsilon,
                    normalization=spec.grpo.loss_normalization,
                    normalizer=normalizer,
                    ref_logprobs=ref,
                    kl_beta=spec.grpo.kl_beta,
                )
            acc.backward(result.loss)
        t2 = time.perf_counter()
        stats = torch.tensor(
            [
                float(result.loss.detach()),
                float(result.clipped_tokens),
                float(result.kl_sum),
                float(result.ratio_sum),
                float((scored.entropy * mask).sum()),
            ],
            dtype=torch.float64,
        )
        return stats, t1 - t0, t2 - t1


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
    """Run (or, with `resume`, continue from the latest complete checkpoint) a GRPO job."""
    trainer = GRPOTrainer(
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
