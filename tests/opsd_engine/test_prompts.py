"""Prompt rendering and token-level sequence assembly (alignment, padding, position ids)."""

from __future__ import annotations

import pytest
import torch

from opsd_engine.config import PromptConfig
from opsd_engine.modeling import load_tokenizer
from opsd_engine.prompts import (
    assemble_scoring_batch,
    build_prompt_pair,
    encode_prompt,
    rollout_targets,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


def test_teacher_prompt_holds_problem_solution_and_transition(tokenizer) -> None:
    pair = build_prompt_pair(
        tokenizer,
        problem="What is 2+3?",
        solution="2+3=5. \\boxed{5}",
        answer="5",
        prompts=PromptConfig(),
    )
    student = tokenizer.decode(pair.student_ids)
    teacher = tokenizer.decode(pair.teacher_ids)
    assert (
        "What is 2+3?" in student and "reference solution" not in student and "2+3=5" not in student
    )
    assert "What is 2+3?" in teacher and "2+3=5. \\boxed{5}" in teacher
    assert "After understanding the reference solution" in teacher
    # chat template applied to both, generation prompt at the end, special tokens kept as ids
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert pair.student_ids[0] == im_start and pair.teacher_ids[0] == im_start
    assert student.endswith("<|im_start|>assistant\n")


def test_thinking_switch_per_role_when_opted_in(tokenizer) -> None:
    off = PromptConfig(student_thinking=False, teacher_thinking=True, allow_thinking_mismatch=True)
    pair = build_prompt_pair(tokenizer, problem="p", solution="s", answer=None, prompts=off)
    assert tokenizer.decode(pair.student_ids).endswith("<think>\n\n</think>\n\n")
    assert not tokenizer.decode(pair.teacher_ids).endswith("</think>\n\n")


def test_plain_prompts_without_chat_template(tokenizer) -> None:
    ids = encode_prompt(
        tokenizer, "Problem: x\nAnswer:", PromptConfig(chat_template="off"), thinking=None
    )
    assert tokenizer.decode(ids) == "Problem: x\nAnswer:"


def test_layout_left_pads_whole_sequences_and_gathers_rollout_columns() -> None:
    prompts = [[5, 6, 7], [8]]
    rollouts = [[1, 2], [3, 4, 9]]
    batch = assemble_scoring_batch(prompts, rollouts, pad_id=0)
    # As wide as the longest prompt + rollout (5), not the longest prompt plus rollout (6).
    assert batch.rollout_width == 3
    assert batch.input_ids.tolist() == [[5, 6, 7, 1, 2], [0, 8, 3, 4, 9]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4]
    assert batch.position_ids[1, 1:].tolist() == [0, 1, 2, 3]
    # Column c predicts the token at c + 1: row 0's rollout [1, 2] sits at 3..4, so 2..3; the
    # third column repeats the last one (masked out by the rollout mask).
    assert batch.rollout_columns.tolist() == [[2, 3, 4], [1, 2, 3]]
    outputs = torch.arange(10).reshape(2, 5) * 10
    assert batch.at_rollout(outputs).tolist() == [[20, 30, 40], [60, 70, 80]]
    next_tokens = batch.input_ids.gather(1, (batch.rollout_columns + 1).clamp(max=4))
    targets, mask = rollout_targets(rollouts, 3, pad_id=0, skip_first=1)
    assert next_tokens[mask].tolist() == targets[mask].tolist() == [2, 4, 9]
    assert targets.tolist() == [[1, 2, 0], [3, 4, 9]]
    assert mask.tolist() == [[False, True, False], [False, True, True]]


def test_batched_logits_at_rollout_slice_match_each_unpadded_sequence(tokenizer, model) -> None:
    """Would fail on an off-by-one in the slice, on wrong position ids or on pad leaking in."""
    prompts = PromptConfig()
    pairs = [
        build_prompt_pair(tokenizer, problem=p, solution=s, answer=None, prompts=prompts)
        for p, s in [
            ("What is 1+1?", "1+1=2."),
            ("A much longer problem about 17 apples and 4 pears?", "21."),
        ]
    ]
    rollouts = [tokenizer("The answer is 2", add_special_tokens=False)["input_ids"], [11, 12, 13]]
    for role in ("student_ids", "teacher_ids"):
        role_prompts = [getattr(p, role) for p in pairs]
        batch = assemble_scoring_batch(role_prompts, rollouts, pad_id=tokenizer.pad_token_id)
        with torch.no_grad():
            logits = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
            ).logits
            logits = batch.at_rollout(logits)
        for row, (prompt, rollout) in enumerate(zip(role_prompts, rollouts, strict=True)):
            alone = torch.tensor([prompt + rollout])
            with torch.no_grad():
                ref = model(input_ids=alone).logits[0]
            # logits at prompt_len - 1 + j predict rollout token j
            expected = ref[len(prompt) - 1 : len(prompt) - 1 + len(rollout)]
            torch.testing.assert_close(logits[row, : len(rollout)], expected, rtol=1e-4, atol=1e-4)
            shifted = ref[len(prompt) : len(prompt) + len(rollout)]
            assert not torch.allclose(logits[row, : len(rollout)], shifted, atol=1e-3)


def test_teacher_and_student_sequences_share_the_exact_rollout_ids(tokenizer) -> None:
    pair = build_prompt_pair(
        tokenizer, problem="2*3?", solution="6", answer="6", prompts=PromptConfig()
    )
    rollout = [
        tokenizer.convert_tokens_to_ids("<think>"),
        40,
        41,
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
    ]
    student = assemble_scoring_batch([pair.student_ids], [rollout], pad_id=0)
    teacher = assemble_scoring_batch([pair.teacher_ids], [rollout], pad_id=0)
    s_cols = student.rollout_columns[0] + 1
    t_cols = teacher.rollout_columns[0] + 1
    assert student.input_ids[0, s_cols].tolist() == rollout == teacher.input_ids[0, t_cols].tolist()
    assert student.input_ids[0, : -len(rollout)].tolist() == pair.student_ids


def test_assembly_rejects_inconsistent_inputs() -> None:
    with pytest.raises(ValueError, match="2 prompts but 1 rollouts"):
        assemble_scoring_batch([[1], [2]], [[3]], pad_id=0)
    with pytest.raises(ValueError, match="empty prompt"):
        assemble_scoring_batch([[]], [[3]], pad_id=0)
