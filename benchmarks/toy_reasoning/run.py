"""Toy replication of the paper's comparison: OPSD vs SFT vs GRPO from small bases, on the CPU.

    python -m benchmarks.toy_reasoning.run            # both task families, 3 seeds (~20 min)
    python -m benchmarks.toy_reasoning.run --quick    # OPSD only, 1 seed, first family
    python -m benchmarks.toy_reasoning.run --tune --family carries   # learning-rate grid

Two task families (``task.py``), each from its own base (``base.py``):

* ``chains``: the base's weakness is behavioural (it often answers without working); every method
  fixes it within a few steps and ends near 100%. Kept as the first family (and the quick
  start's task); the methods only.
* ``carries``: the base always works the steps and gets steps wrong; references are in a foreign
  style (another model's traces) with an own-style control; OPSD ablations (objective, rollout
  length, teacher) and a capacity run (OPSD from a smaller base with a small privileged gap).
  The benchmark checks and prints the issue's requirements on this family (``requirements``)
  and gives each of the paper's claims a verdict from paired per-seed differences (``claims``).

Every run is a normal job spec trained by the engine's own trainers (same spec apart from
`method`, the learning rate and the ablated field; matched problems per step and optimizer
steps), evaluated on held-out problems through `opsd_engine.evaluation` during training from a
private RNG stream. Runs go to ``--jobs`` worker processes of one torch thread each (default 2),
so each run's numbers do not depend on which worker ran it or on the machine's load. Outputs:
``results.md``, ``results.json`` and one plot per family, ``results-<family>.png`` (held-out
accuracy against optimizer steps, generated tokens and training wall time).

Nothing here is tuned per seed or picked after the fact: learning rates were chosen per method
once (`--tune`) on validation problems disjoint from the held-out ones and on seed 100, which is
not one of the reported seeds.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import multiprocessing
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = HERE / ".cache"


# ------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Plan:
    """Everything one family's comparison depends on (recorded whole in results.json). The
    defaults are the ``chains`` family's (also the quick start's job spec)."""

    family: str = "chains"
    seeds: tuple[int, ...] = (0, 1, 2)
    n_train: int = 512
    n_validation: int = 128  # learning-rate tuning only
    n_heldout: int = 128  # every reported number
    steps: int = 30
    problems_per_step: int = 8  # every method: batch_size 8, grad_accum 1
    max_new_tokens: int = 48  # a worked solution is 17-42 tokens with its EOS
    grpo_generations: int = 8  # paper Table 6
    # Chosen with --tune (tuning.md): the best final validation accuracy per method, seed 100.
    learning_rates: tuple[tuple[str, float], ...] = (
        ("opsd", 5e-4),
        ("sft", 5e-4),
        ("grpo", 1e-3),
    )
    lora_r: int = 16
    lora_alpha: float = 32.0
    eval_n: int = 8
    eval_temperature: float = 0.6
    eval_top_p: float = 0.95
    eval_points: tuple[int, ...] = (5, 10, 20, 30)  # optimizer steps (0 = the base)
    ablation_eval_points: tuple[int, ...] = (30,)  # ablations: final accuracy only
    methods: tuple[str, ...] = ("opsd", "sft", "grpo")
    ablations: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    curve_ablations: tuple[str, ...] = ()  # ablations evaluated at every eval point
    token_threshold: float = 0.95  # "tokens to reach" this held-out accuracy (below the ceiling)
    reference_style: str = "worked"  # the training set's reference solutions (task.Problem.row)
    control_methods: tuple[str, ...] = ()  # rerun with references in the base's own style
    capacity: bool = False  # OPSD from base.CAPACITY_BASE too (the capacity finding)

    tune_seed: int = 100  # learning rates are chosen on this seed, never on a reported one
    tune_grid: tuple[tuple[str, tuple[float, ...]], ...] = (
        ("opsd", (1e-4, 2e-4, 5e-4, 1e-3, 2e-3)),
        ("sft", (1e-4, 2e-4, 5e-4, 1e-3, 2e-3)),
        ("grpo", (1e-4, 2e-4, 5e-4, 1e-3, 2e-3)),
    )

    def learning_rate(self, method: str) -> float:
        return dict(self.learning_rates)[method]


CONTROL = "own-style references"  # suffix of the control runs' names
CAPACITY = "opsd capacity base"

PLANS: dict[str, Plan] = {
    "chains": Plan(eval_points=(10, 20, 30)),
    "carries": Plan(
        family="carries",
        max_new_tokens=64,  # a worked solution is 21-49 tokens with its EOS
        # Chosen with --tune --family carries (tuning-carries.md), seed 100.
        learning_rates=(("opsd", 2e-3), ("sft", 5e-4), ("grpo", 1e-3)),
        eval_points=(10, 20, 30),
        ablations=(
            ("opsd sampled_token", (("divergence", "sampled_token"),)),
            ("opsd max_new_tokens 24", (("max_new_tokens", 24),)),
            ("opsd teacher current", (("teacher", "current"),)),
        ),
        token_threshold=0.6,
        reference_style="foreign",
        control_methods=("opsd", "sft"),
        capacity=True,
        tune_grid=(
            ("opsd", (5e-4, 1e-3, 2e-3, 4e-3)),
            ("sft", (1e-4, 2e-4, 5e-4, 1e-3, 2e-3)),
            ("grpo", (5e-4, 1e-3, 2e-3)),
        ),
    ),
}
QUICK = Plan(seeds=(0,), methods=("opsd",), eval_points=(10, 30))


@dataclass
class EvalPoint:
    step: int
    generated_tokens: float
    avg: float  # avg@n: mean per-sample accuracy
    pass_at_k: dict[int, float]
    majority: float | None
    seconds: float
    train_seconds: float = 0.0  # training wall time up to this step (evaluations excluded)
    kinds: dict[str, int] | None = None  # task.classify counts (+ "foreign_style") of samples


@dataclass
class RunRecord:
    name: str
    method: str
    seed: int
    spec: dict[str, Any]
    points: list[EvalPoint] = field(default_factory=list)
    metrics: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    wall_seconds: float = 0.0
    family: str = "chains"

    @property
    def final(self) -> EvalPoint:
        return self.points[-1]


# ------------------------------------------------------------------------------ evaluation
def _eval_settings(plan: Plan) -> Any:
    from opsd_engine.evaluation import EvalSettings

    return EvalSettings(
        n=plan.eval_n,
        max_new_tokens=plan.max_new_tokens,
        temperature=plan.eval_temperature,
        top_p=plan.eval_top_p,
        batch_size=32 * plan.eval_n,
    )


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Any],
    plan: Plan,
    *,
    seed: int,
    step: int,
    generated_tokens: float,
    prompts: Any = None,
    classify_problems: bool = True,
) -> EvalPoint:
    """avg@n / pass@k on ``examples``, sampling from a private RNG stream (training unaffected);
    with ``classify_problems`` each sample's kind (`task.classify`) is counted too."""
    import torch

    from benchmarks.toy_reasoning.base import TOY_PROMPTS
    from benchmarks.toy_reasoning.task import classify, uses_foreign_style
    from opsd_engine.evaluation import evaluate_model

    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(10_000 + seed)
        result = evaluate_model(
            model, tokenizer, examples, _eval_settings(plan), prompts=prompts or TOY_PROMPTS
        )
    kinds = None
    if classify_problems:
        counter = collections.Counter(
            classify(examples[s.problem_index].problem, s.text) for s in result.samples
        )
        counter["foreign_style"] = sum(uses_foreign_style(s.text) for s in result.samples)
        kinds = dict(counter)
    summary = result.summary
    return EvalPoint(
        step=step,
        generated_tokens=generated_tokens,
        avg=summary.avg_at_n,
        pass_at_k=dict(summary.pass_at_k),
        majority=summary.majority_vote,
        seconds=time.perf_counter() - started,
        kinds=kinds,
    )


def teacher_view_examples(examples: Sequence[Any]) -> tuple[list[Any], Any]:
    """The problems as the teacher sees them (reference in context), for calibration."""
    from benchmarks.toy_reasoning.base import TOY_PROMPTS
    from opsd_engine.data import Example
    from opsd_engine.prompts import render_teacher_text

    prompts = TOY_PROMPTS.model_copy(update={"student_template": "{problem}"})
    rendered = [
        Example(
            problem=render_teacher_text(e.problem, e.solution, e.answer, TOY_PROMPTS),
            solution=e.solution,
            answer=e.answer,
            index=e.index,
        )
        for e in examples
    ]
    return rendered, prompts


# --------------------------------------------------------------------------------- training
def make_spec(
    plan: Plan,
    method: str,
    seed: int,
    base_dir: Path,
    train_path: Path,
    overrides: Sequence[tuple[str, Any]] = (),
) -> Any:
    """The job spec of one run: the same for every method apart from `method` and the LR."""
    from benchmarks.toy_reasoning.base import TOY_PROMPTS
    from opsd_engine.config import parse_spec

    body: dict[str, Any] = {
        "base_model": str(base_dir),
        "dataset_uri": str(train_path),
        "method": method,
        "max_new_tokens": plan.max_new_tokens,
        "seed": seed,
        "lora": {"r": plan.lora_r, "alpha": plan.lora_alpha, "dropout": 0.0},
        "optim": {
            "learning_rate": plan.learning_rate(method),
            "batch_size": plan.problems_per_step,
            "grad_accum": 1,
            "max_steps": plan.steps,
            "warmup_ratio": 0.1,
        },
        "prompts": TOY_PROMPTS.model_dump(),
        "runtime": {"dtype": "float32", "device": "cpu", "gradient_checkpointing": False},
    }
    if method == "grpo":
        body["generation"] = {"num_generations": plan.grpo_generations}
    for key, value in overrides:  # "group.field" sets one field of a group
        group, _, name = key.rpartition(".")
        (body.setdefault(group, {}) if group else body)[name] = value
    return parse_spec(body)


def _trainer_class(method: str) -> Any:
    if method == "opsd":
        from opsd_engine.trainers.opsd import OPSDTrainer

        return OPSDTrainer
    if method == "sft":
        from opsd_engine.trainers.sft import SFTTrainer

        return SFTTrainer
    from opsd_engine.trainers.grpo import GRPOTrainer

    return GRPOTrainer


# The per-step training metrics results.json keeps (all methods' main signals, token counts).
KEPT_METRICS = frozenset(
    {
        "loss",
        "divergence",
        "nll",
        "reward_mean",
        "reward_std",
        "zero_variance_group_frac",
        "rollout_len_mean",
        "completion_len_mean",
        "grad_norm",
        "lr",
        "generated_tokens",
        "generated_tokens_total",
        "train_tokens",
        "time_step_s",
    }
)


class _Recorder:
    """Trainer callbacks: keeps every step's metrics and evaluates at the plan's eval points."""

    def __init__(self, record: RunRecord, on_eval: Callable[[int, float], EvalPoint]) -> None:
        self.record, self.on_eval = record, on_eval
        self.eval_steps: set[int] = set()

    def on_event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        return None

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.record.metrics.append(
            {"step": step, **{k: v for k, v in metrics.items() if k in KEPT_METRICS}}
        )
        self.record.train_seconds += metrics.get("time_step_s", 0.0)
        if step in self.eval_steps:
            point = self.on_eval(step, metrics["generated_tokens_total"])
            point.train_seconds = self.record.train_seconds
            self.record.points.append(point)
            self.record.eval_seconds += point.seconds

    def on_checkpoint(self, step: int, path: Path) -> None:
        return None

    def should_stop(self) -> bool:
        return False


def run_method(
    plan: Plan,
    name: str,
    spec: Any,
    train_examples: Sequence[Any],
    heldout: Sequence[Any],
    base_point: EvalPoint | None,
    log: Callable[[str], None],
    eval_points: Sequence[int] | None = None,
) -> RunRecord:
    """Train one run and evaluate it at ``eval_points``; ``base_point`` (if given) is its step 0."""
    from opsd_engine.config import spec_to_dict

    started = time.perf_counter()
    record = RunRecord(
        name=name, method=spec.method, seed=spec.seed, spec=spec_to_dict(spec), family=plan.family
    )
    if base_point is not None:
        record.points.append(replace(base_point, seconds=0.0))
    with tempfile.TemporaryDirectory(prefix="toy-run-") as out:
        trainer_box: list[Any] = []

        def on_eval(step: int, tokens: float) -> EvalPoint:
            trainer = trainer_box[0]
            point = evaluate(
                trainer.policy.peft_model,
                trainer.tokenizer,
                heldout,
                plan,
                seed=spec.seed,
                step=step,
                generated_tokens=tokens,
            )
            log(
                f"    {plan.family}: {name} seed {spec.seed} step {step:>3}: avg@{plan.eval_n} "
                f"{point.avg:.3f}  pass@{plan.eval_n} {point.pass_at_k[plan.eval_n]:.3f}  "
                f"generated {int(tokens):,} tokens"
            )
            return point

        recorder = _Recorder(record, on_eval)
        points = plan.eval_points if eval_points is None else eval_points
        recorder.eval_steps = {s for s in points if 0 < s <= plan.steps}
        trainer = _trainer_class(spec.method)(
            spec, out, callbacks=recorder, examples=list(train_examples)
        )
        trainer_box.append(trainer)
        result = trainer.train()
        assert result.status == "succeeded", result
    record.wall_seconds = time.perf_counter() - started
    return record


# ------------------------------------------------------------------------ worker processes
@dataclass(frozen=True)
class RunTask:
    """One training run, as a worker process gets it (paths, not loaded objects)."""

    plan: Plan
    name: str
    method: str
    seed: int
    base_dir: str
    train_path: str
    eval_path: str
    overrides: tuple[tuple[str, Any], ...] = ()
    eval_points: tuple[int, ...] = ()


@dataclass(frozen=True)
class BaseEvalTask:
    """One evaluation of a base: ``view`` student (problem only) or teacher (reference in
    context, the reference style of ``eval_path``'s solutions)."""

    plan: Plan
    base_dir: str
    eval_path: str
    seed: int
    view: str  # "student" | "teacher"


def _init_worker(threads: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    import torch
    import transformers

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _print(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def do_pretrain(cache: str, config: Any) -> tuple[str, bool, float]:
    """Build (or load) one base; returns (path, cached, pretraining seconds)."""
    from benchmarks.toy_reasoning.base import build_base

    path, cached = build_base(Path(cache), config, progress=_print)
    seconds = json.loads((path / "pretrain.json").read_text())["pretrain_seconds"]
    return str(path), cached, seconds


def do_run(task: RunTask) -> RunRecord:
    from opsd_engine.data import load_examples

    spec = make_spec(
        task.plan,
        task.method,
        task.seed,
        Path(task.base_dir),
        Path(task.train_path),
        task.overrides,
    )
    _print(f"{task.plan.family}: {task.name} seed {task.seed}: training")
    record = run_method(
        task.plan,
        task.name,
        spec,
        load_examples(task.train_path),
        load_examples(task.eval_path),
        None,
        _print,
        task.eval_points,
    )
    _print(f"{task.plan.family}: {task.name} seed {task.seed}: done in {record.wall_seconds:.0f}s")
    return record


def do_base_eval(task: BaseEvalTask) -> EvalPoint:
    from transformers import AutoModelForCausalLM

    from opsd_engine.data import load_examples
    from opsd_engine.modeling import load_tokenizer

    tokenizer = load_tokenizer(task.base_dir)
    model = AutoModelForCausalLM.from_pretrained(task.base_dir).eval()
    examples = load_examples(task.eval_path)
    prompts = None
    if task.view == "teacher":
        examples, prompts = teacher_view_examples(examples)
    point = evaluate(
        model,
        tokenizer,
        examples,
        task.plan,
        seed=task.seed,
        step=0,
        generated_tokens=0,
        prompts=prompts,
        classify_problems=task.view == "student",
    )
    _print(
        f"{task.plan.family}: base {Path(task.base_dir).name} {task.view} "
        f"({Path(task.eval_path).stem}) seed {task.seed}: avg@{task.plan.eval_n} {point.avg:.3f}"
    )
    return point


class _Inline:
    """The executor interface, run in this process (``--jobs 1``)."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self) -> None:
        return None


def _executor(jobs: int, threads: int) -> Any:
    if jobs <= 1:
        return _Inline()
    return ProcessPoolExecutor(
        max_workers=jobs,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(threads,),
    )


# ------------------------------------------------------------------------------ statistics
# Two-sided 95% Student-t quantiles t_{0.975, df} (df 1..10; beyond: the normal's 1.96 is
# within 5%); scipy is not a dependency. Source: any t table (NIST/SEMATECH e-Handbook 1.3.6.7.2).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}
_T975 |= {9: 2.262, 10: 2.228}


def paired_interval(differences: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean of per-seed paired differences and its 95% t-interval,
    ``mean ± t_{0.975, n-1} · sd / sqrt(n)``. Needs at least 2 differences."""
    n = len(differences)
    if n < 2:
        raise ValueError("a paired interval needs at least 2 seeds")
    mean = statistics.fmean(differences)
    half = _T975.get(n - 1, 1.96) * statistics.stdev(differences) / math.sqrt(n)
    return mean, mean - half, mean + half


def verdict(low: float, high: float, expected_sign: int) -> str:
    """'supported' / 'contradicted' when the interval excludes 0 (on the paper's side or not),
    else 'not resolved at this scale'."""
    if low <= 0 <= high:
        return "not resolved at this scale"
    return "supported" if (low > 0) == (expected_sign > 0) else "contradicted"


# ---------------------------------------------------------------------------------- summary
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: Sequence[float], scale: float = 100.0) -> str:
    mean, std = _mean_std([v * scale for v in values])
    return f"{mean:.1f} ± {std:.1f}" if len(values) > 1 else f"{mean:.1f}"


def _group(records: Sequence[RunRecord]) -> dict[str, list[RunRecord]]:
    groups: dict[str, list[RunRecord]] = {}
    for record in records:
        groups.setdefault(record.name, []).append(record)
    for runs in groups.values():
        runs.sort(key=lambda r: r.seed)
    return groups


def _curve(runs: Sequence[RunRecord]) -> list[tuple[int, float, float, float, float]]:
    """(step, mean generated tokens, mean avg@n, std avg@n, mean training seconds) per eval
    point, over seeds."""
    out = []
    for i, point in enumerate(runs[0].points):
        accs = [r.points[i].avg for r in runs]
        tokens = statistics.fmean(r.points[i].generated_tokens for r in runs)
        seconds = statistics.fmean(r.points[i].train_seconds for r in runs)
        mean, std = _mean_std(accs)
        out.append((point.step, tokens, mean, std, seconds))
    return out


def _tokens_to_reach(run: RunRecord, target: float) -> float | None:
    """Generated tokens at the first evaluation (after step 0) at or above ``target``."""
    return next((p.generated_tokens for p in run.points[1:] if p.avg >= target), None)


@dataclass
class FamilyResult:
    """One family's measurements (what results.json stores per family)."""

    plan: Plan
    calibration: dict[str, Any]
    base: list[EvalPoint]  # student view, per seed
    records: list[RunRecord]
    capacity_base: list[EvalPoint] = field(default_factory=list)


def _claim(
    name: str,
    paper: str,
    a: Sequence[float],
    b: Sequence[float],
    expected_sign: int,
    unit: str = "points",
    scale: float = 100.0,
) -> dict[str, Any]:
    differences = [scale * (x - y) for x, y in zip(a, b, strict=True)]
    mean, low, high = paired_interval(differences)
    return {
        "claim": name,
        "paper": paper,
        "differences": differences,
        "mean": mean,
        "ci95": [low, high],
        "unit": unit,
        "verdict": verdict(low, high, expected_sign),
    }


def claims(result: FamilyResult) -> list[dict[str, Any]]:
    """Each of the paper's claims this family's runs can test: per-seed paired differences (A - B
    on the same seed), their mean and 95% t-interval, and a verdict."""
    groups = _group(result.records)
    base = [p.avg for p in result.base]
    out: list[dict[str, Any]] = []
    if len(result.plan.seeds) < 2:
        return out

    def final(name: str) -> list[float] | None:
        return [r.final.avg for r in groups[name]] if name in groups else None

    opsd = final("opsd")
    if opsd is None:
        return out
    out.append(_claim("OPSD over the base (final - base)", "OPSD improves", opsd, base, 1))
    for other, paper in (("sft", "OPSD >= SFT (Table 2)"), ("grpo", "OPSD ~ GRPO (Table 2)")):
        if (values := final(other)) is not None:
            out.append(_claim(f"OPSD - {other.upper()} (final)", paper, opsd, values, 1))
    if (o := final(f"opsd {CONTROL}")) and (s := final(f"sft {CONTROL}")):
        out.append(
            _claim(
                f"OPSD - SFT with {CONTROL} (control)",
                "OPSD >= SFT",
                o,
                s,
                1,
            )
        )
    if "grpo" in groups:
        ratios = []
        for o_run, g_run in zip(groups["opsd"], groups["grpo"], strict=True):
            tokens = _tokens_to_reach(o_run, g_run.final.avg)
            ratios.append(None if tokens is None else g_run.final.generated_tokens / tokens)
        entry: dict[str, Any] = {
            "claim": "generated tokens: GRPO's total / OPSD's to reach GRPO's final accuracy",
            "paper": "4-8x fewer tokens for OPSD (Figure 3)",
            "ratios": ratios,
            "unit": "x (log-scale interval)",
        }
        if any(r is None for r in ratios):
            missed = sum(r is None for r in ratios)
            entry["verdict"] = (
                f"OPSD did not reach GRPO's final accuracy within the budget in {missed} of "
                f"{len(ratios)} seeds: not resolved at this scale"
                if missed < len(ratios)
                else "contradicted: OPSD never reached GRPO's final accuracy within the budget"
            )
        else:
            logs = [math.log(r) for r in ratios]
            mean, low, high = paired_interval(logs)
            entry |= {
                "mean": math.exp(mean),
                "ci95": [math.exp(low), math.exp(high)],
                "verdict": (
                    "not resolved at this scale"
                    if low <= 0 <= high
                    else ("OPSD needs fewer tokens" if low > 0 else "OPSD needs more tokens")
                ),
            }
        out.append(entry)
    ablation_claims = {
        "sampled_token": ("full-vocabulary JSD - sampled-token objective", "JSD better (Table 3)"),
        "max_new_tokens": ("full-length - shorter rollouts", "longer better (Figure 4)"),
        "teacher current": ("fixed initial - current-policy teacher", "fixed better (Sec. 4.1)"),
    }
    for key, (name, paper) in ablation_claims.items():
        variant = next((n for n in groups if n.startswith("opsd ") and key in n), None)
        if variant is not None:
            out.append(_claim(f"{name} ({variant})", paper, opsd, final(variant) or [], 1))
    if CAPACITY in groups and result.capacity_base:
        gains_main = [o - b for o, b in zip(opsd, base, strict=True)]
        small = [
            r.final.avg - p.avg for r, p in zip(groups[CAPACITY], result.capacity_base, strict=True)
        ]
        out.append(
            _claim(
                "capacity: OPSD gain on the main base - gain on the small-gap base",
                "small privileged gap, small gain (Sec. 4.3.1)",
                gains_main,
                small,
                1,
            )
        )
    return out


def requirements(result: FamilyResult, out_dir: Path) -> list[tuple[str, bool, str]]:
    """The issue's requirements on the second family, each (requirement, met, measured)."""
    plan, groups = result.plan, _group(result.records)
    n = plan.eval_n
    cal = result.calibration
    checks: list[tuple[str, bool, str]] = []
    kinds: collections.Counter[str] = collections.Counter()
    for point in result.base:
        kinds.update(point.kinds or {})
    total = sum(v for k, v in kinds.items() if k != "foreign_style")
    wrong = total - kinds["correct"]
    worked = total - kinds["not_worked"]
    in_steps = kinds["arithmetic_error"] + kinds["misapplied_step"] + kinds["copy_error"]
    checks.append(
        (
            "base answers in the worked style on >= 90% of held-out samples, errors inside the "
            "steps",
            worked >= 0.9 * total and in_steps >= 0.9 * wrong,
            f"{100 * worked / total:.1f}% worked; of the wrong answers "
            f"{100 * in_steps / max(wrong, 1):.1f}% "
            f"are worked with a step error (wrong intermediate result {kinds['arithmetic_error']}, "
            f"misapplied/skipped step {kinds['misapplied_step']}, boxed answer not the last result "
            f"{kinds['copy_error']}; not worked {kinds['not_worked']} of {total} samples)",
        )
    )
    base_mean = statistics.fmean(p.avg for p in result.base)
    checks.append(
        (
            "base accuracy between 20% and 50%",
            0.2 <= base_mean <= 0.5,
            f"avg@{n} {100 * base_mean:.1f}% (mean over seeds)",
        )
    )
    checks.append(
        (
            "with the reference solution in context (teacher view) >= 85%",
            cal["teacher_avg"] >= 0.85,
            f"avg@{n} {100 * cal['teacher_avg']:.1f}% with the {plan.reference_style}-style "
            f"reference ({100 * cal['teacher_avg_worked']:.1f}% with the base's own style)",
        )
    )
    best = max(
        ((p.avg, r.name, r.seed, p.step) for r in result.records for p in r.points[1:]),
        default=(0.0, "-", 0, 0),
    )
    checks.append(
        (
            "no method reaches 90% within the budget",
            best[0] < 0.9,
            f"highest held-out avg@{n} of any run at any evaluation: {100 * best[0]:.1f}% "
            f"({best[1]}, seed {best[2]}, step {best[3]})",
        )
    )
    foreign_uses = kinds["foreign_style"]
    control = [name for name in groups if name.endswith(CONTROL)]
    checks.append(
        (
            "references in a style the base does not use, plus a control in the base's own style",
            plan.reference_style == "foreign" and foreign_uses == 0 and bool(control),
            f"references in the foreign style; base samples using it: {foreign_uses} of {total}; "
            f"control runs: {', '.join(control) or 'none'}",
        )
    )
    budgets = {
        (
            r.spec["optim"]["max_steps"],
            r.spec["optim"]["batch_size"] * r.spec["optim"]["grad_accum"],
        )
        for r in result.records
    }
    checks.append(
        (
            "all methods at the same optimizer steps and problems per step",
            len(budgets) == 1,
            ", ".join(f"{s} steps x {b} problems" for s, b in sorted(budgets)),
        )
    )
    plot = out_dir / f"results-{plan.family}.png"
    curves_ok = plot.is_file() and all(
        len(groups[m][0].points) >= 3 for m in plan.methods if m in groups
    )
    checks.append(
        (
            "each method's curve against generated tokens and against wall time",
            curves_ok,
            f"{plot.name}: accuracy vs optimizer steps, generated tokens and training wall time, "
            f"{len(plan.eval_points) + 1} points per method",
        )
    )
    tuning = out_dir / f"tuning-{plan.family}.md"
    best_rates: dict[str, tuple[float, float]] = {}
    if tuning.is_file():
        for method, rate, acc in re.findall(
            r"^\| (\w+) \| ([\d.e-]+) \| ([\d.]+) \|", tuning.read_text(), re.M
        ):
            if method not in best_rates or float(acc) > best_rates[method][1]:
                best_rates[method] = (float(rate), float(acc))
    tuned = all(
        m in best_rates and math.isclose(best_rates[m][0], plan.learning_rate(m))
        for m in plan.methods
    )
    checks.append(
        (
            "learning rates tuned per method on a validation split, tuning table committed",
            tuned,
            f"{tuning.name}: "
            + (
                ", ".join(f"{m} {best_rates[m][0]:g}" for m in plan.methods if m in best_rates)
                or "missing"
            )
            + f"; used: {', '.join(f'{m} {plan.learning_rate(m):g}' for m in plan.methods)}",
        )
    )
    return checks


def _family_section(
    result: FamilyResult,
    out_dir: Path,
    checks: list[tuple[str, bool, str]],
    claim_rows: list[dict[str, Any]],
) -> list[str]:
    plan, cal = result.plan, result.calibration
    groups = _group(result.records)
    n = plan.eval_n
    base = result.base
    description = {
        "chains": "chains of 2-4 additions/subtractions of a digit (results 0..29); the base's "
        "weakness is behavioural: it often answers without working (`base.py`), and the "
        "references are in its own style.",
        "carries": "chains of 2-4 additions/subtractions of numbers 1..19 (results 0..99, "
        "many steps carry or borrow); the base always works the steps and gets some wrong. The "
        "training set's references are in a foreign style (results first, operands of additions "
        "swapped, `;` separators: `65 = 18 + 47; 51 = 65 - 14; so \\boxed{51}`) the base never "
        f"writes; `{CONTROL}` runs use the base's own style (`47+18=65. 65-14=51. \\boxed{{51}}`).",
    }[plan.family]
    lines = [
        f"## Family `{plan.family}`",
        "",
        f"Task: {description} {plan.n_train} training problems, {plan.n_heldout} held-out ones "
        f"(every number below), {plan.n_validation} validation ones (learning rates only, "
        f"`tuning-{plan.family}.md`), none seen in "
        f"pretraining. Base pretrained in {cal['pretrain_seconds'] / 60:.1f} min "
        f"({'loaded from the cache' if cal['cached'] else 'in this run'}).",
        "",
        "### The base model",
        "",
        f"| context | held-out avg@{n} | pass@{n} |",
        "|---|---|---|",
        f"| problem only (student) | {_fmt([p.avg for p in base])} | "
        f"{_fmt([p.pass_at_k[n] for p in base])} |",
        f"| problem + reference solution, {plan.reference_style} style (teacher) | "
        f"{100 * cal['teacher_avg']:.1f} | {100 * cal['teacher_pass']:.1f} |",
    ]
    if plan.reference_style != "worked":
        lines.append(
            f"| problem + reference solution, the base's own style (teacher) | "
            f"{100 * cal['teacher_avg_worked']:.1f} | {100 * cal['teacher_pass_worked']:.1f} |"
        )
    if result.capacity_base:
        lines += [
            f"| capacity base ({cal['capacity_config']}), problem only | "
            f"{_fmt([p.avg for p in result.capacity_base])} | "
            f"{_fmt([p.pass_at_k[n] for p in result.capacity_base])} |",
            f"| capacity base, problem + {plan.reference_style}-style reference | "
            f"{100 * cal['capacity_teacher_avg']:.1f} | {100 * cal['capacity_teacher_pass']:.1f} |",
        ]
    if checks:
        lines += ["", "### Requirements (checked by the benchmark)", ""]
        lines += [f"- **{'met' if ok else 'NOT met'}**: {req}. {what}." for req, ok, what in checks]
    lines += [
        "",
        f"### Runs ({plan.steps} optimizer steps x {plan.problems_per_step} problems, LoRA "
        f"r={plan.lora_r}, mean ± std over seeds {', '.join(map(str, plan.seeds))})",
        "",
        f"| run | lr | held-out avg@{n} | pass@{n} | Δ avg vs its base | generated tokens | "
        "training time / run | wall time / run |",
        "|---|---|---|---|---|---|---|---|",
        f"| base | – | {_fmt([p.avg for p in base])} | {_fmt([p.pass_at_k[n] for p in base])} "
        "| – | 0 | – | – |",
    ]
    for name, runs in groups.items():
        own_base = result.capacity_base if name == CAPACITY else base
        gains = [r.final.avg - b.avg for r, b in zip(runs, own_base, strict=True)]
        tokens = statistics.fmean(r.final.generated_tokens for r in runs)
        lines.append(
            f"| {name} | {runs[0].spec['optim']['learning_rate']:g} | "
            f"{_fmt([r.final.avg for r in runs])} | {_fmt([r.final.pass_at_k[n] for r in runs])} "
            f"| {_fmt(gains)} | {tokens:,.0f} | "
            f"{statistics.fmean(r.train_seconds for r in runs):.0f} s | "
            f"{statistics.fmean(r.wall_seconds for r in runs):.0f} s |"
        )
    curve_names = [m for m in (*plan.methods, *plan.curve_ablations) if m in groups]
    if curve_names:
        steps = [c[0] for c in _curve(groups[curve_names[0]])]
        lines += [
            "",
            f"Held-out avg@{n} at steps {'/'.join(map(str, steps))}: "
            + "; ".join(
                f"{name} " + "/".join(f"{100 * c[2]:.1f}" for c in _curve(groups[name]))
                for name in curve_names
            )
            + ".",
        ]
    lines += ["", f"Per seed (final avg@{n}):", ""]
    for name, runs in groups.items():
        lines.append(
            f"- {name}: " + ", ".join(f"seed {r.seed} {100 * r.final.avg:.1f}" for r in runs)
        )
    lines.append(
        "- base: "
        + ", ".join(f"seed {s} {100 * p.avg:.1f}" for s, p in zip(plan.seeds, base, strict=True))
    )
    if "grpo" in groups:
        zero = [
            statistics.fmean(m["zero_variance_group_frac"] for m in r.metrics)
            for r in groups["grpo"]
        ]
        reward = [statistics.fmean(m["reward_mean"] for m in r.metrics) for r in groups["grpo"]]
        lines += [
            "",
            f"GRPO's training signal: mean reward {_fmt(reward)}%, groups with all-equal rewards "
            f"(zero gradient) {_fmt(zero)}% of the groups sampled.",
        ]
    if claim_rows:
        lines += [
            "",
            "### The paper's claims: paired differences by seed",
            "",
            "Each row: per-seed differences A - B on the same seed (same data order, same "
            "evaluation samples), their mean and 95% t-interval (`mean ± t(0.975, n-1) · sd / "
            "√n`, n seeds); 'not resolved at this scale' where the interval includes 0.",
            "",
            "| claim (A - B) | paper | per-seed | mean | 95% interval | verdict |",
            "|---|---|---|---|---|---|",
        ]
        for c in claim_rows:
            if "ratios" in c:
                per_seed = ", ".join(
                    "not reached" if r is None else f"{r:.1f}x" for r in c["ratios"]
                )
                mean = f"{c['mean']:.1f}x" if "mean" in c else "–"
                ci = f"[{c['ci95'][0]:.1f}x, {c['ci95'][1]:.1f}x]" if "ci95" in c else "–"
            else:
                per_seed = ", ".join(f"{d:+.1f}" for d in c["differences"])
                mean = f"{c['mean']:+.1f}"
                ci = f"[{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}]"
            lines.append(
                f"| {c['claim']} | {c['paper']} | {per_seed} | {mean} | {ci} | {c['verdict']} |"
            )
    lines += [
        "",
        f"![held-out accuracy, family {plan.family}](results-{plan.family}.png)",
        "",
    ]
    return lines


def _plot(path: Path, result: FamilyResult) -> None:
    """Held-out accuracy of the methods vs optimizer steps, generated tokens (the two panels of
    the paper's Figure 3) and training wall time, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan, groups = result.plan, _group(result.records)
    base_mean = 100 * statistics.fmean(p.avg for p in result.base)
    colors = {"opsd": "tab:blue", "sft": "tab:green", "grpo": "tab:red"}
    fig, (by_step, by_tokens, by_time) = plt.subplots(1, 3, figsize=(16, 4.4))
    extra = ["tab:purple", "tab:orange", "tab:brown"]
    for i, name in enumerate([*plan.methods, *plan.curve_ablations]):
        if name not in groups:
            continue
        curve = _curve(groups[name])
        steps = [c[0] for c in curve]
        tokens = [c[1] for c in curve]
        mean = [100 * c[2] for c in curve]
        std = [100 * c[3] for c in curve]
        seconds = [c[4] for c in curve]
        low = [m - s for m, s in zip(mean, std, strict=True)]
        high = [m + s for m, s in zip(mean, std, strict=True)]
        color = colors.get(name, extra[i % len(extra)])
        style = {"color": color, "lw": 2 if name in colors else 1.5}
        if name not in colors:
            style["ls"] = "--"
        for axis, xs in ((by_step, steps), (by_time, seconds)):
            axis.plot(xs, mean, marker="o", label=name, **style)
            axis.fill_between(xs, low, high, color=color, alpha=0.15)
        if name == "sft":
            by_tokens.axhline(mean[-1], label="sft, final (samples no tokens)", **style)
        else:
            by_tokens.plot(tokens, mean, marker="o", label=name, **style)
            by_tokens.fill_between(tokens, low, high, color=color, alpha=0.15)
    for axis in (by_step, by_tokens, by_time):
        axis.axhline(base_mean, color="gray", ls=":", lw=1.2, label="base")
        axis.set_ylabel(f"held-out avg@{plan.eval_n} (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="best")
    by_step.set_xlabel("optimizer step")
    by_tokens.set_xlabel("generated tokens (cumulative, all rollouts; linear below 1,000)")
    by_tokens.set_xscale("symlog", linthresh=1000)
    by_tokens.set_xlim(left=0)
    most = max((r.final.generated_tokens for runs in groups.values() for r in runs), default=0)
    by_tokens.set_xticks([t for t in (0, 1e3, 1e4, 1e5, 1e6, 1e7) if t <= max(most, 1e3)])
    by_time.set_xlabel("training wall time (s, one thread, evaluations excluded)")
    fig.suptitle(
        f"Family {plan.family}: held-out accuracy, mean ± std over {len(plan.seeds)} seed(s), "
        f"{plan.problems_per_step} problems per step"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _rounded(value: Any) -> Any:
    """Floats to 6 significant digits, recursively (keeps results.json small and diffable)."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


def capacity_gaps(results: Sequence[FamilyResult]) -> list[dict[str, Any]]:
    """Privileged gap (teacher view avg@n - student avg@n, base's own) and OPSD's gain of each
    base with an OPSD run, for the pre-flight's warning threshold."""
    rows = []
    for result in results:
        groups, cal = _group(result.records), result.calibration
        pairs = [("main", result.base, "opsd", cal["teacher_avg"])]
        if result.capacity_base:
            pairs.append(("capacity", result.capacity_base, CAPACITY, cal["capacity_teacher_avg"]))
        for which, base, run_name, teacher in pairs:
            if run_name not in groups:
                continue
            student = statistics.fmean(p.avg for p in base)
            gains = [r.final.avg - p.avg for r, p in zip(groups[run_name], base, strict=True)]
            _, low, high = paired_interval(gains) if len(gains) > 1 else (0.0, 0.0, 0.0)
            rows.append(
                {
                    "family": result.plan.family,
                    "base": which,
                    "student_avg": student,
                    "teacher_avg": teacher,
                    "privileged_gap": teacher - student,
                    "opsd_gain_mean": statistics.fmean(gains),
                    "opsd_gain_per_seed": gains,
                    "opsd_gain_ci95": [low, high],
                    "opsd_helped": low > 0,
                }
            )
    return rows


def gap_threshold(rows: Sequence[dict[str, Any]]) -> tuple[float | None, str]:
    """The pre-flight warning threshold these bases support: halfway between the largest
    privileged gap where OPSD's gain was not shown (95% interval reaches 0) and the smallest gap
    where it was, when every unhelped base has a smaller gap than every helped one."""
    helped = [r["privileged_gap"] for r in rows if r["opsd_helped"]]
    unhelped = [r["privileged_gap"] for r in rows if not r["opsd_helped"]]
    if not helped or not unhelped:
        return None, (
            "every base's gain was "
            + ("shown" if helped else "not shown")
            + ": these runs do not bracket a threshold"
        )
    if max(unhelped) >= min(helped):
        return None, "the gaps of helped and unhelped bases overlap: no single threshold fits"
    threshold = (max(unhelped) + min(helped)) / 2
    return threshold, (
        f"OPSD's gain was not shown on a base with a gap of {100 * max(unhelped):.1f} points and "
        f"was on every base with a gap of {100 * min(helped):.1f} points or more: these runs "
        f"support warning below about {100 * threshold:.0f} points (halfway; only "
        f"{len(rows)} bases, so the threshold is known to lie between "
        f"{100 * max(unhelped):.0f} and {100 * min(helped):.0f})"
    )


def write_results(
    out_dir: Path,
    results: Sequence[FamilyResult],
    *,
    command: str,
    total_seconds: float,
    quick: bool,
    jobs: int,
) -> Path:
    import torch

    stem = "results-quick" if quick else "results"
    sections: list[str] = []
    families: dict[str, Any] = {}
    for result in results:
        plot = out_dir / (
            f"{stem}-{result.plan.family}.png" if quick else f"results-{result.plan.family}.png"
        )
        _plot(plot, result)
        checks = requirements(result, out_dir) if result.plan.family == "carries" else []
        claim_rows = claims(result)
        for req, ok, what in checks:
            print(f"  requirement {'MET    ' if ok else 'NOT MET'} {req}: {what}", flush=True)
        sections += _family_section(result, out_dir, checks, claim_rows)
        families[result.plan.family] = {
            "plan": asdict(result.plan),
            "calibration": result.calibration,
            "base": [asdict(p) for p in result.base],
            "capacity_base": [asdict(p) for p in result.capacity_base],
            "runs": [asdict(r) for r in result.records],
            "requirements": [{"requirement": r, "met": ok, "measured": w} for r, ok, w in checks],
            "claims": claim_rows,
        }
    gaps = capacity_gaps(results)
    threshold, threshold_text = gap_threshold(gaps)
    data = {
        "command": command,
        "families": families,
        "capacity_privileged_gaps": gaps,
        "privileged_gap_threshold": {"value": threshold, "how": threshold_text},
        "total_seconds": total_seconds,
        "machine": {
            "cpus": os.cpu_count(),
            "jobs": jobs,
            "torch_threads_per_job": 1,
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
    }
    (out_dir / f"{stem}.json").write_text(json.dumps(_rounded(data), default=str) + "\n")
    lines = [
        "# Toy replication: OPSD vs SFT vs GRPO" + (" (quick mode)" if quick else ""),
        "",
        f"Command: `{command}`  ",
        f"Total wall time: {total_seconds / 60:.1f} min on {os.cpu_count()} CPU cores ({jobs} "
        "worker processes of one torch thread; base pretraining included when not cached).",
        "",
        "Held-out accuracy is avg@n (mean per-sample accuracy, n samples per problem at "
        "temperature 0.6, top-p 0.95) and pass@n, graded by `opsd_engine.evaluation`. Every run "
        "is a job spec (`make_spec`) trained by the engine's trainers: LoRA, AdamW, 10% warmup "
        "and cosine decay, the same optimizer steps and problems per step for every method, "
        "GRPO with 8 completions per problem.",
        "",
        *sections,
    ]
    if gaps:
        lines += [
            "## Privileged gap and OPSD's gain (for the pre-flight's warning threshold)",
            "",
            "`capacity_privileged_gaps` in results.json: per base, the teacher view's avg@n (the "
            "reference in context, as the trainer builds it) minus the student's, and OPSD's "
            "mean gain over that base.",
            "",
            "| family | base | student | teacher | privileged gap | OPSD gain (mean, 95% "
            "interval) |",
            "|---|---|---|---|---|---|",
            *(
                f"| {g['family']} | {g['base']} | {100 * g['student_avg']:.1f} | "
                f"{100 * g['teacher_avg']:.1f} | {100 * g['privileged_gap']:+.1f} | "
                f"{100 * g['opsd_gain_mean']:+.1f} [{100 * g['opsd_gain_ci95'][0]:+.1f}, "
                f"{100 * g['opsd_gain_ci95'][1]:+.1f}] |"
                for g in gaps
            ),
            "",
            f"Threshold: {threshold_text}. (`privileged_gap_threshold` in results.json.)",
            "",
        ]
    out = out_dir / f"{stem}.md"
    out.write_text("\n".join(lines))
    return out


# ------------------------------------------------------------------------------------- main
def _paths(cache: Path, plan: Plan) -> dict[str, Path]:
    """The family's data files (train in its reference style and the own-style control, the
    held-out and validation problems in both styles)."""
    from benchmarks.toy_reasoning.task import FAMILIES, make_splits, write_jsonl

    train, validation, heldout = make_splits(
        seed=0,
        n_train=plan.n_train,
        n_validation=plan.n_validation,
        n_heldout=plan.n_heldout,
        family=FAMILIES[plan.family],
    )
    data = cache / "data" / plan.family
    paths = {}
    for style in ("worked", "foreign"):
        paths[f"train-{style}"] = write_jsonl(train, data / f"train-{style}.jsonl", style)
        paths[f"validation-{style}"] = write_jsonl(
            validation, data / f"validation-{style}.jsonl", style
        )
        paths[f"heldout-{style}"] = write_jsonl(heldout, data / f"heldout-{style}.jsonl", style)
    return paths


def _run_tasks(
    plan: Plan, bases: dict[str, str], paths: dict[str, Path], tune: bool
) -> list[RunTask]:
    style = plan.reference_style
    eval_path = str(paths["validation-worked" if tune else "heldout-worked"])
    main_train = str(paths[f"train-{style}"])
    tasks: list[RunTask] = []
    if tune:
        for method, rates in plan.tune_grid:
            for rate in rates:
                lrs = tuple((m, rate if m == method else lr) for m, lr in plan.learning_rates)
                tasks.append(
                    RunTask(
                        replace(plan, learning_rates=lrs),
                        f"{method} lr {rate:g}",
                        method,
                        plan.tune_seed,
                        bases["main"],
                        main_train,
                        eval_path,
                        eval_points=(plan.steps,),
                    )
                )
        return tasks
    for seed in plan.seeds:
        for method in plan.methods:
            tasks.append(
                RunTask(
                    plan,
                    method,
                    method,
                    seed,
                    bases["main"],
                    main_train,
                    eval_path,
                    (),
                    plan.eval_points,
                )
            )
        for name, overrides in plan.ablations:
            points = plan.eval_points if name in plan.curve_ablations else plan.ablation_eval_points
            tasks.append(
                RunTask(
                    plan,
                    name,
                    "opsd",
                    seed,
                    bases["main"],
                    main_train,
                    eval_path,
                    overrides,
                    points,
                )
            )
        for method in plan.control_methods:
            tasks.append(
                RunTask(
                    plan,
                    f"{method} {CONTROL}",
                    method,
                    seed,
                    bases["main"],
                    str(paths["train-worked"]),
                    eval_path,
                    (),
                    plan.ablation_eval_points,
                )
            )
        if plan.capacity:
            tasks.append(
                RunTask(
                    plan,
                    CAPACITY,
                    "opsd",
                    seed,
                    bases["capacity"],
                    main_train,
                    eval_path,
                    (),
                    plan.ablation_eval_points,
                )
            )
    return tasks


_COST = {"grpo": 3.0, "opsd": 1.5, "sft": 1.0}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="OPSD only, 1 seed, chains family.")
    parser.add_argument(
        "--family", default=None, help="Comma-separated families (default chains,carries)."
    )
    parser.add_argument("--seeds", type=int, default=None, help="Number of seeds (0, 1, ...).")
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--steps", type=int, default=None, help="Optimizer steps (reduced runs).")
    parser.add_argument(
        "--methods", default=None, help="Comma-separated subset of opsd,sft,grpo (default all)."
    )
    parser.add_argument(
        "--tune", action="store_true", help="Only the learning-rate grid, on the tune seed."
    )
    parser.add_argument(
        "--base-steps",
        type=int,
        default=None,
        help="Pretraining steps of every base (smoke tests only: such bases are not calibrated).",
    )
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="Base model cache.")
    parser.add_argument("--out", type=Path, default=HERE, help="Where results.* go.")
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="Worker processes, one torch thread each (default 2; 1 runs in this process).",
    )
    args = parser.parse_args(argv)

    _init_worker(1)
    from benchmarks.toy_reasoning.base import CAPACITY_BASE, FAMILY_BASES

    families = (args.family or ("chains" if args.quick else "chains,carries")).split(",")
    plans = []
    for family in families:
        plan = QUICK if args.quick else PLANS[family]
        if args.quick and family != "chains":
            plan = replace(
                PLANS[family],
                seeds=(0,),
                methods=("opsd",),
                ablations=(),
                control_methods=(),
                capacity=False,
            )
        if args.seeds is not None:
            plan = replace(plan, seeds=tuple(range(args.seeds)))
        if args.no_ablations:
            plan = replace(
                plan, ablations=(), curve_ablations=(), control_methods=(), capacity=False
            )
        if args.methods:
            plan = replace(plan, methods=tuple(m.strip() for m in args.methods.split(",")))
        if args.steps:
            plan = replace(
                plan,
                steps=args.steps,
                eval_points=tuple(
                    sorted({max(1, args.steps * p // plan.steps) for p in plan.eval_points})
                ),
                ablation_eval_points=(args.steps,),
            )
        plans.append(plan)
    command = "python -m benchmarks.toy_reasoning.run " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    pool = _executor(args.jobs, 1)
    try:
        # 1. bases (the longest pretraining first), 2. every evaluation and run, longest first.
        wanted: dict[tuple[str, str], Any] = {}
        for plan in plans:
            wanted[(plan.family, "main")] = FAMILY_BASES[plan.family]
            if plan.capacity and not args.tune:
                wanted[(plan.family, "capacity")] = CAPACITY_BASE
        if args.base_steps:
            wanted = {
                k: replace(
                    v,
                    steps=args.base_steps,
                    init_from=v.init_from and replace(v.init_from, steps=args.base_steps),
                )
                for k, v in wanted.items()
            }
        built: dict[tuple[str, str], tuple[str, bool, float]] = {}
        # bases that continue another base's pretraining wait for it (no two workers build one)
        for stage in (False, True):
            order = sorted(
                (k for k in wanted if (wanted[k].init_from is not None) == stage),
                key=lambda k: -wanted[k].steps * wanted[k].hidden_size,
            )
            futures = {k: pool.submit(do_pretrain, str(args.cache), wanted[k]) for k in order}
            built |= {k: f.result() for k, f in futures.items()}
        _print(
            "bases ready: "
            + ", ".join(f"{k[0]}/{k[1]} {Path(v[0]).name}" for k, v in built.items())
        )

        jobs: list[tuple[str, Future]] = []
        evals: dict[tuple[str, str, int], Future] = {}
        for plan in plans:
            paths = _paths(args.cache, plan)
            bases = {
                which: built[(plan.family, which)][0]
                for which in ("main", "capacity")
                if (plan.family, which) in built
            }
            tasks = _run_tasks(plan, bases, paths, args.tune)
            for task in sorted(tasks, key=lambda t: -_COST[t.method]):
                jobs.append((plan.family, pool.submit(do_run, task)))
            split = "validation" if args.tune else "heldout"
            seeds = (plan.tune_seed,) if args.tune else plan.seeds
            for which, base_dir in bases.items():
                for seed in seeds:
                    evals[(plan.family, f"{which}-student", seed)] = pool.submit(
                        do_base_eval,
                        BaseEvalTask(
                            plan, base_dir, str(paths[f"{split}-worked"]), seed, "student"
                        ),
                    )
                for style in ("worked", "foreign") if which == "main" else (plan.reference_style,):
                    evals[(plan.family, f"{which}-teacher-{style}", seeds[0])] = pool.submit(
                        do_base_eval,
                        BaseEvalTask(
                            plan, base_dir, str(paths[f"{split}-{style}"]), seeds[0], "teacher"
                        ),
                    )
        records = [(family, future.result()) for family, future in jobs]
        points = {key: future.result() for key, future in evals.items()}
    finally:
        pool.shutdown()

    results = []
    for plan in plans:
        seeds = (plan.tune_seed,) if args.tune else plan.seeds
        base = [points[(plan.family, "main-student", s)] for s in seeds]
        capacity_base = (
            [points[(plan.family, "capacity-student", s)] for s in seeds]
            if (plan.family, "capacity-student", seeds[0]) in points
            else []
        )
        main_dir, cached, seconds = built[(plan.family, "main")]
        teacher = points[(plan.family, f"main-teacher-{plan.reference_style}", seeds[0])]
        teacher_worked = points[(plan.family, "main-teacher-worked", seeds[0])]
        calibration: dict[str, Any] = {
            "cached": cached,
            "pretrain_seconds": seconds,
            "base_config": asdict(FAMILY_BASES[plan.family]),
            "base_dir": Path(main_dir).name,
            "teacher_avg": teacher.avg,
            "teacher_pass": teacher.pass_at_k[plan.eval_n],
            "teacher_avg_worked": teacher_worked.avg,
            "teacher_pass_worked": teacher_worked.pass_at_k[plan.eval_n],
        }
        if capacity_base:
            cap_teacher = points[
                (plan.family, f"capacity-teacher-{plan.reference_style}", seeds[0])
            ]
            calibration |= {
                "capacity_config": (
                    f"{CAPACITY_BASE.num_layers} layer, hidden {CAPACITY_BASE.hidden_size}"
                ),
                "capacity_base_config": asdict(CAPACITY_BASE),
                "capacity_teacher_avg": cap_teacher.avg,
                "capacity_teacher_pass": cap_teacher.pass_at_k[plan.eval_n],
            }
        family_records = [r for family, r in records if family == plan.family]
        by_seed = {p_seed: p for p_seed, p in zip(seeds, base, strict=True)}
        cap_by_seed = dict(zip(seeds, capacity_base, strict=False))
        for record in family_records:
            start = cap_by_seed[record.seed] if record.name == CAPACITY else by_seed[record.seed]
            record.points.insert(0, replace(start, seconds=0.0))
        results.append(FamilyResult(plan, calibration, base, family_records, capacity_base))

    total = time.perf_counter() - started
    if args.tune:
        for result in results:
            _write_tuning(args.out, result, command.strip())
        return 0
    out = write_results(
        args.out,
        results,
        command=command.strip(),
        total_seconds=total,
        quick=args.quick,
        jobs=args.jobs,
    )
    print(out.read_text())
    _print(f"wrote {out} in {total / 60:.1f} min")
    return 0


def _write_tuning(out_dir: Path, result: FamilyResult, command: str) -> Path:
    """The tuning table: final validation accuracy per method x learning rate, tune seed."""
    plan = result.plan
    n = plan.eval_n
    rows = [
        (r.method, r.spec["optim"]["learning_rate"], r.final.avg, r.final.pass_at_k[n])
        for r in sorted(result.records, key=lambda r: (r.method, r.spec["optim"]["learning_rate"]))
    ]
    lines = [
        f"# Learning-rate tuning, family `{plan.family}` (seed {plan.tune_seed}, validation "
        "problems)",
        "",
        f"Command: `{command}`; {plan.steps} steps x {plan.problems_per_step} problems; accuracy "
        f"on the {plan.n_validation} validation problems (disjoint from training and from the "
        f"held-out problems of results.md), seed {plan.tune_seed} (not a reported seed); base "
        f"avg@{n} {100 * result.base[0].avg:.1f}. The run uses, per method, the rate with the "
        "highest validation avg@n.",
        "",
        f"| method | lr | validation avg@{n} | pass@{n} |",
        "|---|---|---|---|",
        *(f"| {m} | {r:g} | {100 * a:.1f} | {100 * p:.1f} |" for m, r, a, p in rows),
        "",
    ]
    path = out_dir / f"tuning-{plan.family}.md"
    path.write_text("\n".join(lines))
    print(path.read_text())
    return path


if __name__ == "__main__":
    raise SystemExit(main())
