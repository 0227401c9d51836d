"""Student and teacher prompts (paper Figure 2) and token-level sequence assembly.

The student sees only the problem; the teacher sees the problem, the reference solution and the
transition instruction. Prompts are rendered with the tokenizer's chat template when it has one
(the generation prompt included, special tokens kept) and encoded once. A rollout only ever
exists as token ids: teacher and student sequences are `prompt_ids + rollout_ids`, never a
decode/re-encode of the sampled text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from opsd_engine.config import PromptConfig


@dataclass(frozen=True)
class PromptPair:
    """Token ids of both roles' prompts for one problem."""

    student_ids: list[int]
    teacher_ids: list[int]


def render_student_text(problem: str, prompts: PromptConfig) -> str:
    return prompts.student_template.format(problem=problem)


def render_teacher_text(
    problem: str, solution: str, answer: str | None, prompts: PromptConfig
) -> str:
    return prompts.teacher_template.format(problem=problem, solution=solution, answer=answer or "")


def uses_chat_template(tokenizer: Any, prompts: PromptConfig) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompts.chat_template == "on" and not has_template:
        raise ValueError("prompts.chat_template is 'on' but the tokenizer has no chat template")
    return prompts.chat_template == "on" or (prompts.chat_template == "auto" and has_template)


def encode_prompt(
    tokenizer: Any, user_text: str, prompts: PromptConfig, *, thinking: bool | None
) -> list[int]:
    """Encode one prompt, through the chat template (with generation prompt) when enabled."""
    if not uses_chat_template(tokenizer, prompts):
        return list(tokenizer(user_text, add_special_tokens=True)["input_ids"])
    messages = []
    if prompts.system_prompt:
        messages.append({"role": "system", "content": prompts.system_prompt})
    messages.append({"role": "user", "content": user_text})
    kwargs: dict[str, Any] = {}
    if thinking is not None:
        kwargs["enable_thinking"] = thinking
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **kwargs
    )
    # The rendered template already carries its special tokens as text; adding BOS again would
    # double it for tokenizers that define one.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_prompt_pair(
    tokenizer: Any, *, problem: str, solution: str, answer: str | None, prompts: PromptConfig
) -> PromptPair:
    student = encode_prompt(
        tokenizer, render_student_text(problem, prompts), prompts, thinking=prompts.student_thinking
    )
    teacher = encode_prompt(
        tokenizer,
        render_teacher_text(problem, solution, answer, prompts),
        prompts,
        thinking=prompts.teacher_thinking,
    )
    return PromptPair(student_ids=student, teacher_ids=teacher)


@dataclass
class ScoringBatch:
    """Prompts + continuations (rollouts, or SFT targets) laid out for one forward pass.

    Layout per row: `[left pad][prompt][continuation]`: every row ends at the last column, so
    the batch is as wide as its longest prompt + continuation (not the longest prompt plus the
    longest continuation) and never holds padding after a real token. Attention mask and
    position ids follow the real tokens. The output (hidden state or logits) that predicts
    continuation token j of row b is at column ``rollout_columns[b, j]`` (the column before that
    token); :meth:`at_rollout` gathers them into ``[B, rollout_width, ...]``, aligned with
    :func:`rollout_targets`. Columns past a row's continuation repeat its last column and must be
    masked out (the rollout mask does).
    """

    input_ids: torch.Tensor  # [B, L], L = max over rows of len(prompt) + len(continuation)
    attention_mask: torch.Tensor  # [B, L] 1 for real tokens
    position_ids: torch.Tensor  # [B, L] 0.. along real tokens, computed after left padding
    rollout_width: int  # R: the widest continuation (at least 1)
    rollout_columns: torch.Tensor  # [B, R] long

    def at_rollout(self, outputs: torch.Tensor) -> torch.Tensor:
        """``outputs[b, rollout_columns[b, j]]`` as ``[B, R, ...]`` from ``outputs`` ``[B, L, ...]``
        (differentiable: gradients flow back to the gathered positions)."""
        columns = self.rollout_columns.to(outputs.device)
        index = columns.reshape(*columns.shape, *([1] * (outputs.dim() - 2)))
        return torch.take_along_dim(outputs, index, dim=1)


def assemble_scoring_batch(
    prompts: list[list[int]],
    rollouts: list[list[int]],
    *,
    pad_id: int,
    rollout_width: int | None = None,
) -> ScoringBatch:
    """Join each prompt with its rollout ids into one left-padded batch (see `ScoringBatch`).

    ``rollout_width`` widens the gathered rollout axis beyond the longest rollout. Raises
    ``ValueError`` on a count mismatch, an empty prompt (the first rollout token needs a
    preceding position) or a rollout wider than ``rollout_width``.
    """
    if len(prompts) != len(rollouts):
        raise ValueError(f"{len(prompts)} prompts but {len(rollouts)} rollouts")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: the first rollout token needs a preceding position")
    longest = max((len(r) for r in rollouts), default=0)
    width = max(rollout_width if rollout_width is not None else longest, 1)
    if longest > width:
        row = next(i for i, r in enumerate(rollouts) if len(r) > width)
        raise ValueError(f"rollout {row} has {len(rollouts[row])} tokens, wider than {width}")
    length = max(len(p) + len(r) for p, r in zip(prompts, rollouts, strict=True))
    batch = len(prompts)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, length), dtype=torch.long)
    columns = torch.empty((batch, width), dtype=torch.long)
    steps = torch.arange(width)
    for row, (prompt, rollout) in enumerate(zip(prompts, rollouts, strict=True)):
        sequence = prompt + rollout
        input_ids[row, length - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
        attention[row, length - len(sequence) :] = 1
        first = length - len(rollout) - 1  # the output predicting the first rollout token
        columns[row] = (first + steps).clamp(max=length - 1)
    position_ids = (attention.cumsum(dim=1) - 1).clamp(min=0)
    return ScoringBatch(input_ids, attention, position_ids, width, columns)


def rollout_targets(
    rollouts: list[list[int]], width: int, *, pad_id: int, skip_first: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rollout ids `[B, width]` (right padded) and the loss mask over them.

    The mask is True on real rollout tokens (the EOS that ended a rollout included: the teacher
    scores the decision to stop too), False on padding and on the first `skip_first` tokens.
    """
    ids = torch.full((len(rollouts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rollouts), width), dtype=torch.bool)
    for row, rollout in enumerate(rollouts):
        if rollout:
            ids[row, : len(rollout)] = torch.tensor(rollout, dtype=torch.long)
            mask[row, skip_first : len(rollout)] = True
    return ids, mask
