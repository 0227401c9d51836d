"""Pre-flight of an OPSD job: will self-distillation have something to teach, and are the two
roles aligned? (issues #12 and #16). Pure engine code: no service, no store.

On a sample of the job's dataset (the first ``sample_size`` problems of the trainer's own
seeded example stream, so the problems its first steps see), with exactly the prompts the
trainer builds (:func:`opsd_engine.prompts.build_prompt_pair`: same templates, chat template,
thinking switches, system prompts) and the trainer's sampling (``generation`` group,
``max_new_tokens``, the stop set), at step 0 (the fresh LoRA adapter is zero, so student and
``initial`` teacher are both the base model):

* **the privileged gap**: the student's accuracy without the reference (rollouts sampled from
  the student prompt, seeded exactly like the trainer's first-epoch rollouts) against the
  teacher's accuracy with it (samples from the teacher prompt), graded like evals
  (:func:`opsd_engine.grading.grade`, reference = ``answer`` or the solution's last
  ``\\boxed{}``), with a paired 95% interval over problems;
* **the per-position divergence profile**: for ``profile_rollouts`` student rollouts, the
  spec's divergence ``D(p_T || p_S)`` (``sampled_token`` jobs: forward KL) at each rollout
  position, averaged over the rollouts that reach it. A profile that is high on the first
  tokens and low after is the thinking-boundary symptom (issue #16); one that is zero
  everywhere means the teacher adds nothing.

and four named alignment checks, each ``pass``, ``warn`` or ``fail`` with the fix it suggests:

``generation_prompt_state``
    both prompts end in the same generation-prompt state (:func:`compare_generation_prompts`:
    Qwen3's thinking block open or pre-closed); plain prompts (no chat template) must end with
    the same last line (the answer cue the rollout continues). Thinking mismatch: fail;
    different plain cue: warn.
``rollout_tokenization``
    the shared rollout, decoded and re-encoded after each prompt, gives the rollout's own ids
    after both (the engine scores ids and never re-encodes, but a rollout whose text
    tokenizes differently after the two prompts means the prompts' ends merge with it
    differently: the two roles would not see the same text boundary). Differs between roles:
    fail; differs identically in both (non-canonical sampled tokenization): warn.
``teacher_first_tokens``
    the teacher's next-token distribution on the student's first :data:`FIRST_TOKENS` rollout
    tokens is neither near-uniform (mean entropy at least :data:`NEAR_UNIFORM_FRACTION` of
    ``ln V``: fail; with JSD at beta 0.5 against a peaked student the loss then sits near
    ``ln 2``, the "loss stuck at ln 2" symptom), non-finite (fail), nor collapsed onto one
    token at every position (warn).
``privileged_gap``
    the teacher with the reference beats the student by at least ``min_gap``
    (:data:`PRIVILEGED_GAP_THRESHOLD`), else warn: the gap is too small for self-distillation
    to help. No reference answers: warn (not measurable).

The report's ``status`` is the worst check's. :func:`run_preflight` is the entry point;
:func:`run_before_training` is what a job with ``preflight.run_first`` does before its first
step (events and ``preflight/*`` metrics at step 0 through the trainer's callbacks, and
:class:`PreflightFailed` when the report is as bad as ``preflight.stop_on``);
:meth:`PreflightReport.metrics` gives the ``preflight/*`` metrics the service stores and
:func:`format_report` the text ``opsd preflight`` prints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from opsd_engine.config import JobSpec
from opsd_engine.data import Example, load_examples
from opsd_engine.grading import extract_answer, grade
from opsd_engine.losses import token_divergence, token_entropy
from opsd_engine.prompts import (
    PromptPair,
    assemble_scoring_batch,
    build_prompt_pair,
    compare_generation_prompts,
    generation_prompt_header_ids,
    uses_chat_template,
)
from opsd_engine.rollout import (
    Rollout,
    SamplingParams,
    TransformersRolloutBackend,
    derive_seed,
    rollout_seed,
)

__all__ = [
    "CHECK_NAMES",
    "FIRST_TOKENS",
    "MAX_PROFILE_ROLLOUTS",
    "MAX_SAMPLES_PER_PROBLEM",
    "MAX_SAMPLE_SIZE",
    "NEAR_UNIFORM_FRACTION",
    "PRIVILEGED_GAP_THRESHOLD",
    "PROFILE_POSITIONS",
    "Check",
    "PreflightFailed",
    "PreflightReport",
    "PreflightSettings",
    "ProgressCallback",
    "check_generation_prompt_state",
    "check_privileged_gap",
    "check_rollout_tokenization",
    "check_teacher_first_tokens",
    "format_report",
    "run_before_training",
    "run_preflight",
    "sample_indices",
    "settings_from_spec",
]

Status = Literal["pass", "warn", "fail"]
_RANK: dict[str, int] = {"pass": 0, "warn": 1, "fail": 2}
CHECK_NAMES = (
    "generation_prompt_state",
    "rollout_tokenization",
    "teacher_first_tokens",
    "privileged_gap",
)

#: Smallest teacher-minus-student accuracy (absolute, on the sample) for which the pre-flight
#: passes the privileged-gap check. Set from the toy replication's capacity runs
#: (`python -m benchmarks.toy_reasoning.run`, `privileged_gap_threshold` in its results.json):
#: OPSD's held-out gain was not shown (95% interval, 3 seeds) on a base whose gap was 1.4 points
#: and was on every base with a gap of 45 points or more, so the warning sits halfway, at about
#: 23 points. With 3 bases the true boundary is only known to lie between 1 and 45 points, and a
#: job may set its own with ``min_gap``. With 16 problems one sample each, the paired 95%
#: interval of a gap is about +-0.2 wide, so the check also reports that interval.
PRIVILEGED_GAP_THRESHOLD = 0.23
#: Mean teacher entropy on the first rollout tokens, as a fraction of ln V, at or above which the
#: teacher's distribution counts as near-uniform (a random-init head gives ~1.0; a trained LM a
#: few nats out of ln 151,936 = 11.9, i.e. well under 0.5).
NEAR_UNIFORM_FRACTION = 0.9
#: Probability of one single token at every first position above which the teacher is degenerate.
DEGENERATE_PROBABILITY = 0.99
#: Positions of the per-position profile kept in the report (``divergence_by_tenth`` covers all).
PROFILE_POSITIONS = 512
#: Rollout positions the teacher_first_tokens check looks at.
FIRST_TOKENS = 8
MAX_SAMPLE_SIZE = 256
MAX_SAMPLES_PER_PROBLEM = 16
MAX_PROFILE_ROLLOUTS = 32
_TEACHER_DOMAIN = 0x50524546  # "PREF": teacher samples' seeds, apart from training streams
_CHUNK = 256  # positions per head projection in the profile

ProgressCallback = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass(frozen=True)
class PreflightSettings:
    """How much to sample. ``max_new_tokens`` ``None``: the spec's (what training samples).

    Raises ``ValueError`` on values outside their bounds (named in the message).
    """

    sample_size: int = 16
    samples_per_problem: int = 1
    profile_rollouts: int = 4
    max_new_tokens: int | None = None
    min_gap: float = PRIVILEGED_GAP_THRESHOLD
    batch_size: int = 8

    def __post_init__(self) -> None:
        bounds = {
            "sample_size": (self.sample_size, 1, MAX_SAMPLE_SIZE),
            "samples_per_problem": (self.samples_per_problem, 1, MAX_SAMPLES_PER_PROBLEM),
            "profile_rollouts": (self.profile_rollouts, 1, MAX_PROFILE_ROLLOUTS),
            "batch_size": (self.batch_size, 1, 1024),
        }
        if self.max_new_tokens is not None:
            bounds["max_new_tokens"] = (self.max_new_tokens, 1, 32768)
        for name, (value, low, high) in bounds.items():
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        if not (isinstance(self.min_gap, int | float) and -1.0 <= self.min_gap <= 1.0):
            raise ValueError(f"min_gap must be a number in [-1, 1], got {self.min_gap!r}")


@dataclass
class Check:
    """One named check: ``status`` pass|warn|fail, what was found and the suggested fix."""

    name: str
    status: Status
    message: str
    fix: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreflightReport:
    """What :func:`run_preflight` found (JSON-able through :meth:`to_dict`).

    Accuracies are fractions in [0, 1] over ``n_problems x samples_per_problem`` samples (None
    when no problem has a reference answer); ``gap = teacher_accuracy - student_accuracy`` with
    ``gap_interval`` its paired 95% normal interval over problems (None below 2 problems).
    ``divergence_profile[n]`` is the mean divergence at rollout position ``n`` (nats) over the
    ``profile_counts[n]`` profiled rollouts that reach it, for the first
    :data:`PROFILE_POSITIONS` positions (a bounded document whatever ``max_new_tokens``);
    ``divergence_by_tenth`` is the mean over each tenth of the longest profiled rollout's span
    (all positions, token-weighted); ``divergence_mean`` over every profiled token.
    """

    status: Status
    checks: list[Check]
    n_problems: int
    samples_per_problem: int
    student_accuracy: float | None
    teacher_accuracy: float | None
    gap: float | None
    gap_interval: tuple[float, float] | None
    divergence: str
    divergence_profile: list[float]
    profile_counts: list[int]
    divergence_by_tenth: list[float]
    divergence_mean: float | None
    student_rollout_len_mean: float
    teacher_rollout_len_mean: float
    settings: dict[str, Any]
    seconds: float

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["gap_interval"] = list(self.gap_interval) if self.gap_interval else None
        return data

    def metrics(self) -> dict[str, float]:
        """Flat ``preflight/*`` metrics: accuracies and gap (when measured), the profile's mean
        and its first-token mean, the teacher's first-token entropy, and per check 0 (pass),
        1 (warn) or 2 (fail) as ``preflight/check/<name>``."""
        out: dict[str, float] = {}
        for name in ("student_accuracy", "teacher_accuracy", "gap"):
            value = getattr(self, name)
            if value is not None:
                out[f"preflight/{name}"] = float(value)
        if self.divergence_mean is not None:
            out["preflight/divergence_mean"] = float(self.divergence_mean)
            out["preflight/divergence_first_token"] = float(self.divergence_profile[0])
        entropy = self.check("teacher_first_tokens").details.get("teacher_entropy_mean")
        if entropy is not None:
            out["preflight/teacher_first_token_entropy"] = float(entropy)
        for check in self.checks:
            out[f"preflight/check/{check.name}"] = float(_RANK[check.status])
        out["preflight/status"] = float(_RANK[self.status])
        return out


# ------------------------------------------------------------------------------------- checks
def check_generation_prompt_state(
    tokenizer: Any, spec: JobSpec, pairs: Sequence[PromptPair]
) -> Check:
    """Check (a): every pair's prompts end in the same generation-prompt state."""
    name = "generation_prompt_state"
    if uses_chat_template(tokenizer, spec.prompts):
        header = generation_prompt_header_ids(tokenizer)
        for position, pair in enumerate(pairs):
            comparison = compare_generation_prompts(pair.student_ids, pair.teacher_ids, header)
            if not comparison.aligned:
                return Check(
                    name,
                    "fail",
                    f"problem {position}: {comparison.describe(tokenizer)}; the teacher scores "
                    "the student's first tokens where it expects others (e.g. a '<think>' the "
                    "student never opens)",
                    "leave prompts.teacher_thinking unset so it follows "
                    "prompts.student_thinking (and prompts.allow_thinking_mismatch false); "
                    "keep generation-prompt text out of prompts.teacher_template",
                    {
                        "student_tail": tokenizer.decode(list(comparison.student_tail)),
                        "teacher_tail": tokenizer.decode(list(comparison.teacher_tail)),
                    },
                )
        tail = (
            compare_generation_prompts(pairs[0].student_ids, pairs[0].teacher_ids, header)
            if pairs
            else None
        )
        shown = tokenizer.decode(list(tail.student_tail)) if tail else ""
        return Check(
            name,
            "pass",
            f"both prompts end in the same generation-prompt state ({shown!r} after the "
            "header) on every sampled problem",
            details={"tail": shown, "thinking": spec.prompts.student_thinking},
        )
    for position, pair in enumerate(pairs):
        student_cue = _last_line(tokenizer.decode(pair.student_ids))
        teacher_cue = _last_line(tokenizer.decode(pair.teacher_ids))
        if student_cue != teacher_cue:
            return Check(
                name,
                "warn",
                f"problem {position}: plain prompts end differently (student {student_cue!r}, "
                f"teacher {teacher_cue!r}): the rollout continues a different cue in each role",
                "end prompts.teacher_template with the same last line as "
                "prompts.student_template (the defaults both end with 'Answer:')",
                {"student_cue": student_cue, "teacher_cue": teacher_cue},
            )
    return Check(
        name,
        "pass",
        "no chat template; both plain prompts end with the same last line",
        details={"cue": _last_line(tokenizer.decode(pairs[0].student_ids)) if pairs else ""},
    )


def _last_line(text: str) -> str:
    return text.rstrip("\n").rsplit("\n", 1)[-1]


def check_rollout_tokenization(
    tokenizer: Any, pairs: Sequence[PromptPair], rollouts: Sequence[Sequence[int]]
) -> Check:
    """Check (b): each rollout's text, re-encoded after each role's prompt text, gives the
    rollout's own ids after both prompts."""
    name = "rollout_tokenization"
    differs_both = 0
    for position, (pair, rollout) in enumerate(zip(pairs, rollouts, strict=True)):
        if not rollout:
            continue
        student = _retokenized(tokenizer, pair.student_ids, rollout)
        teacher = _retokenized(tokenizer, pair.teacher_ids, rollout)
        if student != teacher:
            return Check(
                name,
                "fail",
                f"rollout {position} tokenizes differently after the teacher prompt than after "
                "the student prompt: the prompts' ends merge with the rollout text differently, "
                "so the two roles do not see the same boundary",
                "make both templates end with the same text (the chat template's generation "
                "prompt, or the same answer cue with a trailing separator)",
                {
                    "rollout": tokenizer.decode(list(rollout)[:32]),
                    "student_ids": student[:16],
                    "teacher_ids": teacher[:16],
                },
            )
        if student != list(rollout):
            differs_both += 1
    checked = sum(1 for r in rollouts if r)
    if differs_both:
        return Check(
            name,
            "warn",
            f"{differs_both} of {checked} rollouts re-encode to other ids than sampled (the "
            "same in both roles): harmless here (the engine scores ids and never re-encodes), "
            "but a pipeline that decodes and re-encodes rollouts would score other tokens",
            "score rollouts as token ids (this engine does); never decode and re-encode them",
            {"checked": checked, "non_canonical": differs_both},
        )
    return Check(
        name,
        "pass",
        f"{checked} rollouts tokenize identically after both prompts",
        details={"checked": checked},
    )


def _retokenized(tokenizer: Any, prompt: Sequence[int], rollout: Sequence[int]) -> list[int]:
    """The ids after the prompt when prompt text + rollout text are encoded together (the
    whole sequence's ids when the prompt's own ids are not a prefix: a merge at the boundary)."""
    text = tokenizer.decode(list(prompt)) + tokenizer.decode(list(rollout))
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if ids[: len(prompt)] == list(prompt):
        return ids[len(prompt) :]
    return ids[-len(rollout) - 1 :]  # a boundary merge: keep the boundary in the comparison


def check_teacher_first_tokens(
    teacher_entropy: torch.Tensor,
    teacher_top_prob: torch.Tensor,
    teacher_top_ids: torch.Tensor,
    finite: bool,
    vocab_size: int,
) -> Check:
    """Check (c) from the teacher's first-token statistics ``[N]`` (entropy in nats, top-token
    probability and id at each of N profiled first positions)."""
    name = "teacher_first_tokens"
    uniform = math.log(vocab_size)
    if not finite:
        return Check(
            name,
            "fail",
            "the teacher's logits on the student's first tokens are not finite (NaN/inf)",
            "check runtime.dtype (float16 overflows; use bfloat16 or float32) and the model "
            "weights",
        )
    if teacher_entropy.numel() == 0:
        return Check(name, "warn", "no rollout tokens to look at (empty rollouts)", None)
    mean = float(teacher_entropy.mean())
    details = {
        "teacher_entropy_mean": mean,
        "ln_vocab": uniform,
        "fraction_of_uniform": mean / uniform,
        "positions": int(teacher_entropy.numel()),
    }
    if mean >= NEAR_UNIFORM_FRACTION * uniform:
        return Check(
            name,
            "fail",
            f"the teacher is near-uniform on the student's first tokens (entropy {mean:.2f} "
            f"nats of ln V = {uniform:.2f}): it has nothing to teach, and against a peaked "
            "student JSD (beta 0.5) sits near ln 2 = 0.69 (the 'loss stuck at ln 2' symptom)",
            "check that base_model is the trained checkpoint (not a randomly initialised head), "
            "that the teacher prompt renders (prompts.teacher_template, chat template) and the "
            "dtype (runtime.dtype)",
            details,
        )
    one_token = bool((teacher_top_ids == teacher_top_ids[0]).all())
    if one_token and bool((teacher_top_prob > DEGENERATE_PROBABILITY).all()):
        return Check(
            name,
            "warn",
            f"the teacher puts more than {DEGENERATE_PROBABILITY:.0%} on one and the same token "
            f"(id {int(teacher_top_ids[0])}) at every first position: a degenerate target",
            "check the teacher prompt (does it end where an answer starts?) and the stop set",
            {**details, "token_id": int(teacher_top_ids[0])},
        )
    return Check(
        name,
        "pass",
        f"teacher entropy on the first tokens {mean:.2f} nats ({mean / uniform:.0%} of ln V)",
        details=details,
    )


def check_privileged_gap(
    student_accuracy: float | None,
    teacher_accuracy: float | None,
    interval: tuple[float, float] | None,
    min_gap: float,
) -> Check:
    """Check (d): the teacher with the reference beats the student by at least ``min_gap``."""
    name = "privileged_gap"
    if student_accuracy is None or teacher_accuracy is None:
        return Check(
            name,
            "warn",
            "no sampled problem has a reference answer (answer field or a \\boxed{} in the "
            "solution): the privileged gap cannot be measured",
            "set dataset.answer_field, or end solutions with \\boxed{...}",
        )
    gap = teacher_accuracy - student_accuracy
    details = {
        "student_accuracy": student_accuracy,
        "teacher_accuracy": teacher_accuracy,
        "gap": gap,
        "interval": list(interval) if interval else None,
        "min_gap": min_gap,
    }
    shown = (
        f"teacher with the reference {teacher_accuracy:.1%} vs student {student_accuracy:.1%} "
        f"(gap {gap:+.1%}"
        + (f", 95% interval {interval[0]:+.1%} to {interval[1]:+.1%}" if interval else "")
        + ")"
    )
    if gap >= min_gap - 1e-9:  # accuracies are k/n fractions: no rounding verdicts
        return Check(name, "pass", shown, details=details)
    why = (
        "the student already solves these problems"
        if student_accuracy >= 0.9
        else "the teacher does not make enough use of the reference"
    )
    return Check(
        name,
        "warn",
        f"{shown}: gap too small for self-distillation to help ({why}; threshold {min_gap:.0%})",
        "use harder problems for this model (or a larger model that can use the reference: "
        "paper Section 4.3.1), check that the teacher template shows the solution, and raise "
        "the sample size if the interval is wide",
        details,
    )


# -------------------------------------------------------------------------------- the sample
def sample_indices(num_examples: int, seed: int, size: int) -> list[int]:
    """The first ``size`` example indices of the trainer's first epoch (its seeded permutation,
    :class:`~opsd_engine.trainers.common.ExampleStream`); fewer when the dataset is smaller."""
    from opsd_engine.trainers.common import ExampleStream

    return ExampleStream(num_examples, seed).take(0, min(size, num_examples))


def _reference(example: Example) -> str | None:
    answer = example.answer.strip() if example.answer else ""
    if not answer and example.solution:
        answer = extract_answer(example.solution, strip_thinking=False, fallback_patterns=None)
        answer = answer.answer or ""
    return answer or None


def _paired_interval(differences: Sequence[float]) -> tuple[float, float] | None:
    n = len(differences)
    if n < 2:
        return None
    mean = sum(differences) / n
    variance = sum((d - mean) ** 2 for d in differences) / (n - 1)
    half = 1.96 * math.sqrt(variance / n)
    return (mean - half, mean + half)


# --------------------------------------------------------------------------------- the run
def run_preflight(
    spec: JobSpec,
    settings: PreflightSettings | None = None,
    *,
    examples: Sequence[Example] | None = None,
    model: Any = None,
    tokenizer: Any = None,
    device: torch.device | None = None,
    on_progress: ProgressCallback | None = None,
) -> PreflightReport:
    """Run the pre-flight of ``spec`` (see the module docstring) and return its report.

    ``examples`` default to the spec's dataset (loaded as the trainer loads it); ``model`` /
    ``tokenizer`` to the spec's base model (loaded without LoRA: at step 0 the adapter is
    zero). ``on_progress(phase, done, total)`` is called as each phase starts and ends
    (phases: ``student``, ``teacher``, ``profile``). Raises ``DatasetError`` /
    ``ModelLoadError`` for a bad dataset or model, ``ValueError`` for bad settings.
    """
    from opsd_engine.modeling import (
        load_base_model,
        load_tokenizer,
        resolve_device,
        resolve_dtype,
        stop_token_ids,
    )

    settings = settings or PreflightSettings()
    began = time.perf_counter()
    progress = on_progress or (lambda phase, done, total: None)
    if examples is None:
        examples = load_examples(
            spec.dataset_uri,
            problem_field=spec.dataset.problem_field,
            solution_field=spec.dataset.solution_field,
            answer_field=spec.dataset.answer_field,
            require_solution=True,
            limit=spec.dataset.limit,
        )
    if not examples:
        raise ValueError("the dataset has no examples")
    if tokenizer is None:
        tokenizer = load_tokenizer(spec.base_model)
    if model is None:
        device = device or resolve_device(spec.runtime.device)
        model = load_base_model(
            spec.base_model,
            dtype=resolve_dtype(spec.runtime.dtype, device),
            attn_implementation=spec.runtime.attn_implementation,
        ).to(device)
    device = device or next(model.parameters()).device

    chosen = [examples[i] for i in sample_indices(len(examples), spec.seed, settings.sample_size)]
    pairs = [
        build_prompt_pair(
            tokenizer,
            problem=e.problem,
            solution=e.solution or "",
            answer=e.answer,
            prompts=spec.prompts,
            system_prompt=e.system_prompt,
        )
        for e in chosen
    ]
    n = settings.samples_per_problem
    params = SamplingParams(
        max_new_tokens=settings.max_new_tokens or spec.max_new_tokens,
        temperature=spec.generation.temperature,
        top_p=spec.generation.top_p,
        top_k=spec.generation.top_k,
        num_generations=n,
    )
    backend = TransformersRolloutBackend(
        model,
        pad_id=int(tokenizer.pad_token_id),
        stop_ids=stop_token_ids(tokenizer, model, prompts=spec.prompts),
        device=device,
        batch_size=settings.batch_size,
    )
    was_training = model.training
    model.eval()
    try:
        # The student: the trainer's first-epoch rollout seeds for these examples.
        progress("student", 0, len(chosen))
        student = backend.generate(
            [p.student_ids for p in pairs],
            params,
            seeds=[rollout_seed(spec.seed, 0, e.index) for e in chosen],
        )
        progress("student", len(chosen), len(chosen))
        progress("teacher", 0, len(chosen))
        teacher = backend.generate(
            [p.teacher_ids for p in pairs],
            params,
            seeds=[derive_seed(_TEACHER_DOMAIN, spec.seed, e.index) for e in chosen],
        )
        progress("teacher", len(chosen), len(chosen))

        student_acc, teacher_acc, interval = _accuracies(tokenizer, chosen, student, teacher, n)
        firsts = [r for r in student if r.token_ids][: settings.profile_rollouts]
        profiled_pairs = [pairs[r.prompt_index] for r in firsts]
        progress("profile", 0, len(firsts))
        profile = _profile(model, tokenizer, spec, profiled_pairs, firsts)
        progress("profile", len(firsts), len(firsts))
    finally:
        model.train(was_training)

    vocab = int(model.get_output_embeddings().weight.shape[0])
    checks = [
        check_generation_prompt_state(tokenizer, spec, pairs),
        check_rollout_tokenization(
            tokenizer,
            [pairs[r.prompt_index] for r in student[: 4 * n]],
            [r.token_ids for r in student[: 4 * n]],
        ),
        check_teacher_first_tokens(
            profile["entropy"], profile["top_prob"], profile["top_ids"], profile["finite"], vocab
        ),
        check_privileged_gap(student_acc, teacher_acc, interval, settings.min_gap),
    ]
    status: Status = max((c.status for c in checks), key=lambda s: _RANK[s])
    gap = None if student_acc is None or teacher_acc is None else teacher_acc - student_acc
    return PreflightReport(
        status=status,
        checks=checks,
        n_problems=len(chosen),
        samples_per_problem=n,
        student_accuracy=student_acc,
        teacher_accuracy=teacher_acc,
        gap=gap,
        gap_interval=interval,
        divergence=profile["divergence"],
        divergence_profile=profile["values"][:PROFILE_POSITIONS],
        profile_counts=profile["counts"][:PROFILE_POSITIONS],
        divergence_by_tenth=_by_tenth(profile["values"], profile["counts"]),
        divergence_mean=_weighted_mean(profile["values"], profile["counts"]),
        student_rollout_len_mean=_mean_len(student),
        teacher_rollout_len_mean=_mean_len(teacher),
        settings={**asdict(settings), "max_new_tokens": params.max_new_tokens},
        seconds=time.perf_counter() - began,
    )


def _weighted_mean(values: Sequence[float], counts: Sequence[int]) -> float | None:
    total = sum(counts)
    if not total:
        return None
    return sum(v * c for v, c in zip(values, counts, strict=True)) / total


def _by_tenth(values: Sequence[float], counts: Sequence[int]) -> list[float]:
    """Token-weighted means over ten equal spans of positions (fewer when shorter)."""
    if not values:
        return []
    width = max(math.ceil(len(values) / 10), 1)
    out = []
    for start in range(0, len(values), width):
        mean = _weighted_mean(values[start : start + width], counts[start : start + width])
        out.append(0.0 if mean is None else mean)
    return out


def _mean_len(rollouts: Sequence[Rollout]) -> float:
    return sum(len(r.token_ids) for r in rollouts) / max(len(rollouts), 1)


def _accuracies(
    tokenizer: Any,
    examples: Sequence[Example],
    student: Sequence[Rollout],
    teacher: Sequence[Rollout],
    n: int,
) -> tuple[float | None, float | None, tuple[float, float] | None]:
    """Mean correctness of both roles over the problems with a reference answer, and the
    paired interval of the per-problem difference."""
    per_role: list[list[float]] = [[], []]
    differences = []
    for position, example in enumerate(examples):
        reference = _reference(example)
        if reference is None:
            continue
        rates = []
        for rollouts, out in ((student, per_role[0]), (teacher, per_role[1])):
            mine = rollouts[position * n : (position + 1) * n]
            right = sum(
                grade(tokenizer.decode(r.token_ids, skip_special_tokens=True), reference).correct
                for r in mine
            )
            out.append(right / n)
            rates.append(right / n)
        differences.append(rates[1] - rates[0])
    if not differences:
        return None, None, None
    count = len(differences)
    return sum(per_role[0]) / count, sum(per_role[1]) / count, _paired_interval(differences)


def _profile(
    model: Any,
    tokenizer: Any,
    spec: JobSpec,
    pairs: Sequence[PromptPair],
    rollouts: Sequence[Rollout],
) -> dict[str, Any]:
    """Per-position divergence of teacher vs student on each rollout (one rollout at a time,
    the head applied to ``_CHUNK`` positions at once: memory never holds ``[T, V]``), plus the
    teacher's entropy / top token on the first :data:`FIRST_TOKENS` positions."""
    divergence = spec.divergence if spec.divergence != "sampled_token" else "forward_kl"
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
    head = lm.get_output_embeddings()
    device = next(model.parameters()).device
    pad = int(tokenizer.pad_token_id)
    sums: list[float] = []
    counts: list[int] = []
    entropies, top_probs, top_ids = [], [], []
    finite = True
    with torch.no_grad():
        for pair, rollout in zip(pairs, rollouts, strict=True):
            ids = list(rollout.token_ids)
            hidden = {}
            for role, prompt in (("student", pair.student_ids), ("teacher", pair.teacher_ids)):
                batch = assemble_scoring_batch([prompt], [ids], pad_id=pad)
                out = backbone(
                    input_ids=batch.input_ids.to(device),
                    attention_mask=batch.attention_mask.to(device),
                    position_ids=batch.position_ids.to(device),
                    use_cache=False,
                )
                hidden[role] = batch.at_rollout(out.last_hidden_state)[0]  # [R, H]
            for start in range(0, len(ids), _CHUNK):
                stop = min(start + _CHUNK, len(ids))
                student_logits = head(hidden["student"][start:stop]).float()
                teacher_logits = head(hidden["teacher"][start:stop]).float()
                finite = finite and bool(torch.isfinite(teacher_logits).all())
                values = token_divergence(
                    student_logits,
                    teacher_logits,
                    divergence=divergence,
                    beta=spec.beta,
                    temperature=spec.loss.temperature,
                )
                for offset, value in enumerate(values.tolist()):
                    position = start + offset
                    if position == len(sums):
                        sums.append(0.0)
                        counts.append(0)
                    sums[position] += value
                    counts[position] += 1
                if start < FIRST_TOKENS:
                    first = teacher_logits[: FIRST_TOKENS - start]
                    entropies.append(token_entropy(first))
                    probs = torch.softmax(first, dim=-1).max(dim=-1)
                    top_probs.append(probs.values)
                    top_ids.append(probs.indices)
    cat = torch.cat
    return {
        "divergence": divergence,
        "values": [s / c for s, c in zip(sums, counts, strict=True)],
        "counts": counts,
        "entropy": cat(entropies) if entropies else torch.empty(0),
        "top_prob": cat(top_probs) if top_probs else torch.empty(0),
        "top_ids": cat(top_ids) if top_ids else torch.empty(0, dtype=torch.long),
        "finite": finite,
    }


# ------------------------------------------------------------------------------ text report
_BADGE = {"pass": "PASS", "warn": "WARN", "fail": "FAIL"}


def format_report(report: PreflightReport | dict[str, Any]) -> str:
    """The report as text for people: the gap, the profile (first positions and by decile) and
    one line per check with its fix. Takes a report or its :meth:`~PreflightReport.to_dict`."""
    data = report.to_dict() if isinstance(report, PreflightReport) else report

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1%}"

    lines = [
        f"pre-flight: {_BADGE[data['status']]} ({data['n_problems']} problems x "
        f"{data['samples_per_problem']} samples, {data['seconds']:.1f}s)",
        f"  student without the reference: {pct(data['student_accuracy'])}",
        f"  teacher with the reference:    {pct(data['teacher_accuracy'])}",
    ]
    if data["gap"] is not None:
        interval = data.get("gap_interval")
        extra = f" (95% interval {interval[0]:+.1%} to {interval[1]:+.1%})" if interval else ""
        lines.append(f"  privileged gap:                {data['gap']:+.1%}{extra}")
    profile = data["divergence_profile"]
    if profile:
        head = " ".join(f"{v:.3f}" for v in profile[:FIRST_TOKENS])
        lines.append(
            f"  {data['divergence']} per position (nats), first {min(len(profile), FIRST_TOKENS)}: "
            f"{head}"
        )
        tenths = data.get("divergence_by_tenth") or []
        if len(profile) > FIRST_TOKENS and tenths:
            lines.append("  by tenth of the rollout: " + " ".join(f"{v:.3f}" for v in tenths))
    lines.append("  checks:")
    for check in data["checks"]:
        lines.append(f"    [{_BADGE[check['status']]}] {check['name']}: {check['message']}")
        if check["status"] != "pass" and check.get("fix"):
            lines.append(f"           fix: {check['fix']}")
    return "\n".join(lines)


# ------------------------------------------------------------------- before a job's first step
class PreflightFailed(RuntimeError):
    """A job's ``preflight.run_first`` found its report as bad as ``preflight.stop_on``: the
    job stops before training. The message names the checks and their fixes."""

    def __init__(self, report: PreflightReport, stop_on: str) -> None:
        self.report = report
        flagged = [c for c in report.checks if _RANK[c.status] >= _RANK[stop_on]]
        lines = [
            f"{c.name}: {c.status}: {c.message}" + (f" (fix: {c.fix})" if c.fix else "")
            for c in flagged
        ]
        super().__init__(
            f"pre-flight {report.status} (preflight.stop_on: {stop_on}), training not started; "
            + "; ".join(lines)
        )


def settings_from_spec(spec: JobSpec, **overrides: Any) -> PreflightSettings:
    """:class:`PreflightSettings` from the spec's ``preflight`` group; ``overrides`` that are
    not ``None`` win (command-line options, a request's fields)."""
    group = spec.preflight
    values: dict[str, Any] = {
        "sample_size": group.sample_size,
        "samples_per_problem": group.samples_per_problem,
        "profile_rollouts": group.profile_rollouts,
        "max_new_tokens": group.max_new_tokens,
        "min_gap": PRIVILEGED_GAP_THRESHOLD if group.min_gap is None else group.min_gap,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return PreflightSettings(**values)


def run_before_training(
    spec: JobSpec, policy: Any, examples: Sequence[Example], callbacks: Any
) -> PreflightReport:
    """The pre-flight of ``spec`` on the trainer's own model (adapter disabled: at step 0 it is
    the base either way), tokenizer and examples. Reports ``preflight_started`` and
    ``preflight_finished`` events (the latter with the whole report as ``data["report"]``) and
    the ``preflight/*`` metrics at step 0 through ``callbacks``; raises
    :class:`PreflightFailed` when the report's status reaches ``spec.preflight.stop_on``."""
    settings = settings_from_spec(spec)
    callbacks.on_event(
        "preflight_started",
        f"pre-flight before training on {min(settings.sample_size, len(examples))} problems",
        asdict(settings),
    )
    model = policy.peft_model
    with model.disable_adapter():
        report = run_preflight(
            spec,
            settings,
            examples=examples,
            model=model,
            tokenizer=policy.tokenizer,
            device=policy.device,
        )
    callbacks.on_metrics(0, report.metrics())
    flagged = {c.name: c.status for c in report.checks if c.status != "pass"}
    gap = f", privileged gap {report.gap:+.1%}" if report.gap is not None else ""
    callbacks.on_event(
        "preflight_finished",
        f"pre-flight: {report.status}{gap}"
        + (f" ({', '.join(f'{k}: {v}' for k, v in flagged.items())})" if flagged else ""),
        {"status": report.status, "gap": report.gap, "report": report.to_dict()},
    )
    stop_on = spec.preflight.stop_on
    if stop_on != "never" and _RANK[report.status] >= _RANK[stop_on]:
        raise PreflightFailed(report, stop_on)
    return report
