"""Student and teacher prompts (paper Figure 2) and token-level sequence assembly.

The student sees only the problem; the teacher sees the problem, the reference solution and the
transition instruction. Prompts are rendered with the tokenizer's chat template when it has one
(the generation prompt included, special tokens kept) and encoded once. The chat template's
structure is read from the template itself: the token that ends an assistant turn
(:func:`end_of_turn_token_id`, part of the engine's stop set) and the generation-prompt header
after which both roles' prompts must be in the same state (:func:`compare_generation_prompts`,
e.g. Qwen3's thinking switch). A rollout only ever
exists as token ids: teacher and student sequences are `prompt_ids + rollout_ids`, never a
decode/re-encode of the sampled text.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    tokenizer: Any,
    user_text: str,
    prompts: PromptConfig,
    *,
    thinking: bool | None,
    system_prompt: str | None = None,
) -> list[int]:
    """Encode one prompt, through the chat template (with generation prompt) when enabled.

    The system message is ``prompts.system_prompt``, else ``system_prompt`` (the row's own, from
    a chat-message dataset), else none. Without a chat template both are ignored.
    """
    if not uses_chat_template(tokenizer, prompts):
        return list(tokenizer(user_text, add_special_tokens=True)["input_ids"])
    messages = []
    system = prompts.system_prompt or system_prompt
    if system:
        messages.append({"role": "system", "content": system})
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
    tokenizer: Any,
    *,
    problem: str,
    solution: str,
    answer: str | None,
    prompts: PromptConfig,
    system_prompt: str | None = None,
) -> PromptPair:
    """Both roles' prompt ids; ``system_prompt`` is the row's own (see :func:`encode_prompt`).

    The teacher's thinking switch is ``prompts.teacher_thinking``, which follows the student's
    unless the spec opted into a mismatch (:class:`~opsd_engine.config.PromptConfig`), so both
    prompts end in the same generation-prompt state (:func:`compare_generation_prompts`).
    """
    student = encode_prompt(
        tokenizer,
        render_student_text(problem, prompts),
        prompts,
        thinking=prompts.student_thinking,
        system_prompt=system_prompt,
    )
    teacher = encode_prompt(
        tokenizer,
        render_teacher_text(problem, solution, answer, prompts),
        prompts,
        thinking=prompts.teacher_thinking,
        system_prompt=system_prompt,
    )
    return PromptPair(student_ids=student, teacher_ids=teacher)


# ---------------------------------------------------------------------- chat template structure
_PROBE = "OPSD-PROBE-7f3a"


def _special_ids(tokenizer: Any) -> set[int]:
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return ids


def end_of_turn_token_id(tokenizer: Any) -> int | None:
    """The special token the chat template closes an assistant turn with, or ``None``.

    Found by rendering a user turn and an assistant turn whose content is a probe string: the
    first special token after the probe (``<|im_end|>`` for ChatML/Qwen, ``<|eot_id|>`` for
    Llama 3, ``<end_of_turn>`` for Gemma). ``None`` without a chat template, or when the turn
    ends without a special token.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "1"}, {"role": "assistant", "content": _PROBE}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    if _PROBE not in text:
        return None
    after = text[text.rindex(_PROBE) + len(_PROBE) :]
    special = _special_ids(tokenizer)
    for token_id in tokenizer(after, add_special_tokens=False)["input_ids"]:
        if int(token_id) in special:
            return int(token_id)
    return None


def generation_prompt_header_ids(tokenizer: Any) -> list[int]:
    """Token ids the chat template adds for a generation prompt with no template arguments
    (Qwen3: ``<|im_start|>assistant\n``): the header after which both roles' prompts must be in
    the same state. Empty without a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    messages = [{"role": "user", "content": _PROBE}]
    bare = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not full.startswith(bare) or full == bare:
        return []
    return list(tokenizer(full[len(bare) :], add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class GenerationPromptComparison:
    """Whether two prompts end in the same generation-prompt state, and how they differ.

    ``student_tail`` / ``teacher_tail`` are the ids after the last generation-prompt header of
    each prompt (Qwen3 with ``enable_thinking=False``: ``<think>\n\n</think>\n\n``; with
    thinking on: nothing); empty for a prompt without the header (``found`` says which prompts
    have it). ``aligned`` is True when both have the header and the same tail, or when neither
    has one (plain prompts: no generation-prompt state).
    """

    aligned: bool
    student_tail: tuple[int, ...]
    teacher_tail: tuple[int, ...]
    found: tuple[bool, bool]  # (student, teacher) prompt contains the header

    def describe(self, tokenizer: Any | None = None) -> str:
        """One line for people: the two tails (decoded when a tokenizer is given)."""

        def shown(ids: tuple[int, ...]) -> str:
            if tokenizer is None:
                return repr(list(ids))
            return repr(tokenizer.decode(list(ids), skip_special_tokens=False))

        if self.aligned:
            return (
                f"both prompts end in the same generation-prompt state ({shown(self.student_tail)})"
            )
        if self.found[0] != self.found[1]:
            missing = "student" if not self.found[0] else "teacher"
            return f"the {missing} prompt has no generation prompt (chat template not applied?)"
        return (
            f"student prompt ends {shown(self.student_tail)} after the generation-prompt header, "
            f"teacher prompt ends {shown(self.teacher_tail)}"
        )


def _tail_after(ids: Sequence[int], header: Sequence[int]) -> tuple[int, ...] | None:
    width = len(header)
    for start in range(len(ids) - width, -1, -1):
        if list(ids[start : start + width]) == list(header):
            return tuple(ids[start + width :])
    return None


def compare_generation_prompts(
    student_ids: Sequence[int], teacher_ids: Sequence[int], header_ids: Sequence[int]
) -> GenerationPromptComparison:
    """Compare the generation-prompt state two prompts end in (pure; no tokenizer needed).

    ``header_ids`` is :func:`generation_prompt_header_ids` of the tokenizer. Each prompt's state
    is what follows its last occurrence of the header; the prompts are aligned when those tails
    are equal (or neither prompt has the header). An empty header compares nothing: aligned.
    """
    if not header_ids:
        return GenerationPromptComparison(True, (), (), (False, False))
    student = _tail_after(student_ids, header_ids)
    teacher = _tail_after(teacher_ids, header_ids)
    found = (student is not None, teacher is not None)
    aligned = student == teacher
    return GenerationPromptComparison(aligned, student or (), teacher or (), found)


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
