"""Thinking modes (issue #10, fault 4): with Qwen3's thinking switch, teacher and student prompts
end in the same generation-prompt state for every setting, unless the spec opts into a mismatch.

The tokenizer carries Qwen3's published chat template (``tests/qwen3_layout.py``): its
generation prompt is ``<|im_start|>assistant\\n``, followed by ``<think>\\n\\n</think>\\n\\n``
exactly when ``enable_thinking`` is false.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from opsd_engine.config import PromptConfig, SpecError, parse_spec
from opsd_engine.modeling import load_tokenizer
from opsd_engine.prompts import (
    GenerationPromptComparison,
    build_prompt_pair,
    compare_generation_prompts,
    generation_prompt_header_ids,
)

UNSET: Any = object()
CLOSED = "<think>\n\n</think>\n\n"  # the pre-filled empty think block of enable_thinking=False
SETTINGS = (None, True, False)


@pytest.fixture(scope="module")
def tokenizer(qwen3_base_model_dir: Path) -> Any:
    return load_tokenizer(str(qwen3_base_model_dir))


def spec_body(student: bool | None, teacher: Any, **extra: Any) -> dict[str, Any]:
    prompts: dict[str, Any] = {"student_thinking": student, **extra}
    if teacher is not UNSET:
        prompts["teacher_thinking"] = teacher
    return {"base_model": "m", "dataset_uri": "d.jsonl", "prompts": prompts}


def tails(tokenizer: Any, prompts: PromptConfig) -> tuple[GenerationPromptComparison, str, str]:
    pair = build_prompt_pair(
        tokenizer, problem="What is 2+3?", solution=r"2+3=5, \boxed{5}", answer="5", prompts=prompts
    )
    header = generation_prompt_header_ids(tokenizer)
    result = compare_generation_prompts(pair.student_ids, pair.teacher_ids, header)
    decode = tokenizer.decode
    return result, decode(list(result.student_tail)), decode(list(result.teacher_tail))


def test_header_is_qwen3s_generation_prompt(tokenizer: Any) -> None:
    assert tokenizer.decode(generation_prompt_header_ids(tokenizer)) == "<|im_start|>assistant\n"


@pytest.mark.parametrize("student", SETTINGS, ids=lambda v: f"student={v}")
@pytest.mark.parametrize(
    "teacher", [UNSET, None], ids=lambda v: "teacher=unset" if v is UNSET else "teacher=None"
)
def test_teacher_follows_the_student_by_default(
    tokenizer: Any, student: bool | None, teacher: Any
) -> None:
    spec = parse_spec(spec_body(student, teacher))
    assert spec.prompts.teacher_thinking == student
    result, student_tail, teacher_tail = tails(tokenizer, spec.prompts)
    assert result.aligned and result.found == (True, True)
    assert student_tail == teacher_tail == (CLOSED if student is False else "")


@pytest.mark.parametrize("setting", [True, False], ids=lambda v: f"both={v}")
def test_equal_explicit_settings_align(tokenizer: Any, setting: bool) -> None:
    spec = parse_spec(spec_body(setting, setting))
    result, student_tail, teacher_tail = tails(tokenizer, spec.prompts)
    assert result.aligned and student_tail == teacher_tail == (CLOSED if not setting else "")


MISMATCHES = [(None, True), (None, False), (True, False), (False, True)]


@pytest.mark.parametrize(("student", "teacher"), MISMATCHES, ids=lambda v: str(v))
def test_explicit_mismatch_is_refused_naming_the_field_unless_opted_in(
    tokenizer: Any, student: bool | None, teacher: bool
) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(spec_body(student, teacher))
    assert info.value.first_field == "prompts.teacher_thinking"
    assert "prompts.allow_thinking_mismatch" in str(info.value)

    spec = parse_spec(spec_body(student, teacher, allow_thinking_mismatch=True))
    assert (spec.prompts.student_thinking, spec.prompts.teacher_thinking) == (student, teacher)
    result, student_tail, teacher_tail = tails(tokenizer, spec.prompts)
    # the comparison reports the real states: Qwen3's default (unset) is thinking on
    assert student_tail == (CLOSED if student is False else "")
    assert teacher_tail == (CLOSED if teacher is False else "")
    assert result.aligned is (student_tail == teacher_tail)
    if not result.aligned:
        message = result.describe(tokenizer)
        assert repr(CLOSED) in message and "teacher prompt ends" in message


def test_the_issue_case_student_off_teacher_unset(tokenizer: Any) -> None:
    # Issue #10: student_thinking false with teacher_thinking unset gave the teacher
    # "<|im_start|>assistant\n" and the student "...assistant\n<think>\n\n</think>\n\n".
    spec = parse_spec(spec_body(False, UNSET))
    pair = build_prompt_pair(
        tokenizer, problem="p", solution="s", answer=None, prompts=spec.prompts
    )
    assert tokenizer.decode(pair.student_ids).endswith("<|im_start|>assistant\n" + CLOSED)
    assert tokenizer.decode(pair.teacher_ids).endswith("<|im_start|>assistant\n" + CLOSED)


def test_assigning_a_mismatch_later_is_refused_too() -> None:
    prompts = PromptConfig(student_thinking=True)
    with pytest.raises(ValueError, match="allow_thinking_mismatch"):
        prompts.student_thinking = False


def test_compare_generation_prompts_is_pure_on_ids() -> None:
    header = [1, 2]
    same = compare_generation_prompts([9, 1, 2, 7], [8, 8, 1, 2, 7], header)
    assert same == GenerationPromptComparison(True, (7,), (7,), (True, True))
    # the last header counts: a header inside the problem text does not confuse it
    assert compare_generation_prompts([1, 2, 5, 1, 2], [1, 2], header).aligned
    differ = compare_generation_prompts([1, 2, 5, 6], [1, 2], header)
    assert not differ.aligned and (differ.student_tail, differ.teacher_tail) == ((5, 6), ())
    assert "student prompt ends [5, 6]" in differ.describe()
    one_sided = compare_generation_prompts([3, 4], [1, 2], header)
    assert not one_sided.aligned and one_sided.found == (False, True)
    assert "student prompt has no generation prompt" in one_sided.describe()
    assert compare_generation_prompts([3], [4], header).aligned  # plain prompts: no state
    assert compare_generation_prompts([3], [4], []).aligned  # no chat template
