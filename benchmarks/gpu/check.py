"""The GPU check of issue 15: what a user's absolute times look like on one H200, in one call.

Run through ``benchmarks/gpu/check.sh`` (which picks the mode and the Python). It writes one
markdown results file with four sections:

1. **Loss**: the chunked OPSD loss vs the naive full-logits path (``benchmarks/chunked_loss.py``,
   each (method, T) in a fresh child): peak CUDA memory and forward+backward time at bf16,
   V = 151,936, H = 2,560, T in {2048, 8192, 16384} (TRL's chunked divergence too when TRL is
   importable there).
2. **OPSD step**: one optimizer step of our trainer on a Qwen3-4B-shaped model with random bf16
   weights (built on the GPU, saved and loaded like any checkpoint), our tokenizer, LoRA r64 on
   every projection, gradient checkpointing, 8 rollouts of 2,048 tokens (batch 4 x 2
   accumulation micro-batches; random weights never sample a stop token), 1,024-token teacher
   prompts: seconds per phase, tokens/s, peak memory (sampling and the whole step) and model
   FLOP utilisation against the H200's dense bf16 peak.
3. **Rollouts**: in-process sampling throughput (tokens/s) of the step, and of one call of 32
   prompts x 256 tokens.
4. **CUDA-only tests**: ``pytest -k cuda`` over the test modules that have them.

``--mode dry-run`` runs the same code at tiny shapes on the CPU (float32, the tiny model, short
rollouts), so the script is known to work before any device time is spent (a test runs it).

Model FLOPs (no recomputation counted): a forward costs ``2 N`` per token (N = decoder-layer
parameters, embeddings excluded) plus causal attention ``2 L d T`` per sequence of T tokens
(L layers, d = heads x head dim: QK^T and AV over T^2/2 pairs); logits cost ``2 V H`` per
position that needs them. The student's backward through frozen weights (activation gradients
only; LoRA weight gradients are negligible) costs as much as its forward.
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
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
H200_BF16_DENSE_TFLOPS = 989.4  # NVIDIA's H200 SXM figure (1,979 with sparsity)


@dataclass(frozen=True)
class Shapes:
    """Everything the mode changes."""

    loss_t: tuple[int, ...]
    vocab: int
    hidden: int
    dtype: str
    device: str
    teacher_prompt_tokens: int
    max_new_tokens: int
    extra_rollout: tuple[int, int]  # prompts, new tokens of the throughput-only call


GPU = Shapes((2048, 8192, 16384), 151_936, 2_560, "bfloat16", "cuda", 1024, 2048, (32, 256))
DRY = Shapes((64, 128), 512, 64, "float32", "cpu", 96, 16, (8, 16))

QWEN3_4B = {  # Qwen/Qwen3-4B config.json (architecture only; weights are random here)
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151_936,
    "max_position_embeddings": 40_960,
    "rope_theta": 1_000_000,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}


# ------------------------------------------------------------------------------- 1. loss
def loss_section(shapes: Shapes, workdir: Path) -> str:
    methods = ["naive", "chunked"]
    try:
        import trl.kernels.chunked_divergence  # noqa: F401

        methods.append("trl")
    except ImportError:
        pass
    rows = workdir / "loss-rows.jsonl"
    command = [
        sys.executable,
        str(REPO_ROOT / "benchmarks" / "chunked_loss.py"),
        "--T",
        *map(str, shapes.loss_t),
        "--vocab",
        str(shapes.vocab),
        "--hidden",
        str(shapes.hidden),
        "--dtype",
        shapes.dtype,
        "--device",
        shapes.device,
        "--methods",
        *methods,
        "--max-naive-gb",
        "120",
        "--rows-out",
        str(rows),
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return f"FAILED ({done.returncode}):\n\n```\n{done.stderr[-4000:]}\n```\n"
    note = "" if "trl" in methods else " TRL is not importable here, so its kernel is skipped."
    shown = ["python", *(c.replace(f"{REPO_ROOT}/", "") for c in command[1:])]
    return (
        f"Command: `{' '.join(shown)}` "
        f"({time.perf_counter() - started:.0f} s).{note}\n\n{done.stdout.strip()}\n"
    )


# ------------------------------------------------------------------------------ 2. the step
def _build_model(shapes: Shapes, directory: Path) -> None:
    import torch

    from opsd_engine.tiny import build_tiny_model, build_tiny_tokenizer

    if shapes.device == "cpu":
        build_tiny_model(directory, seed=0)
        return
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = Qwen3Config(
        **QWEN3_4B,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    torch.cuda.empty_cache()


def _write_dataset(shapes: Shapes, model_dir: Path, path: Path, count: int) -> dict[str, float]:
    """Problems whose teacher prompt (problem + worked solution) is about
    ``shapes.teacher_prompt_tokens`` tokens with our tokenizer and the default templates."""
    from opsd_engine.config import PromptConfig
    from opsd_engine.modeling import load_tokenizer
    from opsd_engine.prompts import build_prompt_pair

    tokenizer = load_tokenizer(str(model_dir))
    prompts = PromptConfig()
    rows, teacher, student = [], [], []
    for index in range(count):
        problem = f"A shop sells {index + 3} boxes of {index + 7} pens each. How many pens?"
        steps, solution = 0, ""
        while True:
            steps += 1
            solution += f"Step {steps}: {index + 3} boxes times {index + 7} pens, carry {steps}. "
            pair = build_prompt_pair(
                tokenizer, problem=problem, solution=solution, answer=None, prompts=prompts
            )
            if len(pair.teacher_ids) >= shapes.teacher_prompt_tokens:
                break
        rows.append({"problem": problem, "solution": solution, "answer": str(index)})
        teacher.append(len(pair.teacher_ids))
        student.append(len(pair.student_ids))
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"teacher_prompt": sum(teacher) / count, "student_prompt": sum(student) / count}


class _Memory:
    """Peak memory in MB: CUDA allocations on a GPU, the process's peak RSS on the CPU."""

    def __init__(self, device: str) -> None:
        self.device = device

    def reset(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")

    def peak_mb(self) -> float:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        text = Path("/proc/self/status").read_text()
        match = re.search(r"^VmHWM:\s+(\d+) kB", text, flags=re.MULTILINE)
        return int(match.group(1)) / 1024 if match else float("nan")


def step_section(shapes: Shapes, workdir: Path) -> tuple[str, dict[str, Any]]:

    from opsd_engine.config import parse_spec
    from opsd_engine.rollout import local_rollouts
    from opsd_engine.trainers.opsd import OPSDTrainer

    model_dir = workdir / "model"
    started = time.perf_counter()
    _build_model(shapes, model_dir)
    built = time.perf_counter() - started
    lengths = _write_dataset(shapes, model_dir, workdir / "train.jsonl", 8)
    spec = parse_spec(
        {
            "base_model": str(model_dir),
            "dataset_uri": str(workdir / "train.jsonl"),
            "max_new_tokens": shapes.max_new_tokens,
            "seed": 0,
            "lora": {"r": 64, "alpha": 128, "dropout": 0.05},
            "optim": {"batch_size": 4, "grad_accum": 2, "max_steps": 1, "warmup_ratio": 0.0},
            "runtime": {
                "dtype": shapes.dtype,
                "device": shapes.device,
                "gradient_checkpointing": True,
            },
        }
    )
    memory = _Memory(shapes.device)
    sampling_peak: list[float] = []

    def measured_rollouts(view: Any) -> Any:
        backend = local_rollouts(view)

        class Measured:
            def generate(self, prompts: Any, params: Any, **kwargs: Any) -> Any:
                memory.reset()
                out = backend.generate(prompts, params, **kwargs)
                sampling_peak.append(memory.peak_mb())
                return out

        return Measured()

    started = time.perf_counter()
    trainer = OPSDTrainer(spec, workdir / "run", rollout_backend=measured_rollouts)
    loaded = time.perf_counter() - started
    memory.reset()
    metrics = trainer.train_step()
    step_peak = memory.peak_mb()

    # Model FLOPs of the step (see the module docstring).
    config = trainer.policy.causal_lm.config
    layers = config.num_hidden_layers
    d_attn = config.num_attention_heads * getattr(
        config, "head_dim", config.hidden_size // config.num_attention_heads
    )
    body = sum(
        p.numel()
        for n, p in trainer.policy.causal_lm.named_parameters()
        if ".layers." in n and "lora_" not in n
    )
    vh = config.vocab_size * config.hidden_size
    rows = spec.optim.batch_size * spec.optim.grad_accum
    new = metrics["generated_tokens"] / rows  # mean rollout length
    teacher_t = lengths["teacher_prompt"] + new
    student_t = lengths["student_prompt"] + new

    def forward(tokens: float) -> float:  # one sequence of `tokens` tokens
        return 2 * body * tokens + 2 * layers * d_attn * tokens**2

    flops = {
        "sampling": rows * (forward(lengths["student_prompt"] + new) + 2 * vh * new),
        "teacher": rows * forward(teacher_t),
        # forward + activation-gradient backward, and the loss's logits (student fwd + bwd,
        # teacher fwd) at every rollout position
        "student fwd+bwd": rows * (2 * forward(student_t) + 3 * 2 * vh * new),
    }
    times = {
        "sampling": metrics["time_generation_s"],
        "teacher": metrics["time_teacher_s"],
        "student fwd+bwd": metrics["time_student_s"],
        "optimizer": metrics["time_optimizer_s"],
    }
    tokens = {
        "sampling": metrics["generated_tokens"],
        "teacher": rows * teacher_t,
        "student fwd+bwd": rows * student_t,
    }
    peak = H200_BF16_DENSE_TFLOPS * 1e12
    total = sum(
        p.numel() for n, p in trainer.policy.causal_lm.named_parameters() if "lora_" not in n
    )
    lines = [
        f"Model: {total / 1e9:.2f} B parameters ({layers} layers, hidden "
        f"{config.hidden_size}, vocab {config.vocab_size:,}), "
        f"{shapes.dtype}, LoRA r64 on every projection, gradient checkpointing; {rows} rollouts "
        f"of mean length {new:.0f} (max {metrics['rollout_len_max']:.0f}); prompts: teacher "
        f"{lengths['teacher_prompt']:.0f}, student {lengths['student_prompt']:.0f} tokens (mean). "
        f"Built in {built:.0f} s, loaded in {loaded:.0f} s. One step (the first: it includes "
        f"one-time initialisation), {metrics['time_step_s']:.2f} s, loss {metrics['loss']:.4f}.",
        "",
        "| phase | seconds | tokens | tokens/s | model TFLOP | TFLOP/s | MFU |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, seconds in times.items():
        if name in flops:
            rate = flops[name] / max(seconds, 1e-9)
            lines.append(
                f"| {name} | {seconds:.3f} | {tokens[name]:,.0f} | "
                f"{tokens[name] / max(seconds, 1e-9):,.0f} | {flops[name] / 1e12:.2f} | "
                f"{rate / 1e12:.1f} | {100 * rate / peak:.1f}% |"
            )
        else:
            lines.append(f"| {name} | {seconds:.3f} | | | | | |")
    total_flops = sum(flops.values())
    lines += [
        f"| **step** | {metrics['time_step_s']:.3f} | | | {total_flops / 1e12:.2f} | "
        f"{total_flops / metrics['time_step_s'] / 1e12:.1f} | "
        f"{100 * total_flops / metrics['time_step_s'] / peak:.1f}% |",
        "",
        f"Peak memory ({'CUDA allocated' if shapes.device == 'cuda' else 'process RSS'}): "
        f"sampling {sampling_peak[0]:,.0f} MB, whole step {step_peak:,.0f} MB. MFU against "
        f"{H200_BF16_DENSE_TFLOPS} TFLOP/s (H200 dense bf16).",
    ]
    del metrics
    return "\n".join(lines) + "\n", {"trainer": trainer}


# ----------------------------------------------------------------------------- 3. rollouts
def rollout_section(shapes: Shapes, trainer: Any, step_text: str) -> str:
    import torch

    from opsd_engine.rollout import SamplingParams, rollout_seed

    count, new = shapes.extra_rollout
    prompts = [trainer._prompt_pair(i % len(trainer.examples)).student_ids for i in range(count)]
    params = SamplingParams(max_new_tokens=new, temperature=1.2)
    if shapes.device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    out = trainer.rollouts.generate(
        prompts, params, seeds=[rollout_seed(0, 1, i) for i in range(count)]
    )
    if shapes.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    generated = sum(len(r.token_ids) for r in out)
    match = re.search(r"\| sampling \| ([\d.]+) \| ([\d,]+) \| ([\d,]+) \|", step_text)
    step_rate = f"{match.group(3)} tokens/s ({match.group(2)} tokens in {match.group(1)} s)"
    return (
        f"- the step's sampling (8 prompts in one call): {step_rate};\n"
        f"- one call of {count} prompts x {new} new tokens: {generated:,} tokens in "
        f"{seconds:.2f} s = {generated / seconds:,.0f} tokens/s.\n"
    )


# -------------------------------------------------------------------------------- 4. tests
def tests_section() -> str:
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/opsd_engine/test_chunked_loss.py",
        "tests/opsd_engine/test_cuda.py",
        "-k",
        "cuda",
        "-rs",
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, check=False)
    tail = "\n".join(done.stdout.strip().splitlines()[-25:])
    return f"`python {' '.join(command[1:])}` exited {done.returncode}:\n\n```\n{tail}\n```\n"


# ------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["gpu", "dry-run"], required=True)
    parser.add_argument("--out", type=Path, required=True, help="the results file (markdown)")
    parser.add_argument("--workdir", type=Path, help="default: a temporary directory, removed")
    args = parser.parse_args(argv)
    if args.workdir is None:
        with tempfile.TemporaryDirectory(prefix="opsd-gpu-check-") as scratch:
            args.workdir = Path(scratch)
            return _check(args, parser)
    return _check(args, parser)


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    shapes = GPU if args.mode == "gpu" else DRY
    if args.mode == "gpu" and not torch.cuda.is_available():
        parser.error("--mode gpu needs a CUDA device")
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    device = torch.cuda.get_device_name() if shapes.device == "cuda" else platform.machine()
    import peft
    import transformers

    header = (
        f"# GPU check ({args.mode})\n\n{datetime.datetime.now().isoformat(timespec='seconds')}; "
        f"{device}; torch {torch.__version__}, transformers {transformers.__version__}, peft "
        f"{peft.__version__}; command `bash benchmarks/gpu/check.sh` ({args.mode}).\n"
    )
    sections = [header]

    def write() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(sections))

    sections.append("## 1. Chunked loss vs naive\n\n" + loss_section(shapes, args.workdir))
    write()
    step_text, state = step_section(shapes, args.workdir)
    sections.append("## 2. One OPSD step\n\n" + step_text)
    write()
    sections.append(
        "## 3. In-process rollouts\n\n" + rollout_section(shapes, state["trainer"], step_text)
    )
    del state
    write()
    sections.append("## 4. CUDA-only tests\n\n" + tests_section())
    sections.append(f"Total {time.perf_counter() - started:.0f} s.\n")
    write()
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
