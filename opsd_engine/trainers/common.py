"""Pieces every trainer shares: the run result, the resumable example stream, step accounting.

Each trainer module (`opsd`, `sft`, `grpo`) is its own recipe, readable top to bottom; what lives
here is only what would otherwise be copied verbatim between them and must stay identical for
checkpoints and token accounting to mean the same thing across methods:

* :class:`TrainResult`, :class:`ExampleStream` (a fresh seeded permutation per epoch, resumable
  from a position), :func:`spec_fingerprint` and :func:`check_resumable` (a resume may extend
  a run or change its eval/checkpoint cadence, and names every other field that differs) and
  :func:`total_optimizer_steps`;
* :func:`make_accelerator`, :class:`HiddenStateScorer` (what `accelerator.prepare` wraps) and
  :func:`grad_norm`;
* :func:`token_logprobs_from_hidden`: log-probabilities of given tokens from final hidden states,
  a chunk of positions at a time (recomputed in backward), so memory never holds ``[T, V]``
  logits. SFT's cross-entropy and GRPO's policy ratio both need exactly this;
* :class:`SpecEvaluator`: the `spec.eval` benchmark evaluation during and after training
  (`eval/*` metrics at the current step, RNG state restored, so training is identical with and
  without evals);
* the run around a trainer's own `train_step`: :func:`resume_run` (allowed changes only),
  :func:`save_run_checkpoint` and :func:`run_steps` (cancellation between steps, evals,
  periodic and final checkpoints, the adapter). Plain functions over a :class:`SteppedTrainer`,
  so each trainer stays its own class with no base class to read;
* inside a step: :func:`step_share` (this rank's examples of the step, with their epochs, for
  per-example rollout seeds), :func:`sample_step_rollouts` (all of a step's rollouts in one call,
  cancellable), :func:`length_sorted_micro_batches` (rows of similar length together: less
  padding, same loss) and :func:`stop_point` (a cancellation check between micro-batches that
  every rank takes together: :func:`any_rank`).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from opsd_engine import checkpoint as ckpt
from opsd_engine.config import JobSpec, spec_to_dict
from opsd_engine.events import StepCancelled, TrainerCallbacks
from opsd_engine.guard import CollapseGuard
from opsd_engine.modeling import PolicyModel
from opsd_engine.rollout import (
    PolicyView,
    Rollout,
    RolloutBackend,
    RolloutFactory,
    SamplingParams,
    local_rollouts,
)

# Fields that do not change what training computes; a resume may differ in them. (Evaluations
# run on a saved and restored RNG state, so adding or changing `eval` leaves training as it is;
# `report_to` and `checkpoint` only say where metrics and checkpoints go; `preflight` runs before
# the first step only, on seeded sampling, and leaves the RNG state as it found it; `resources`
# only how many processes compute the same result: sampling is seeded per example, not rank.)
RESUME_NEUTRAL_FIELDS = (
    "metadata",
    "checkpoint_every",
    "eval",
    "report_to",
    "checkpoint",
    "resources",
    "recipe",  # a label: the values it resolved to are compared field by field
    "guard",
    "preflight",
)
# Fields a resume may change although they change what is computed from now on: the steps done
# stay valid (more steps or epochs extend the run, the LR schedule is recomputed for the new
# length), or they change how, not what, is computed (memory/speed knobs of the same math).
RESUME_EXTENDABLE_FIELDS = (
    "optim.max_steps",
    "optim.epochs",
    "runtime.gradient_checkpointing",
    "loss.implementation",
    "loss.chunk_size",
)

__all__ = [
    "RESUME_EXTENDABLE_FIELDS",
    "RESUME_NEUTRAL_FIELDS",
    "ExampleStream",
    "HiddenStateScorer",
    "SpecEvaluator",
    "SteppedTrainer",
    "TokenLogprobs",
    "TrainResult",
    "any_rank",
    "check_resumable",
    "collective_timeout",
    "grad_norm",
    "length_sorted_micro_batches",
    "make_accelerator",
    "resume_run",
    "run_steps",
    "sample_step_rollouts",
    "save_run_checkpoint",
    "spec_changes",
    "spec_fingerprint",
    "step_share",
    "stop_point",
    "token_logprobs_from_hidden",
    "total_optimizer_steps",
]

#: Seconds a collective may wait for the other ranks before it fails (``OPSD_COLLECTIVE_TIMEOUT_S``
#: overrides): a dead or hung rank then fails the whole group instead of hanging it.
DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0


@dataclass
class TrainResult:
    status: str  # "succeeded" | "cancelled"
    step: int
    total_steps: int
    adapter_dir: Path | None
    last_checkpoint: Path | None


class ExampleStream:
    """An endless, resumable stream of example indices: a fresh seeded permutation per epoch."""

    def __init__(self, size: int, seed: int) -> None:
        if size <= 0:
            raise ValueError("the dataset has no examples")
        self.size, self.seed = size, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=generator)
        return self._perm

    def take(self, start: int, count: int) -> list[int]:
        return [index for _, index in self.slots(start, count)]

    def slots(self, start: int, count: int) -> list[tuple[int, int]]:
        """``(epoch, example index)`` of stream positions ``start .. start + count - 1``."""
        out = []
        for position in range(start, start + count):
            epoch, offset = divmod(position, self.size)
            out.append((epoch, int(self._permutation(epoch)[offset])))
        return out


def spec_fingerprint(spec: JobSpec) -> str:
    data = spec_to_dict(spec)
    for name in RESUME_NEUTRAL_FIELDS:
        data.pop(name, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves of nested dicts by dotted path (an empty dict has none: `{}` -> `{"a": 1}` is the
    one change `a: None -> 1`)."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def spec_changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """`(dotted field, old value, new value)` for every leaf field that differs, sorted."""
    before, after = _flatten(old), _flatten(new)
    missing = object()
    return [
        (name, before.get(name), after.get(name))
        for name in sorted(before.keys() | after.keys())
        if before.get(name, missing) != after.get(name, missing)
    ]


def check_resumable(
    saved: ckpt.TrainerState, spec: JobSpec, total_steps: int
) -> list[tuple[str, Any, Any]]:
    """The spec changes since `saved` was written, when a resume may continue with them.

    Allowed: the fields of RESUME_NEUTRAL_FIELDS (and everything under them) and
    RESUME_EXTENDABLE_FIELDS, as long as the run does not end before the checkpoint's step.
    Raises :class:`ckpt.ResumeMismatchError` naming every other differing field (`field: old ->
    new`). A checkpoint of an older version holds no spec: it resumes only with the same
    fingerprint.
    """
    if not saved.spec:
        if saved.spec_fingerprint != spec_fingerprint(spec):
            raise ckpt.ResumeMismatchError(
                f"the checkpoint at step {saved.step} was written by a different spec "
                f"(fingerprint {saved.spec_fingerprint} != {spec_fingerprint(spec)}); it predates "
                "recording the spec, so the differing fields cannot be named: resume with the "
                "spec it was trained with"
            )
        return []
    changes = spec_changes(saved.spec, spec_to_dict(spec))
    # A field added by a later version is absent from an older checkpoint's spec: at its
    # default value it changes nothing that checkpoint computed.
    saved_fields = _flatten(saved.spec)
    minimal = {"base_model": spec.base_model, "dataset_uri": spec.dataset_uri}
    defaults = _flatten(spec_to_dict(JobSpec.model_validate({**minimal, "method": spec.method})))
    changes = [
        (name, old, new)
        for name, old, new in changes
        if name in saved_fields or name not in defaults or defaults[name] != new
    ]

    def allowed(name: str) -> bool:
        head = name.split(".", 1)[0]
        return head in RESUME_NEUTRAL_FIELDS or name in RESUME_EXTENDABLE_FIELDS

    refused = [f"{name}: {old!r} -> {new!r}" for name, old, new in changes if not allowed(name)]
    if refused:
        raise ckpt.ResumeMismatchError(
            f"the checkpoint at step {saved.step} was written with another spec; a resume may "
            "change only the run's length (optim.max_steps, optim.epochs), eval, checkpoint "
            "cadence and retention, report_to and metadata. Differing: " + "; ".join(refused)
        )
    if total_steps < saved.step:
        length = [f"{n}: {o!r} -> {v!r}" for n, o, v in changes if n.startswith("optim.")]
        raise ckpt.ResumeMismatchError(
            f"the spec ends after {total_steps} steps but the checkpoint is at step "
            f"{saved.step} ({'; '.join(length) or 'same length'}): a resume can only extend a run"
        )
    return changes


def total_optimizer_steps(spec: JobSpec, dataset_size: int, world_size: int) -> int:
    if spec.optim.max_steps is not None:
        return spec.optim.max_steps
    per_step = spec.optim.batch_size * spec.optim.grad_accum * world_size
    return max(1, math.ceil((spec.optim.epochs or 1.0) * dataset_size / per_step))


class HiddenStateScorer(torch.nn.Module):
    """What `accelerator.prepare` wraps (DDP/FSDP): the policy's forward to final hidden states."""

    def __init__(self, policy: PolicyModel) -> None:
        super().__init__()
        self.peft_model = policy.peft_model
        self._policy = [policy]  # a list, so nn.Module does not register it twice

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        return self._policy[0].hidden_states(input_ids, attention_mask, position_ids)


def grad_norm(parameters: list[torch.nn.Parameter]) -> torch.Tensor:
    grads = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.tensor(0.0)


def collective_timeout() -> datetime.timedelta:
    """How long a collective waits for the other ranks (``OPSD_COLLECTIVE_TIMEOUT_S``, seconds;
    default :data:`DEFAULT_COLLECTIVE_TIMEOUT_S`). ValueError for a non-positive value."""
    seconds = float(os.environ.get("OPSD_COLLECTIVE_TIMEOUT_S", DEFAULT_COLLECTIVE_TIMEOUT_S))
    if not seconds > 0:
        raise ValueError(f"OPSD_COLLECTIVE_TIMEOUT_S must be > 0, got {seconds}")
    return datetime.timedelta(seconds=seconds)


def make_accelerator(spec: JobSpec) -> Accelerator:
    """The run's Accelerator. Under ``torchrun`` / ``accelerate launch`` it joins the launched
    process group (gloo on the CPU, NCCL on GPUs) with :func:`collective_timeout` on every
    collective; alone it is a single process."""
    from accelerate.utils import InitProcessGroupKwargs

    from opsd_engine.modeling import resolve_device, resolve_dtype

    device = resolve_device(spec.runtime.device)
    dtype = resolve_dtype(spec.runtime.dtype, device)
    mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    return Accelerator(
        cpu=device.type == "cpu",
        mixed_precision=mixed if device.type == "cuda" else "no",
        kwargs_handlers=[InitProcessGroupKwargs(timeout=collective_timeout())],
    )


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any rank (a max all-reduce; no collective in
    a single process). Every rank must call it at the same point."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def stop_point(trainer: SteppedTrainer) -> None:
    """Between micro-batches: raise :class:`StepCancelled` on every rank when any rank's
    callbacks ask to stop."""
    if any_rank(trainer.accelerator, trainer.callbacks.should_stop()):
        raise StepCancelled("stop requested between micro-batches")


def step_share(trainer: SteppedTrainer) -> list[tuple[int, int]]:
    """``(epoch, example index)`` of this rank's examples for the next optimizer step.

    The step takes ``batch_size x grad_accum x num_processes`` positions of the example stream;
    rank r gets every ``num_processes``-th from position r. The epoch travels with each example
    so that rollout seeds (:func:`opsd_engine.rollout.rollout_seed`) depend on the example, not
    on the rank or the micro-batch that handles it.
    """
    optim, acc = trainer.spec.optim, trainer.accelerator
    global_batch = optim.batch_size * optim.grad_accum * acc.num_processes
    slots = trainer.stream.slots(trainer.state.examples_consumed, global_batch)
    return slots[acc.process_index :: acc.num_processes]


def sample_step_rollouts(
    trainer: SteppedTrainer,
    backend: RolloutBackend,
    prompts: list[list[int]],
    params: SamplingParams,
    seeds: Sequence[int],
) -> list[Rollout]:
    """All of this rank's rollouts of a step in one backend call (the backend splits it only
    when memory requires). ``should_stop`` is polled while sampling; a stop on any rank raises
    :class:`StepCancelled` on every rank once all have finished sampling."""
    try:
        rollouts = backend.generate(
            prompts, params, seeds=seeds, should_stop=trainer.callbacks.should_stop
        )
        stopped = False
    except StepCancelled:
        rollouts, stopped = [], True
    if any_rank(trainer.accelerator, stopped):
        raise StepCancelled("stop requested while sampling")
    return rollouts


def length_sorted_micro_batches(lengths: Sequence[int], count: int) -> list[list[int]]:
    """Row indices split into ``count`` micro-batches of consecutive lengths (longest first).

    Rows of one micro-batch share one padded width, so grouping similar lengths removes most
    padding. Sizes differ by at most one (the first ones are larger), so no micro-batch holds
    more rows than before; the number of micro-batches is ``count`` on every rank. The loss is
    a sum over rows divided by the step's one normaliser, so the grouping does not change it
    (beyond float rounding). The sort is stable: equal lengths keep their order.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    size, extra = divmod(len(order), count)
    batches, start = [], 0
    for position in range(count):
        end = start + size + (1 if position < extra else 0)
        batches.append(order[start:end])
        start = end
    return [batch for batch in batches if batch]


# ------------------------------------------------------------------ log-probs of given tokens
@dataclass
class TokenLogprobs:
    """Per-position results of :func:`token_logprobs_from_hidden`, each ``[B, T]`` float32.

    Masked-out positions hold 0. Only ``logprobs`` carries a gradient (to the hidden states).
    """

    logprobs: Tensor
    entropy: Tensor  # detached: entropy of the full next-token distribution
    argmax_hit: Tensor  # detached: 1.0 where the most likely token is the target


def _chunk_logprobs(
    rows: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor, temperature: float
) -> tuple[Tensor, Tensor, Tensor]:
    logits = F.linear(rows.float(), weight.float(), None if bias is None else bias.float())
    if temperature != 1.0:
        logits = logits / temperature
    log_p = F.log_softmax(logits, dim=-1)
    picked = log_p.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(log_p.exp() * log_p).sum(-1)
        hit = (log_p.argmax(-1) == ids).float()
    return picked, entropy, hit


def token_logprobs_from_hidden(
    hidden: Tensor,
    output_weight: Tensor,
    output_bias: Tensor | None,
    target_ids: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> TokenLogprobs:
    """``log softmax(hidden @ W.T + b)[target]`` at the masked-in positions, chunk by chunk.

    Args:
        hidden: ``[B, T, H]`` final hidden states; position ``t`` predicts ``target_ids[:, t]``.
        output_weight: ``[V, H]`` output projection; frozen (detached), as LoRA never trains it.
        output_bias: ``[V]`` or ``None``.
        target_ids: ``[B, T]`` token ids whose log-probabilities are wanted.
        mask: ``[B, T]`` bool; only these positions are computed (others give 0).
        temperature: logits are divided by it before the softmax (1 = the model's distribution).
        chunk_size: positions per chunk. Each chunk's ``[chunk, V]`` logits are recomputed in the
            backward pass instead of being stored, so peak memory is one chunk's logits.
    """
    if hidden.shape[:-1] != mask.shape or target_ids.shape != mask.shape:
        raise ValueError(
            f"hidden {tuple(hidden.shape)}, target_ids {tuple(target_ids.shape)} and mask "
            f"{tuple(mask.shape)} do not line up"
        )
    size = hidden.shape[-1]
    index = mask.reshape(-1).bool().nonzero().squeeze(1)
    rows = hidden.reshape(-1, size).index_select(0, index)
    ids = target_ids.reshape(-1).to(hidden.device).index_select(0, index).long()
    weight = output_weight.detach()
    bias = output_bias.detach() if output_bias is not None else None
    parts: list[tuple[Tensor, Tensor, Tensor]] = []
    for start in range(0, rows.shape[0], chunk_size):
        args = (rows[start : start + chunk_size], weight, bias, ids[start : start + chunk_size])
        if rows.requires_grad:
            parts.append(checkpoint(_chunk_logprobs, *args, temperature, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(*args, temperature))
    empty = rows.new_zeros(0, dtype=torch.float32)
    flat = [torch.cat(p) for p in zip(*parts, strict=True)] if parts else [empty] * 3
    out = []
    for values in flat:
        full = torch.zeros(mask.numel(), dtype=torch.float32, device=hidden.device)
        out.append(full.index_put((index,), values).reshape(mask.shape))
    return TokenLogprobs(logprobs=out[0], entropy=out[1].detach(), argmax_hit=out[2].detach())


# ---------------------------------------------------------------------- evaluation (spec.eval)
class SpecEvaluator:
    """Runs `spec.eval` for a trainer: the base at step 0 (`include_base`), every `every_steps`
    optimizer steps and at the end (`at_end`), reporting `eval/avg@n`, `eval/pass@k`,
    `eval/majority` through `callbacks.on_metrics` at the current step. Does nothing when
    `spec.eval.dataset_uri` is unset. Sampling is seeded with `spec.seed` and the RNG state is
    restored afterwards, so evaluating never changes what training samples."""

    def __init__(
        self,
        spec: JobSpec,
        policy: PolicyModel,
        accelerator: Accelerator,
        callbacks: TrainerCallbacks,
    ) -> None:
        self.spec, self.policy, self.accelerator, self.callbacks = (
            spec,
            policy,
            accelerator,
            callbacks,
        )
        self._examples: list[Any] | None = None
        self.last_evaluated: int | None = None  # step of the adapter's latest evaluation

    def at_start(self, step: int) -> None:
        if self.spec.eval.include_base and step == 0:
            self.evaluate(step, adapter=False)  # the base model: the start of the eval curve

    def after_step(self, step: int, total_steps: int) -> dict[str, float] | None:
        """The adapter's scores when this step is evaluated (main process), else None."""
        every, at_end = self.spec.eval.every_steps, self.spec.eval.at_end
        if every and step % every == 0 and not (at_end and step == total_steps):
            return self.evaluate(step)  # the final step's eval comes from `at_end` when set
        return None

    def at_end(self, step: int) -> dict[str, float] | None:
        """The final evaluation (`at_end`), unless this step was just evaluated."""
        if self.spec.eval.at_end and self.last_evaluated != step:
            return self.evaluate(step)
        return None

    def evaluate(self, step: int, *, adapter: bool = True) -> dict[str, float] | None:
        """Evaluate and report; returns the scores on the main process (None elsewhere or when
        the spec has no eval dataset)."""
        cfg = self.spec.eval
        if not cfg.dataset_uri:
            return None
        if adapter:
            self.last_evaluated = step
        scores = None
        if self.accelerator.is_main_process:
            from opsd_engine.data import load_examples
            from opsd_engine.evaluation import EvalSettings, evaluate_model, summary_metrics

            if self._examples is None:
                self._examples = load_examples(
                    cfg.dataset_uri,
                    problem_field=cfg.problem_field,
                    answer_field=cfg.answer_field,
                    require_solution=False,
                    limit=cfg.limit,
                )
            settings = EvalSettings(
                n=cfg.n,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                top_k=cfg.top_k,
                thinking=cfg.thinking,
            )
            model = self.policy.peft_model
            report = self._progress_reporter(step, adapter)
            began = time.perf_counter()
            rng = ckpt.capture_rng_state()
            try:
                torch.manual_seed(self.spec.seed)
                with contextlib.nullcontext() if adapter else model.disable_adapter():
                    result = evaluate_model(
                        model,
                        self.policy.tokenizer,
                        self._examples,
                        settings,
                        prompts=self.spec.prompts,
                        device=self.accelerator.device,
                        on_progress=report,
                    )
            finally:
                ckpt.restore_rng_state(rng)
            scores = summary_metrics(result.summary)
            # usage of the evaluation: tokens of its samples, device time (this process)
            usage = {
                "eval_tokens": float(sum(sample.num_tokens for sample in result.samples)),
                "time_eval_device_s": time.perf_counter() - began,
            }
            self.callbacks.on_metrics(step, {**scores, **usage})
            self._report_finished(step, adapter, scores)
        self.accelerator.wait_for_everyone()
        return scores

    def _progress_reporter(self, step: int, adapter: bool) -> Any:
        """`eval_started`, then throttled `eval_progress` events (problems done/total, samples
        per second): what the job is doing while an eval runs."""
        from opsd_engine.evaluation import EvalProgress, throttled

        role = "adapter" if adapter else "base"
        who = "the student" if adapter else "the base model"
        total, n = len(self._examples or []), self.spec.eval.n
        self.callbacks.on_event(
            "eval_started",
            f"evaluating {who} at step {step}: {total} problems x {n} samples",
            {"step": step, "role": role, "done": 0, "total": total},
        )

        def report(progress: EvalProgress) -> None:
            if progress.done == 0:
                return  # eval_started said so
            self.callbacks.on_event(
                "eval_progress",
                f"evaluating {who} at step {step}: {progress.done}/{progress.total} problems, "
                f"{progress.samples_per_s:.1f} samples/s",
                {"step": step, "role": role, **progress.to_dict()},
            )

        return throttled(report)

    def _report_finished(self, step: int, adapter: bool, scores: dict[str, float]) -> None:
        avg = next((v for k, v in scores.items() if k.startswith("eval/avg@")), None)
        who = "the student" if adapter else "the base model"
        self.callbacks.on_event(
            "eval_finished",
            f"evaluated {who} at step {step}" + (f": avg {avg:.3f}" if avg is not None else ""),
            {"step": step, "role": "adapter" if adapter else "base", "scores": scores},
        )


# ---------------------------------------------------------------------------- the run loop
class SteppedTrainer(Protocol):
    """What the run loop needs of a trainer; `train_step` advances `state.step` by one."""

    spec: JobSpec
    policy: PolicyModel
    optimizer: Any
    scheduler: Any
    accelerator: Accelerator
    callbacks: TrainerCallbacks
    evaluator: SpecEvaluator
    state: ckpt.TrainerState
    stream: ExampleStream
    total_steps: int
    checkpoint_dir: Path
    output_dir: Path
    examples: list[Any]  # the dataset's examples (`spec.preflight.run_first` samples them)

    def train_step(self) -> dict[str, float]: ...


def resume_run(trainer: SteppedTrainer, checkpoint: Path) -> None:
    """Load `checkpoint` into the trainer; :class:`ckpt.ResumeMismatchError` (a ValueError)
    naming the fields when the spec changed in a way a resume cannot take (`check_resumable`).
    An allowed change is recorded as a `spec_changed` event; a new length recomputes the LR of
    the next step on the new schedule."""
    saved = ckpt.read_state(checkpoint)
    changes = check_resumable(saved, trainer.spec, trainer.total_steps)
    trainer.state = ckpt.load_checkpoint(
        checkpoint,
        peft_model=trainer.policy.peft_model,
        optimizer=trainer.optimizer,
        scheduler=trainer.scheduler,
    )
    trainer.state.total_steps = trainer.total_steps
    trainer.state.spec_fingerprint = spec_fingerprint(trainer.spec)
    if changes:
        scheduler = trainer.scheduler  # a LambdaLR: its lambdas are the new length's schedule
        for group, base_lr, rule in zip(
            trainer.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
        ):
            group["lr"] = base_lr * rule(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in trainer.optimizer.param_groups]
        described = ", ".join(f"{name} {old!r} -> {new!r}" for name, old, new in changes)
        trainer.callbacks.on_event(
            "spec_changed",
            f"resuming step {saved.step} with a changed spec: {described}",
            {
                "step": saved.step,
                "changes": [{"field": n, "old": o, "new": v} for n, o, v in changes],
            },
        )
    acc = trainer.accelerator
    ranks = ckpt.read_rank_rng_states(checkpoint)
    if ranks is not None and len(ranks) == acc.num_processes:
        # Each rank continues its own stream (LoRA dropout draws differ between ranks). With
        # another number of processes every rank keeps rank 0's: rollouts do not depend on it
        # (seeded per example), dropout masks do.
        ckpt.restore_rng_state(ranks[acc.process_index])
    trainer.callbacks.on_event(
        "resumed", f"resumed from {checkpoint.name}", {"step": trainer.state.step}
    )


def save_run_checkpoint(trainer: SteppedTrainer) -> Path | None:
    """An atomic checkpoint of the current step (written by the main process only; with several
    processes it holds every rank's RNG state)."""
    path = None
    trainer.state.spec = spec_to_dict(trainer.spec)  # lets a resume name what changed
    rank_rng_states = None
    if trainer.accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        rank_rng_states = gather_object([ckpt.capture_rng_state()])
    if trainer.accelerator.is_main_process:
        path = ckpt.save_checkpoint(
            trainer.checkpoint_dir,
            peft_model=trainer.policy.peft_model,
            optimizer=trainer.optimizer,
            scheduler=trainer.scheduler,
            state=trainer.state,
            rank_rng_states=rank_rng_states,
        )
        trainer.callbacks.on_checkpoint(trainer.state.step, path)
        if (keep := trainer.spec.checkpoint.keep_last) is not None:
            for old in ckpt.retired_checkpoints(
                trainer.checkpoint_dir, keep_last=keep, final_step=trainer.total_steps
            ):
                removed = getattr(trainer.callbacks, "on_checkpoint_removed", None)
                if removed is not None:  # the record goes first, then the files
                    removed(ckpt.read_state(old).step, old)
                ckpt.remove_checkpoint(old)
    trainer.accelerator.wait_for_everyone()
    return path


def run_steps(trainer: SteppedTrainer, started: str) -> TrainResult:
    """Train from the current step to the end, or until the callbacks ask to stop; a checkpoint
    of the last complete step is kept. `started` is the message of the `started` event.

    The stop is checked between steps and, inside a step, while sampling and between
    micro-batches (:class:`StepCancelled`): such a step is abandoned whole (no optimizer update,
    no metrics, gradients dropped, RNG state put back as it was before the step), so the
    checkpoint written on the way out resumes exactly as an uninterrupted run. All ranks decide
    together (:func:`any_rank`)."""
    spec, callbacks = trainer.spec, trainer.callbacks
    callbacks.on_event(
        "started",
        started,
        {
            "spec": spec_to_dict(spec),
            "total_steps": trainer.total_steps,
            "start_step": trainer.state.step,
            "processes": trainer.accelerator.num_processes,
        },
    )
    if spec.preflight.run_first and trainer.state.step == 0:
        from opsd_engine.preflight import run_before_training

        rng = ckpt.capture_rng_state()  # (seeded sampling; restored anyway: training unchanged)
        run_before_training(spec, trainer.policy, trainer.examples, callbacks)
        ckpt.restore_rng_state(rng)
    last_checkpoint = ckpt.latest_checkpoint(trainer.checkpoint_dir)
    guard = CollapseGuard(spec, callbacks, trainer.state.extra.setdefault("guard", {}))
    trainer.evaluator.at_start(trainer.state.step)
    while trainer.state.step < trainer.total_steps:
        if any_rank(trainer.accelerator, guard.stop_reason is not None):
            break  # early stop (patience or an alarm), also when resumed after deciding it
        cancelled = any_rank(trainer.accelerator, callbacks.should_stop())
        if not cancelled:
            rng = ckpt.capture_rng_state()
            try:
                metrics = trainer.train_step()
            except StepCancelled:
                trainer.optimizer.zero_grad(set_to_none=True)
                ckpt.restore_rng_state(rng)
                cancelled = True
        if cancelled:
            last_checkpoint = save_run_checkpoint(trainer) or last_checkpoint
            step = trainer.state.step
            callbacks.on_event("cancelled", f"stopped after step {step}", {"step": step})
            return TrainResult("cancelled", step, trainer.total_steps, None, last_checkpoint)
        step = trainer.state.step
        if "time_device_s" not in metrics and "time_step_s" in metrics:
            # usage: device time of the step over all processes
            metrics["time_device_s"] = metrics["time_step_s"] * trainer.accelerator.num_processes
        callbacks.on_metrics(step, metrics)
        guard.observe_step(step, metrics)
        _observe_eval(trainer, guard, step, trainer.evaluator.after_step(step, trainer.total_steps))
        every = spec.checkpoint_every
        if every and step % every == 0 and step < trainer.total_steps:
            last_checkpoint = save_run_checkpoint(trainer) or last_checkpoint
    step = trainer.state.step
    if any_rank(trainer.accelerator, guard.stop_reason is not None) and step < trainer.total_steps:
        callbacks.on_event(
            "early_stopped",
            f"stopped early after step {step} of {trainer.total_steps}: {guard.stop_reason}",
            {"step": step, "reason": guard.stop_reason, "best_step": guard.best_step},
        )
    _observe_eval(trainer, guard, step, trainer.evaluator.at_end(step))
    last_checkpoint = save_run_checkpoint(trainer) or last_checkpoint
    adapter_dir, adapter_step = None, step
    if trainer.accelerator.is_main_process:
        adapter_dir, adapter_step = _final_adapter(trainer, guard)
    callbacks.on_event(
        "finished",
        f"finished {step} steps"
        + (f"; the adapter is step {adapter_step}'s (best eval)" if adapter_step != step else ""),
        {
            "adapter_dir": str(adapter_dir) if adapter_dir else None,
            "adapter_step": adapter_step,
            "select": spec.eval.select,
        },
    )
    return TrainResult("succeeded", step, trainer.total_steps, adapter_dir, last_checkpoint)


BEST_ADAPTER_DIR = "best_adapter"


def _observe_eval(
    trainer: SteppedTrainer, guard: CollapseGuard, step: int, scores: dict[str, float] | None
) -> None:
    """Rank an evaluation of the adapter; with `eval.select: best` keep a new best's adapter."""
    if scores is None or not guard.observe_eval(step, scores):
        return
    spec = trainer.spec
    if spec.eval.select == "best" and trainer.accelerator.is_main_process:
        ckpt.save_adapter(trainer.policy.peft_model, trainer.output_dir / BEST_ADAPTER_DIR)
        trainer.callbacks.on_event(
            "best_checkpoint",
            f"new best {spec.eval.select_metric} {guard.best_score:.4g} at step {step}",
            {"step": step, "metric": spec.eval.select_metric, "value": guard.best_score},
        )


def _final_adapter(trainer: SteppedTrainer, guard: CollapseGuard) -> tuple[Path, int]:
    """Write the job's adapter to `output_dir/adapter` and say which step it is from: the last
    step's, or with `eval.select: best` the best evaluation's (the last one is then kept in
    `output_dir/adapter_last`). The best adapter saved at its evaluation is used, else the one
    in that step's checkpoint (a run resumed elsewhere); failing both, the last, with a warning."""
    step, out = trainer.state.step, trainer.output_dir
    best = guard.best_step
    if trainer.spec.eval.select != "best" or best is None or best == step:
        return ckpt.save_adapter(trainer.policy.peft_model, out / "adapter"), step
    source = out / BEST_ADAPTER_DIR
    if not source.is_dir():
        source = trainer.checkpoint_dir / ckpt.step_dir_name(best) / ckpt.ADAPTER_DIR
    if not source.is_dir():
        trainer.callbacks.on_event(
            "warning",
            f"the best evaluation's adapter (step {best}) is no longer available; the job's "
            f"adapter is the last step's ({step})",
            {"best_step": best},
        )
        return ckpt.save_adapter(trainer.policy.peft_model, out / "adapter"), step
    ckpt.save_adapter(trainer.policy.peft_model, out / "adapter_last")
    staging = out / f".tmp-adapter-{uuid.uuid4().hex[:8]}"
    shutil.copytree(source, staging)
    target = out / "adapter"
    if target.exists():
        shutil.rmtree(target)
    os.rename(staging, target)
    return target, best


def build_rollouts(
    spec: JobSpec,
    policy: PolicyModel,
    accelerator: Accelerator,
    current_step: Callable[[], int],
    factory: RolloutFactory | None,
) -> RolloutBackend:
    """A sampling trainer's rollout backend over its policy (``factory``; default in process)."""
    return (factory or local_rollouts)(
        PolicyView(
            model=policy.peft_model,
            current_step=current_step,
            pad_id=int(policy.tokenizer.pad_token_id),
            stop_ids=policy.stop_token_ids,
            device=accelerator.device,
            # every prompt of the step in one call; the backend splits only for memory
            batch_size=max(spec.optim.batch_size * spec.optim.grad_accum, 1),
            process_index=accelerator.process_index,
            num_processes=accelerator.num_processes,
            barrier=accelerator.wait_for_everyone,
        )
    )
