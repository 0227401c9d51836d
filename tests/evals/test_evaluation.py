"""`opsd_engine.evaluation`: in-process sampling on the tiny model, grading of given texts, and the
reference answers (from `answer`, else the solution's last box, else an error naming the row)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from opsd_engine.data import Example, load_examples
from opsd_engine.evaluation import (
    EvalDataError,
    EvalSettings,
    evaluate_model,
    evaluate_texts,
    reference_answers,
    summary_metrics,
)
from opsd_engine.grading import DECIDED_BY
from tests.evals.helpers import write_benchmark


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    from opsd_engine.modeling import load_base_model, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    return load_base_model(str(tiny_model_dir), dtype=torch.float32), tokenizer


def test_evaluate_model_n4_gives_a_well_formed_summary(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    path = write_benchmark(tmp_path / "bench.jsonl", n=3, solution_only=1)
    examples = load_examples(str(path), require_solution=False)
    torch.manual_seed(0)
    result = evaluate_model(
        model, tokenizer, examples, EvalSettings(n=4, max_new_tokens=8, batch_size=8)
    )
    summary = result.summary
    assert (summary.n_problems, summary.n_samples, summary.total_samples) == (3, 4, 12)
    assert sorted(summary.pass_at_k) == [1, 2, 3, 4]
    assert summary.pass_at_k[1] == pytest.approx(summary.avg_at_n)
    values = [summary.pass_at_k[k] for k in (1, 2, 3, 4)]
    assert values == sorted(values) and all(0 <= v <= 1 for v in values)
    assert summary.majority_vote is not None
    assert [p.index for p in summary.problems] == [0, 1, 2]
    assert [(s.problem_index, s.sample_index) for s in result.samples] == [
        (i, j) for i in range(3) for j in range(4)
    ]
    assert all(0 < s.num_tokens <= 8 and isinstance(s.text, str) for s in result.samples)
    assert all(s.decided_by in DECIDED_BY for s in result.samples)
    assert all(s.decided_by in ("string_match", "math_verify") for s in result.samples if s.correct)
    document = result.to_dict()
    assert document["summary"]["pass_at_k"].keys() == {"1", "2", "3", "4"}
    assert len(document["samples"]) == 12
    assert model.training is False  # mode restored (load_base_model returns it in eval mode)

    greedy = evaluate_model(
        model, tokenizer, examples[:1], EvalSettings(n=3, temperature=0, max_new_tokens=6)
    )
    assert len({s.text for s in greedy.samples}) == 1 and len(greedy.samples) == 3


def test_evaluate_texts_grades_each_sample_and_summarizes() -> None:
    outputs = [
        ["so \\boxed{5}", "\\boxed{4}", "The answer is 5.", "nothing"],
        [
            "<think>maybe \\boxed{7}</think> \\boxed{8}",
            "\\boxed{8}",
            "\\boxed{9}",
            "<think>\\boxed{8}",
        ],
    ]
    result = evaluate_texts(outputs, ["5", "\\boxed{8}"], num_tokens=[[1, 2, 3, 4], [5, 6, 7, 8]])
    verdicts = [(s.correct, s.extracted) for s in result.samples]
    assert verdicts == [
        (True, "5"),
        (False, "4"),
        (True, "5"),
        (False, None),
        (True, "8"),
        (True, "8"),
        (False, "9"),
        (False, None),  # unclosed think: no final answer
    ]
    summary = result.summary
    assert summary.avg_at_n == pytest.approx(0.5)
    assert summary.pass_at_k[1] == pytest.approx(0.5)
    assert summary.pass_at_k[4] == pytest.approx(1.0)
    assert summary.pass_at_k[2] == pytest.approx(1 - 1 / 6)  # c=2 of n=4: 1 - C(2,2)/C(4,2)
    assert summary.majority_vote == pytest.approx(1.0)
    assert [s.num_tokens for s in result.samples] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert summary_metrics(summary) == {
        "eval/avg@4": pytest.approx(0.5),
        "eval/pass@1": pytest.approx(0.5),
        "eval/pass@2": pytest.approx(5 / 6),
        "eval/pass@3": pytest.approx(1.0),
        "eval/pass@4": pytest.approx(1.0),
        "eval/majority": pytest.approx(1.0),
    }
    with pytest.raises(ValueError, match="answers"):
        evaluate_texts(outputs, ["5"])


def test_reference_answers_fall_back_to_the_boxed_solution() -> None:
    examples = [
        Example(problem="p0", solution=None, answer="12", index=0),
        Example(problem="p1", solution="1 + 1 = 2. So \\boxed{2}.", answer=None, index=1),
        Example(problem="p2", solution="no box here", answer="", index=7),
    ]
    assert reference_answers(examples[:2]) == ["12", "2"]
    with pytest.raises(EvalDataError, match="row index 7"):
        reference_answers(examples)


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="n must be"):
        EvalSettings(n=0)
    with pytest.raises(ValueError, match="top_p"):
        EvalSettings(top_p=0)
