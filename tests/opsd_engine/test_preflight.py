"""Pre-flight (issues #12, #16): the privileged gap, the divergence profile and the alignment
checks on the real tiny model in Qwen3's layout (its published chat template and thinking
switch), with deliberately misaligned specs flagged and a good one passing the alignment checks.

The tiny model is random, so it solves nothing with or without the reference: its gap check is
a warn by construction; the gap's pass/warn logic is tested on its own with given accuracies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from opsd_engine.config import parse_spec
from opsd_engine.modeling import load_tokenizer
from opsd_engine.preflight import (
    CHECK_NAMES,
    PRIVILEGED_GAP_THRESHOLD,
    PreflightReport,
    PreflightSettings,
    check_generation_prompt_state,
    check_privileged_gap,
    check_rollout_tokenization,
    format_report,
    run_preflight,
    sample_indices,
)
from opsd_engine.prompts import PromptPair, build_prompt_pair
from opsd_engine.rollout import SamplingParams, TransformersRolloutBackend, rollout_seed

SETTINGS = PreflightSettings(sample_size=6, profile_rollouts=3, max_new_tokens=10)


def spec_for(model_dir: Path, dataset: Path, **prompts: Any) -> Any:
    return parse_spec(
        {
            "base_model": str(model_dir),
            "dataset_uri": str(dataset),
            "max_new_tokens": 10,
            "seed": 3,
            "prompts": prompts,
            "runtime": {"dtype": "float32", "device": "cpu"},
        }
    )


@pytest.fixture(scope="module")
def model(qwen3_base_model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(qwen3_base_model_dir), dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer(qwen3_base_model_dir: Path) -> Any:
    return load_tokenizer(str(qwen3_base_model_dir))


def run(spec: Any, model: Any, tokenizer: Any, **kw: Any) -> PreflightReport:
    return run_preflight(spec, SETTINGS, model=model, tokenizer=tokenizer, **kw)


def test_good_spec_passes_the_alignment_checks(
    qwen3_base_model_dir: Path, tiny_dataset: Path, model: Any, tokenizer: Any
) -> None:
    spec = spec_for(qwen3_base_model_dir, tiny_dataset, student_thinking=False)
    phases: list[tuple[str, int, int]] = []
    report = run(spec, model, tokenizer, on_progress=lambda *p: phases.append(p))
    assert [c.name for c in report.checks] == list(CHECK_NAMES)
    assert report.check("generation_prompt_state").status == "pass"
    assert report.check("generation_prompt_state").details["tail"] == "<think>\n\n</think>\n\n"
    assert report.check("teacher_first_tokens").status == "pass"
    assert report.status != "fail"
    assert report.n_problems == 6 and report.samples_per_problem == 1
    # a random model solves nothing: no gap, and the check says so
    assert report.student_accuracy == report.teacher_accuracy == 0.0
    assert report.check("privileged_gap").status == "warn"
    assert "gap too small for self-distillation to help" in report.check("privileged_gap").message
    # the profile covers every position some profiled rollout reaches, counts included
    assert 1 <= len(report.divergence_profile) <= 10
    assert report.profile_counts[0] == 3 and all(v >= 0 for v in report.divergence_profile)
    weighted = sum(
        v * c for v, c in zip(report.divergence_profile, report.profile_counts, strict=True)
    ) / sum(report.profile_counts)
    assert report.divergence_mean == pytest.approx(weighted)
    assert 1 <= len(report.divergence_by_tenth) <= 10
    metrics = report.metrics()
    assert metrics["preflight/divergence_mean"] == pytest.approx(weighted)
    assert metrics["preflight/gap"] == 0.0 and metrics["preflight/check/privileged_gap"] == 1.0
    assert metrics["preflight/divergence_mean"] > 0  # teacher and student prompts differ
    assert phases[0] == ("student", 0, 6) and phases[-1] == ("profile", 3, 3)
    text = format_report(report.to_dict())
    assert "[PASS] generation_prompt_state" in text and "[WARN] privileged_gap" in text

    # the student samples are the trainer's first-epoch rollouts of those problems (its seeds)
    from opsd_engine.data import load_examples
    from opsd_engine.modeling import stop_token_ids

    examples = load_examples(str(tiny_dataset))
    chosen = [examples[i] for i in sample_indices(len(examples), spec.seed, 6)]
    prompts = [
        build_prompt_pair(
            tokenizer,
            problem=e.problem,
            solution=e.solution or "",
            answer=None,
            prompts=spec.prompts,
        ).student_ids
        for e in chosen
    ]
    backend = TransformersRolloutBackend(
        model,
        pad_id=int(tokenizer.pad_token_id),
        stop_ids=stop_token_ids(tokenizer, model),
        device=torch.device("cpu"),
    )
    params = SamplingParams(max_new_tokens=10, temperature=spec.generation.temperature)
    rollouts = backend.generate(
        prompts, params, seeds=[rollout_seed(spec.seed, 0, e.index) for e in chosen]
    )
    lengths = [len(r.token_ids) for r in rollouts]
    assert report.student_rollout_len_mean == pytest.approx(sum(lengths) / len(lengths))
    profiled = [n for n in lengths if n][:3]
    assert report.profile_counts == [
        sum(n > position for n in profiled) for position in range(max(profiled))
    ]


def test_the_sample_is_the_head_of_the_trainers_first_epoch() -> None:
    from opsd_engine.trainers.common import ExampleStream

    assert sample_indices(16, 3, 4) == ExampleStream(16, 3).take(0, 4)
    assert sample_indices(3, 0, 10) == ExampleStream(3, 0).take(0, 3)  # bounded by the data


def test_thinking_mismatch_fails_with_its_fix(
    qwen3_base_model_dir: Path, tiny_dataset: Path, model: Any, tokenizer: Any
) -> None:
    spec = spec_for(
        qwen3_base_model_dir,
        tiny_dataset,
        student_thinking=False,
        teacher_thinking=True,
        allow_thinking_mismatch=True,
    )
    report = run(spec, model, tokenizer)
    check = report.check("generation_prompt_state")
    assert check.status == "fail" and report.status == "fail"
    assert check.details == {"student_tail": "<think>\n\n</think>\n\n", "teacher_tail": ""}
    assert "prompts.teacher_thinking" in (check.fix or "")
    assert report.metrics()["preflight/status"] == 2.0


def test_a_teacher_template_ending_elsewhere_is_flagged(
    tiny_model_dir: Path, tiny_dataset: Path, tokenizer: Any
) -> None:
    """Plain prompts (no chat template): the teacher's template ends on another line than the
    student's answer cue."""
    wrong = "Problem: {problem}\nReference:\n{solution}\nNow solve it yourself."

    def check(spec: Any) -> Any:
        pair = build_prompt_pair(
            tokenizer, problem="What is 2+3?", solution="2+3=5", answer="5", prompts=spec.prompts
        )
        return check_generation_prompt_state(tokenizer, spec, [pair])

    spec = spec_for(tiny_model_dir, tiny_dataset, chat_template="off", teacher_template=wrong)
    flagged = check(spec)
    assert flagged.status == "warn" and "prompts.teacher_template" in (flagged.fix or "")
    assert flagged.details == {"student_cue": "Answer:", "teacher_cue": "Now solve it yourself."}
    assert check(spec_for(tiny_model_dir, tiny_dataset, chat_template="off")).status == "pass"


def test_a_near_uniform_teacher_fails(
    qwen3_base_model_dir: Path, tiny_dataset: Path, tokenizer: Any
) -> None:
    """A model whose (tied) embeddings are zero gives zero logits: a uniform teacher, the
    'loss stuck at ln 2' case."""
    from transformers import AutoModelForCausalLM

    flat = AutoModelForCausalLM.from_pretrained(str(qwen3_base_model_dir), dtype=torch.float32)
    with torch.no_grad():
        flat.get_output_embeddings().weight.zero_()
    spec = spec_for(qwen3_base_model_dir, tiny_dataset)
    report = run(spec, flat, tokenizer)
    check = report.check("teacher_first_tokens")
    assert check.status == "fail" and report.status == "fail"
    assert check.details["fraction_of_uniform"] == pytest.approx(1.0, abs=1e-4)
    assert "ln 2" in check.message
    assert report.divergence_profile[0] == pytest.approx(0.0, abs=1e-6)  # both roles uniform


def test_rollout_tokenization_flags_prompts_that_merge_with_the_rollout(tokenizer: Any) -> None:
    encode = lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    rollout = encode("r is 5")
    aligned = PromptPair(student_ids=encode("Problem\n"), teacher_ids=encode("Other\n"))
    merging = PromptPair(student_ids=encode("Problem\n"), teacher_ids=encode("Problem: Answe"))
    assert check_rollout_tokenization(tokenizer, [aligned], [rollout]).status == "pass"
    check = check_rollout_tokenization(tokenizer, [merging], [rollout])
    assert check.status == "fail" and "differently after the teacher prompt" in check.message
    # a sampled rollout that is not the canonical encoding of its text: the same in both roles
    split = encode("r") + encode(" is") + encode(" 5")
    odd = [t for t in encode("12") if t] + encode("3")
    assert check_rollout_tokenization(tokenizer, [aligned], [split]).status in {"pass", "warn"}
    assert check_rollout_tokenization(tokenizer, [aligned], [odd]).status in {"pass", "warn"}
    assert check_rollout_tokenization(tokenizer, [aligned], [[]]).status == "pass"


def test_privileged_gap_threshold() -> None:
    # the constant is the toy replication's capacity-run threshold, rounded to a point
    results = Path(__file__).parents[2] / "benchmarks" / "toy_reasoning" / "results.json"
    measured = json.loads(results.read_text())["privileged_gap_threshold"]["value"]
    assert round(measured, 2) == PRIVILEGED_GAP_THRESHOLD
    assert check_privileged_gap(0.40, 0.60, None, PRIVILEGED_GAP_THRESHOLD).status == "warn"
    assert check_privileged_gap(0.40, 0.65, None, PRIVILEGED_GAP_THRESHOLD).status == "pass"
    passed = check_privileged_gap(0.38, 0.97, (0.45, 0.73), PRIVILEGED_GAP_THRESHOLD)
    assert passed.status == "pass" and passed.details["gap"] == pytest.approx(0.59)
    small = check_privileged_gap(0.40, 0.45, None, PRIVILEGED_GAP_THRESHOLD)
    assert small.status == "warn" and "gap too small" in small.message
    assert "does not make enough use" in small.message
    solved = check_privileged_gap(0.95, 1.0, None, PRIVILEGED_GAP_THRESHOLD)
    assert solved.status == "warn" and "already solves" in solved.message
    assert check_privileged_gap(0.40, 0.45, None, 0.05).status == "pass"  # a job's own min_gap
    unknown = check_privileged_gap(None, None, None, PRIVILEGED_GAP_THRESHOLD)
    assert unknown.status == "warn" and "cannot be measured" in unknown.message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sample_size", 0),
        ("sample_size", 257),
        ("samples_per_problem", 17),
        ("profile_rollouts", 0),
        ("max_new_tokens", 0),
        ("min_gap", 2.0),
        ("sample_size", True),
    ],
)
def test_settings_are_bounded(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        PreflightSettings(**{field: value})


class Recorder:
    """Keeps what a trainer reports (the callback protocol, in memory)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.metrics: list[tuple[int, dict[str, float]]] = []

    def on_event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        self.events.append((kind, message, data or {}))

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics.append((step, metrics))

    def on_checkpoint(self, step: int, path: Path) -> None:
        return None

    def should_stop(self) -> bool:
        return False


def test_run_first_reports_before_training_and_leaves_training_unchanged(
    tiny_spec: Any, tmp_path: Path
) -> None:
    from opsd_engine.trainers.opsd import train

    first = {"run_first": True, "sample_size": 3, "profile_rollouts": 2, "max_new_tokens": 6}
    plain, checked = Recorder(), Recorder()
    train(tiny_spec(optim={"max_steps": 1}), tmp_path / "plain", callbacks=plain)
    result = train(
        tiny_spec(optim={"max_steps": 1}, preflight=first), tmp_path / "checked", callbacks=checked
    )
    assert result.status == "succeeded"
    kinds = [kind for kind, _, _ in checked.events]
    assert kinds.index("preflight_finished") < kinds.index("finished")
    report = next(data for kind, _, data in checked.events if kind == "preflight_finished")
    assert report["report"]["n_problems"] == 3 and report["status"] == "warn"  # random model
    assert checked.metrics[0][0] == 0 and "preflight/gap" in checked.metrics[0][1]
    # the pre-flight samples with its own seeds: step 1 is the same as without it
    assert checked.metrics[1][1]["loss"] == plain.metrics[0][1]["loss"]


def test_run_first_stops_the_job_when_the_report_is_bad_enough(
    tiny_spec: Any, tmp_path: Path
) -> None:
    from opsd_engine.preflight import PreflightFailed
    from opsd_engine.trainers.opsd import train

    first = {"run_first": True, "stop_on": "warn", "sample_size": 3, "max_new_tokens": 6}
    recorder = Recorder()
    with pytest.raises(PreflightFailed, match="privileged_gap: warn") as info:
        train(tiny_spec(preflight=first), tmp_path / "run", callbacks=recorder)
    assert "training not started" in str(info.value) and info.value.report.status == "warn"
    assert all("loss" not in metrics for _, metrics in recorder.metrics)  # no step was taken
