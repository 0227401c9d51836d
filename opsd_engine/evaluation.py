"""Benchmark evaluation of a policy: sample n answers per problem, grade them, summarize.

Two entry points share one grading path (:func:`opsd_engine.grading.grade` per sample, then
:func:`opsd_engine.grading.summarize` for avg@n, pass@k for every k in 1..n and majority vote):

* :func:`evaluate_model` runs in-process: the student prompt of training (same template, same
  chat template; thinking mode per :class:`EvalSettings`), batched sampling with the engine's
  rollout backend (``n`` samples per problem), completions decoded without special tokens.
* :func:`evaluate_texts` grades outputs produced elsewhere (e.g. an OpenAI-compatible inference
  server) against the reference answers.

The paper's evaluation (Table 5) is average@16 at temperature 0.6 / top-p 0.95 in thinking mode
with long generations; :class:`EvalSettings` defaults to that apart from the length.

Reference answers come from ``Example.answer``; when a row has none, the last ``\\boxed{}`` of its
solution is used; when it has neither, :class:`EvalDataError` names the row.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from opsd_engine.config import PromptConfig
from opsd_engine.data import Example
from opsd_engine.grading import BenchmarkSummary, extract_answer, grade, summarize
from opsd_engine.modeling import stop_token_ids
from opsd_engine.prompts import encode_prompt, render_student_text
from opsd_engine.rollout import SamplingParams, TransformersRolloutBackend

__all__ = [
    "EvalDataError",
    "EvalProgress",
    "EvalResult",
    "EvalSettings",
    "ProgressCallback",
    "SampleResult",
    "evaluate_model",
    "evaluate_texts",
    "reference_answers",
    "student_prompt_ids",
    "summary_metrics",
    "throttled",
]

logger = logging.getLogger(__name__)


class EvalDataError(ValueError):
    """An eval example cannot be graded (no reference answer); the message names the row."""


@dataclass
class EvalSettings:
    """How to sample for an evaluation (paper Table 5: n=16, T=0.6, top-p 0.95, thinking).

    ``top_k`` 0 disables top-k. ``thinking`` is Qwen3's ``enable_thinking``; ``None`` uses the
    student's setting of the prompt config (``PromptConfig.student_thinking``, itself ``None`` =
    the template's default). ``batch_size`` is the number of sequences per ``generate`` call:
    ``max(1, batch_size // n)`` problems, each with its ``n`` samples. ``strip_thinking``:
    grade only what follows ``</think>``.
    """

    n: int = 16
    max_new_tokens: int = 2048
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    thinking: bool | None = None
    batch_size: int = 8
    strip_thinking: bool = True

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class EvalProgress:
    """How far an evaluation is: problems done of ``total``, samples drawn, seconds spent.

    ``samples`` counts the ``n`` samples of every problem done (greedy decoding samples once and
    counts ``n``: it stands for them). ``samples_per_s`` is ``samples / seconds`` (0 before any
    time has passed).
    """

    done: int
    total: int
    samples: int
    seconds: float

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, float | int]:
        """``{"done", "total", "samples", "seconds", "samples_per_s"}`` (JSON-able)."""
        return {
            "done": self.done,
            "total": self.total,
            "samples": self.samples,
            "seconds": round(self.seconds, 3),
            "samples_per_s": round(self.samples_per_s, 3),
        }


ProgressCallback = Callable[[EvalProgress], None]
PROGRESS_EVERY_SECONDS = 5.0


def throttled(
    callback: ProgressCallback, every: float = PROGRESS_EVERY_SECONDS
) -> ProgressCallback:
    """`callback`, called at the start (0 done), at the end (all done) and in between at most
    once per `every` seconds of the evaluation's own clock (`EvalProgress.seconds`): what a
    store or an event log can take from an eval of thousands of batches."""
    last: list[float] = []

    def forward(progress: EvalProgress) -> None:
        due = not last or progress.seconds - last[-1] >= every
        if due or progress.done in (0, progress.total):
            last.append(progress.seconds)
            callback(progress)

    return forward


@dataclass
class SampleResult:
    """One graded sample. ``num_tokens`` is the completion length (0 when not known)."""

    problem_index: int
    sample_index: int
    text: str
    extracted: str | None
    correct: bool
    decided_by: str
    num_tokens: int


@dataclass
class EvalResult:
    """The summary of a benchmark run plus every graded sample (problem-major order)."""

    summary: BenchmarkSummary
    samples: list[SampleResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable: ``{"summary": BenchmarkSummary.to_dict(), "samples": [...]}``."""
        return {
            "summary": self.summary.to_dict(),
            "samples": [asdict(sample) for sample in self.samples],
        }


# --------------------------------------------------------------------------------------------
# Building blocks (also used by the service's HTTP eval path)
# --------------------------------------------------------------------------------------------


def reference_answers(examples: Sequence[Example]) -> list[str]:
    """Each example's reference answer: ``answer``, else the last ``\\boxed{}`` of ``solution``."""
    answers: list[str] = []
    for position, example in enumerate(examples):
        answer = example.answer.strip() if example.answer else ""
        if not answer and example.solution:
            found = extract_answer(example.solution, strip_thinking=False, fallback_patterns=None)
            answer = found.answer or ""
        if not answer:
            raise EvalDataError(
                f"eval row index {example.index} (example {position}) has no reference answer: "
                "set its answer field, or end its solution with \\boxed{...}"
            )
        answers.append(answer)
    return answers


def student_prompt_ids(
    tokenizer: Any,
    problem: str,
    prompts: PromptConfig,
    *,
    thinking: bool | None,
    system_prompt: str | None = None,
) -> list[int]:
    """Token ids of the student prompt of training for ``problem`` (chat template when used;
    ``system_prompt`` is the row's own, used unless the spec sets one)."""
    return encode_prompt(
        tokenizer,
        render_student_text(problem, prompts),
        prompts,
        thinking=thinking,
        system_prompt=system_prompt,
    )


def summary_metrics(
    summary: BenchmarkSummary, *, prefix: str = "eval/", ks: Sequence[int] | None = None
) -> dict[str, float]:
    """Flat metrics of a summary: ``{prefix}avg@{n}``, ``{prefix}pass@{k}``, ``{prefix}majority``.

    ``ks`` selects the pass@k values (default: every k in 1..n).
    """
    n = summary.n_samples
    out = {f"{prefix}avg@{n}": float(summary.avg_at_n)}
    for k in ks if ks is not None else range(1, n + 1):
        if k in summary.pass_at_k:
            out[f"{prefix}pass@{k}"] = float(summary.pass_at_k[k])
    if summary.majority_vote is not None:
        out[f"{prefix}majority"] = float(summary.majority_vote)
    return out


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def evaluate_texts(
    outputs: Sequence[Sequence[str]],
    answers: Sequence[str],
    *,
    strip_thinking: bool = True,
    num_tokens: Sequence[Sequence[int]] | None = None,
) -> EvalResult:
    """Grade ``outputs[i][j]`` (sample j of problem i) against ``answers[i]`` and summarize.

    Every problem must have the same number of samples. ``num_tokens``, if known, has the shape
    of ``outputs``.
    """
    if len(outputs) != len(answers):
        raise ValueError(f"{len(outputs)} problems of outputs but {len(answers)} answers")
    if num_tokens is not None and len(num_tokens) != len(outputs):
        raise ValueError(f"num_tokens has {len(num_tokens)} problems, outputs {len(outputs)}")
    samples: list[SampleResult] = []
    correct: list[list[bool]] = []
    extracted: list[list[str | None]] = []
    for i, (texts, answer) in enumerate(zip(outputs, answers, strict=True)):
        row_correct: list[bool] = []
        row_extracted: list[str | None] = []
        for j, text in enumerate(texts):
            verdict = grade(text, answer, strip_thinking=strip_thinking)
            row_correct.append(verdict.correct)
            row_extracted.append(verdict.extracted)
            samples.append(
                SampleResult(
                    problem_index=i,
                    sample_index=j,
                    text=text,
                    extracted=verdict.extracted,
                    correct=verdict.correct,
                    decided_by=verdict.decided_by,
                    num_tokens=int(num_tokens[i][j]) if num_tokens is not None else 0,
                )
            )
        correct.append(row_correct)
        extracted.append(row_extracted)
    return EvalResult(summary=summarize(correct, extracted), samples=samples)


def evaluate_model(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    settings: EvalSettings,
    *,
    prompts: PromptConfig | None = None,
    device: torch.device | None = None,
    progress: bool = False,
    on_progress: ProgressCallback | None = None,
) -> EvalResult:
    """Sample ``settings.n`` completions per example from ``model`` and grade them.

    ``model`` is anything with ``generate`` (a transformers causal LM or a PEFT model, in the
    adapter state the caller chose). Prompts are the student prompts of ``prompts`` (default
    :class:`PromptConfig`). Sampling draws from torch's global RNG; the caller seeds or
    saves/restores it. The model's train/eval mode is restored afterwards. ``on_progress`` is
    called with an :class:`EvalProgress` before the first batch (0 done) and after every batch
    of ``generate`` (problems done so far); ``progress`` shows a tqdm bar instead.
    """
    if not examples:
        raise ValueError("evaluate_model needs at least one example")
    prompts = prompts or PromptConfig()
    answers = reference_answers(examples)
    if device is None:
        device = next(model.parameters()).device
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token (load it with load_tokenizer)")
    thinking = settings.thinking if settings.thinking is not None else prompts.student_thinking
    prompt_ids = [
        student_prompt_ids(
            tokenizer,
            example.problem,
            prompts,
            thinking=thinking,
            system_prompt=example.system_prompt,
        )
        for example in examples
    ]
    # Greedy decoding (temperature 0) has one answer per problem: sample it once, repeat it n times.
    per_problem = 1 if settings.temperature == 0 else settings.n
    per_call = max(1, settings.batch_size // per_problem)
    backend = TransformersRolloutBackend(
        model,
        pad_id=int(tokenizer.pad_token_id),
        stop_ids=stop_token_ids(tokenizer, model, prompts=prompts),
        device=device,
        batch_size=per_call,
    )
    params = SamplingParams(
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        num_generations=per_problem,
    )
    texts: list[list[str]] = [[] for _ in examples]
    lengths: list[list[int]] = [[] for _ in examples]
    starts = range(0, len(prompt_ids), per_call)
    iterator: Any = starts
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(starts, desc="eval", unit="batch", total=len(starts))
    began = time.perf_counter()
    total = len(prompt_ids)
    if on_progress is not None:
        on_progress(EvalProgress(done=0, total=total, samples=0, seconds=0.0))
    for start in iterator:
        chunk = prompt_ids[start : start + per_call]
        for rollout in backend.generate(chunk, params):
            index = start + rollout.prompt_index
            copies = settings.n // per_problem
            text = tokenizer.decode(rollout.token_ids, skip_special_tokens=True)
            texts[index].extend([text] * copies)
            lengths[index].extend([len(rollout.token_ids)] * copies)
        if on_progress is not None:
            done = min(total, start + len(chunk))
            seconds = time.perf_counter() - began
            on_progress(EvalProgress(done, total, done * settings.n, seconds))
    logger.info(
        "evaluated %d problems x %d samples (%d tokens)",
        len(examples),
        settings.n,
        sum(sum(row) for row in lengths),
    )
    return evaluate_texts(
        texts, answers, strip_thinking=settings.strip_thinking, num_tokens=lengths
    )
