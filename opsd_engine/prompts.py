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
    """Prompts + rollouts laid out for one forward pass.

    Layout per row: `[left pad][prompt][rollout][right pad]`, with every prompt ending at column
    `prompt_width` so that rollout token j sits at column `prompt_width + j` in every row. The
    logits that predict rollout token j are at column `prompt_width + j - 1`, i.e. the slice
    `[prompt_width - 1, prompt_width - 1 + rollout_width)` — see `rollout_slice`.
    Right padding only follows real tokens, so causal attention of real tokens never sees it.
    """

    input_ids: torch.Tensor  # [B, prompt_width + rollout_width]
    attention_mask: torch.Tensor  # [B, L] 1 for real tokens
    position_ids: torch.Tensor  # [B, L] 0.. along real tokens, computed after left padding
    prompt_width: int
    rollout_width: int

    @property
    def rollout_slice(self) -> slice:
        return slice(self.prompt_width - 1, self.prompt_width - 1 + self.rollout_width)


def assemble_scoring_batch(
    prompts: list[list[int]],
    rollouts: list[list[int]],
    *,
    pad_id: int,
    rollout_width: int | None = None,
) -> ScoringBatch:
    """Join each prompt with its rollout ids into one left/right padded batch."""
    if len(prompts) != len(rollouts):
        raise ValueError(f"{len(prompts)} prompts but {len(rollouts)} rollouts")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: the first rollout token needs a preceding position")
    prompt_width = max(len(p) for p in prompts)
    width = (
        rollout_width if rollout_width is not None else max((len(r) for r in rollouts), default=0)
    )
    width = max(width, 1)
    batch, length = len(prompts), prompt_width + width
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, length), dtype=torch.long)
    for row, (prompt, rollout) in enumerate(zip(prompts, rollouts, strict=True)):
        if len(rollout) > width:
            raise ValueError(f"rollout {row} has {len(rollout)} tokens, wider than {width}")
        start = prompt_width - len(prompt)
        input_ids[row, start:prompt_width] = torch.tensor(prompt, dtype=torch.long)
        attention[row, start:prompt_width] = 1
        if rollout:
            input_ids[row, prompt_width : prompt_width + len(rollout)] = torch.tensor(
                rollout, dtype=torch.long
            )
            attention[row, prompt_width : prompt_width + len(rollout)] = 1
    position_ids = (attention.cumsum(dim=1) - 1).clamp(min=0)
    return ScoringBatch(input_ids, attention, position_ids, prompt_width, width)


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
