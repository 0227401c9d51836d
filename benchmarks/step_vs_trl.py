"""Benchmark: one OPSD optimizer step, ours (`opsd_engine`) vs TRL's `SDFTTrainer`, in one run.

Owns the measurement behind the "OPSD step vs TRL" section of ``benchmarks/RESULTS.md`` (issue 15)
and the step profiles in ``benchmarks/profiles/``. Both trainers get the same tiny Qwen3 model
(``opsd_engine.tiny.build_tiny_model``, seed 0), the same problems, token-identical student and
teacher prompts (the chat template of the tiny tokenizer; teacher = problem + blank line +
reference solution, TRL's default template), LoRA r16/alpha 32 on every projection without
dropout, full-vocabulary JSD (beta = TRL's ``distillation_alpha`` = 0.5), the base model as
teacher (adapter disabled), sampling at temperature 1.2, AdamW at a constant 1e-4, fp32 on the
CPU, and no gradient checkpointing. Configurations (``--config``):

* ``a``: 4 problems per step, no gradient accumulation, up to 64 new tokens;
* ``b``: 2 problems x 4 accumulation micro-batches, up to 128 new tokens; the tiny model stops
  on its own at mixed lengths (the table reports the lengths each trainer sampled).

Every (trainer, config) runs in a fresh child process: ``--warmup`` steps, then ``--steps`` timed
optimizer steps (``--repeats`` runs of each, ours and TRL alternating, and the run with the
median seconds per step is reported: on a shared machine this evens out the load). It reports
seconds per step (mean of the timed steps), per-phase seconds per step (ours: sampling, teacher
forward, student forward + loss + backward, optimizer; TRL: its methods are wrapped to time
sampling and the teacher + student forward with the loss, and "backward + optimizer" is the rest
of the step), peak RSS after the warm-up (``/proc/self/clear_refs`` then ``VmHWM``) and the
step losses. TRL runs in its own virtual environment (``benchmarks/.venv-trl``, ignored by git),
created on first use with ``torch==2.13.0`` (the CPU build on disk) and the same
transformers/peft/accelerate versions as ours. ``--profile FILE`` also writes a cProfile summary
of our timed steps (markdown).

Usage::

    python benchmarks/step_vs_trl.py --config a b
    python benchmarks/step_vs_trl.py --config b --only ours --profile benchmarks/profiles/x.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
TRL_VENV = REPO_ROOT / "benchmarks" / ".venv-trl"
TRL_VERSION = "1.16.0"
TORCH_SPEC = "torch==2.13.0"

CONFIGS: dict[str, dict[str, int]] = {
    "a": {"batch_size": 4, "grad_accum": 1, "max_new_tokens": 64},
    "b": {"batch_size": 2, "grad_accum": 4, "max_new_tokens": 128},
}
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
TEMPERATURE = 1.2
LEARNING_RATE = 1e-4
STUDENT_TEMPLATE = "{problem}"
TEACHER_TEMPLATE = "{problem}\n\n{solution}"  # TRL's default "{prompt}\n\n{privileged_context}"
DATASET_SIZE = 64


# ------------------------------------------------------------------------------ shared helpers
def _proc_status_mb(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, flags=re.MULTILINE)
    return int(match.group(1)) / 1024 if match else float("nan")


def _reset_peak_rss() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _problems(workdir: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in (workdir / "train.jsonl").read_text().splitlines()]


def prepare(workdir: Path) -> None:
    """The tiny model and the problems, built once into ``workdir`` (needs opsd_engine)."""
    from opsd_engine.tiny import build_tiny_model, write_tiny_dataset

    if not (workdir / "model" / "config.json").exists():
        build_tiny_model(workdir / "model", seed=0)
    if not (workdir / "train.jsonl").exists():
        write_tiny_dataset(workdir / "train.jsonl", n=DATASET_SIZE, seed=0)


# ------------------------------------------------------------------------------------- ours
def our_spec(config_name: str, workdir: Path, steps: int) -> Any:
    """Our job spec for a configuration (the same settings TRL gets in :func:`run_trl`)."""
    from opsd_engine.config import parse_spec

    config = CONFIGS[config_name]
    return parse_spec(
        {
            "base_model": str(workdir / "model"),
            "dataset_uri": str(workdir / "train.jsonl"),
            "max_new_tokens": config["max_new_tokens"],
            "seed": 0,
            "divergence": "jsd",
            "beta": 0.5,
            "teacher": "initial",
            "generation": {"temperature": TEMPERATURE},
            "lora": LORA,
            "optim": {
                "learning_rate": LEARNING_RATE,
                "lr_schedule": "constant",
                "warmup_ratio": 0.0,
                "batch_size": config["batch_size"],
                "grad_accum": config["grad_accum"],
                "max_steps": steps,
            },
            "prompts": {"student_template": STUDENT_TEMPLATE, "teacher_template": TEACHER_TEMPLATE},
            "runtime": {"dtype": "float32", "device": "cpu", "gradient_checkpointing": False},
        }
    )


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from opsd_engine.trainers.opsd import OPSDTrainer

    torch.set_num_threads(args.threads)
    spec = our_spec(args.config, Path(args.workdir), args.warmup + args.steps)
    trainer = OPSDTrainer(spec, Path(args.workdir) / f"ours-{args.config}-{os.getpid()}")
    for _ in range(args.warmup):
        trainer.train_step()
    _reset_peak_rss()
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
    rows = []
    for _ in range(args.steps):
        start, cpu = time.perf_counter(), time.process_time()
        if profiler is not None:
            profiler.enable()
        metrics = trainer.train_step()
        if profiler is not None:
            profiler.disable()
        metrics["wall_s"] = time.perf_counter() - start
        metrics["cpu_s"] = time.process_time() - cpu
        rows.append(metrics)
    phases = {
        "sampling": "time_generation_s",
        "teacher": "time_teacher_s",
        "student fwd+bwd": "time_student_s",
        "optimizer": "time_optimizer_s",
    }
    result = _summary(rows, phases, lengths=[])
    result["lengths"] = {
        "mean": sum(r["rollout_len_mean"] for r in rows) / len(rows),
        "max": max(r["rollout_len_max"] for r in rows),
    }
    if profiler is not None:
        _write_profile(profiler, Path(args.profile), args, result)
    return result


def _summary(
    rows: list[dict[str, float]], phases: dict[str, str], lengths: list[int]
) -> dict[str, Any]:
    n = len(rows)
    return {
        "s_per_step": sum(r["wall_s"] for r in rows) / n,
        "cpu_s_per_step": sum(r["cpu_s"] for r in rows) / n,
        "steps_s": [round(r["wall_s"], 4) for r in rows],
        "phases": {name: sum(r.get(key, 0.0) for r in rows) / n for name, key in phases.items()},
        "losses": [r["loss"] for r in rows],
        "peak_rss_mb": _proc_status_mb("VmHWM"),
        "generated_tokens_per_step": sum(r.get("generated_tokens", 0.0) for r in rows) / n,
    }


def _write_profile(profiler: Any, path: Path, args: argparse.Namespace, result: dict) -> None:
    """A markdown summary of a cProfile run: per-phase times, top functions by own time."""
    import io
    import pstats

    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("tottime").print_stats(30)
    own = stream.getvalue()
    stream = io.StringIO()
    stats.stream = stream
    stats.sort_stats("cumulative").print_stats(40)
    cumulative = stream.getvalue()
    phases = "\n".join(
        f"| {name} | {seconds:.3f} | {100 * seconds / result['s_per_step']:.0f}% |"
        for name, seconds in result["phases"].items()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"# Profile: OPSD step, config {args.config} ({CONFIGS[args.config]})\n\n"
        f"Command: `python benchmarks/step_vs_trl.py --config {args.config} --only ours "
        f"--steps {args.steps} --warmup {args.warmup} --profile {path}` "
        f"({datetime.date.today()}, {platform.machine()}, {args.threads} torch threads, a "
        "shared machine: absolute times are inflated, the shares are what matters).\n\n"
        f"Seconds per step (cProfile on, which inflates Python-heavy code): "
        f"{result['s_per_step']:.3f}; generated tokens per step: "
        f"{result['generated_tokens_per_step']:.0f}; rollout length mean "
        f"{result['lengths']['mean']:.1f}, max {result['lengths']['max']:.0f}.\n\n"
        "| phase | s/step | share |\n|---|---:|---:|\n"
        f"{phases}\n\n"
        "## Top functions by own time\n\n```\n"
        f"{_trim_stats(own)}\n```\n\n## Top functions by cumulative time\n\n```\n"
        f"{_trim_stats(cumulative)}\n```\n"
    )


def _trim_stats(text: str) -> str:
    lines = [line.rstrip() for line in text.splitlines()]
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
    site = re.compile(r"\S*/site-packages/")
    return "\n".join(site.sub("", line.replace(str(REPO_ROOT) + "/", "")) for line in lines[start:])


# -------------------------------------------------------------------------------------- TRL
def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    torch.set_num_threads(args.threads)
    config = CONFIGS[args.config]
    workdir = Path(args.workdir)
    problems = _problems(workdir)
    dataset = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": p["problem"]}],
                "privileged_context": p["solution"],
            }
            for p in problems
        ]
    )
    tokenizer = AutoTokenizer.from_pretrained(str(workdir / "model"))
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(workdir / "model"), dtype=torch.float32)
    total = args.warmup + args.steps
    sdft_config = SDFTConfig(
        output_dir=str(workdir / f"trl-{args.config}-{os.getpid()}"),
        per_device_train_batch_size=config["batch_size"],
        gradient_accumulation_steps=config["grad_accum"],
        num_generations=1,
        max_completion_length=config["max_new_tokens"],
        max_prompt_length=1024,
        temperature=TEMPERATURE,
        distillation_mode="full_logits",
        distillation_alpha=0.5,
        distillation_is_clip=None,
        teacher_model_kind="base",
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        max_steps=total,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    peft_config = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        task_type="CAUSAL_LM",
    )
    trainer = SDFTTrainer(
        model=model,
        args=sdft_config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    phase_time: dict[str, float] = {"sampling": 0.0, "teacher+student fwd+loss": 0.0}
    lengths: list[int] = []

    def timed(name: str, function: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            out = function(*a, **k)
            phase_time[name] += time.perf_counter() - start
            if name == "sampling":
                lengths.extend(len(ids) for ids in out[1])
            return out

        return wrapper

    trainer._generate = timed("sampling", trainer._generate)
    trainer.compute_loss = timed("teacher+student fwd+loss", trainer.compute_loss)
    rows: list[dict[str, float]] = []

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.start = self.cpu = 0.0
            self.snapshot: dict[str, float] = {}

        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.start, self.cpu = time.perf_counter(), time.process_time()
            self.snapshot = dict(phase_time)
            self.lengths_before = len(lengths)

        def on_step_end(self, state_args: Any, state: Any, control: Any, **__: Any) -> None:
            wall = time.perf_counter() - self.start
            row = {name: phase_time[name] - self.snapshot[name] for name in phase_time}
            row["wall_s"] = wall
            row["cpu_s"] = time.process_time() - self.cpu
            row["backward+optimizer"] = wall - sum(row[name] for name in phase_time)
            row["generated_tokens"] = float(sum(lengths[self.lengths_before :]))
            row["step"] = state.global_step
            rows.append(row)
            if state.global_step == args.warmup:
                _reset_peak_rss()

        def on_log(self, state_args: Any, state: Any, control: Any, logs: Any = None, **__: Any):
            if logs and "loss" in logs and rows:
                rows[-1]["loss"] = float(logs["loss"])

    trainer.add_callback(StepTimer())
    trainer.train()
    timed_rows = [row for row in rows if row["step"] > args.warmup]
    phases = {name: name for name in (*phase_time, "backward+optimizer")}
    result = _summary(timed_rows, phases, lengths)
    sampled = lengths[-len(timed_rows) * config["batch_size"] * config["grad_accum"] :]
    result["lengths"] = {"mean": sum(sampled) / len(sampled), "max": max(sampled)}
    return result


def ensure_trl_venv() -> Path:
    """The TRL virtualenv's python, created (torch from disk, our library versions) if missing."""
    python = TRL_VENV / "bin" / "python"
    probe = [str(python), "-c", "import trl.experimental.sdft, peft, datasets"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    from importlib.metadata import version

    pins = [f"{name}=={version(name)}" for name in ("transformers", "peft", "accelerate")]
    print(f"creating {TRL_VENV} (trl {TRL_VERSION}, {', '.join(pins)})", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TORCH_SPEC], check=True)
    subprocess.run([*pip, TORCH_SPEC, f"trl=={TRL_VERSION}", *pins, "datasets"], check=True)
    subprocess.run(probe, check=True)
    return python


# ------------------------------------------------------------------------------------ driver
def _child(trainer: str, config: str, args: argparse.Namespace, python: str) -> dict[str, Any]:
    out = Path(args.workdir) / f"result-{trainer}-{config}.json"
    command = [
        python,
        str(Path(__file__).resolve()),
        "--worker",
        trainer,
        "--config",
        config,
        "--workdir",
        str(args.workdir),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
        "--json",
        str(out),
    ]
    if args.profile and trainer == "ours":
        command += ["--profile", str(Path(args.profile).resolve())]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=REPO_ROOT)
    result = json.loads(out.read_text())
    result["child_wall_s"] = time.perf_counter() - started
    return result


def _table(results: dict[tuple[str, str], dict[str, Any]], configs: list[str]) -> str:
    lines = [
        "| config | trainer | s/step | CPU s/step | phases (s/step) | peak RSS (MB) "
        "| tokens/step | rollout len mean / max | ours / TRL (s/step; CPU) |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for config in configs:
        ours, trl = results.get(("ours", config)), results.get(("trl", config))
        for name, row in (("ours", ours), ("TRL SDFTTrainer", trl)):
            if row is None:
                continue
            phases = ", ".join(f"{k} {v:.3f}" for k, v in row["phases"].items())
            ratio = (
                f"**{ours['s_per_step'] / trl['s_per_step']:.2f}**; "
                f"{ours['cpu_s_per_step'] / trl['cpu_s_per_step']:.2f}"
                if name == "ours" and ours and trl
                else ""
            )
            lines.append(
                f"| {config} {CONFIGS[config]} | {name} | {row['s_per_step']:.3f} "
                f"| {row['cpu_s_per_step']:.3f} | {phases} "
                f"| {row['peak_rss_mb']:.0f} | {row['generated_tokens_per_step']:.0f} "
                f"| {row['lengths']['mean']:.1f} / {row['lengths']['max']:.0f} | {ratio} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", nargs="+", default=["a", "b"], choices=sorted(CONFIGS))
    parser.add_argument("--steps", type=int, default=12, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per trainer, alternated; the median counts"
    )
    parser.add_argument("--only", choices=["ours", "trl"], help="run one trainer")
    parser.add_argument("--workdir", default=str(REPO_ROOT / "runs" / "step_vs_trl"))
    parser.add_argument("--profile", help="write a cProfile summary of our steps (markdown)")
    parser.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:  # a child: one trainer, one config
        args.config = args.config[0]
        result = (run_ours if args.worker == "ours" else run_trl)(args)
        Path(args.json).write_text(json.dumps(result))
        return 0

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    prepare(workdir)
    trainers = [args.only] if args.only else ["ours", "trl"]
    pythons = {"ours": sys.executable}
    if "trl" in trainers:
        pythons["trl"] = str(ensure_trl_venv())
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for config in args.config:
        runs: dict[str, list[dict[str, Any]]] = {trainer: [] for trainer in trainers}
        for _ in range(args.repeats):  # alternate, so both see the same machine load
            for trainer in trainers:
                row = _child(trainer, config, args, pythons[trainer])
                runs[trainer].append(row)
                print(
                    f"{trainer} config {config}: {row['s_per_step']:.3f} s/step, "
                    f"losses {[round(x, 5) for x in row['losses']]}",
                    file=sys.stderr,
                )
        for trainer, rows in runs.items():
            rows.sort(key=lambda r: r["s_per_step"])
            median = rows[len(rows) // 2]  # the run with the median s/step
            median["repeats_s_per_step"] = [round(r["s_per_step"], 4) for r in rows]
            results[(trainer, config)] = median
    print(_table(results, args.config))
    (workdir / "results.json").write_text(
        json.dumps({f"{t}-{c}": r for (t, c), r in results.items()}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
