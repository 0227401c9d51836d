"""Benchmark: OPSD rollout loss from full logits (naive) vs chunked from hidden states (ours).

Owns the measurement behind the "chunked loss" section of ``benchmarks/RESULTS.md``: peak memory
and forward+backward time of

* ``naive``: ``student_hidden @ W.T`` (with grad) and the teacher's logits (no grad), then
  :func:`opsd_engine.losses.rollout_loss_from_logits` and ``backward()``;
* ``chunked``: :func:`opsd_engine.chunked_loss.rollout_loss_from_hidden` and ``backward()``;
* ``trl``: TRL's ``trl.kernels.chunked_divergence.ChunkedDivergenceFunction`` (same divergence,
  sum over tokens / N, ``backward()``), when TRL is installed,

for each rollout length ``T``. Every (method, T) runs in a fresh child process. On CPU the child
warms up on a tiny input, resets the kernel's peak-RSS mark (``/proc/self/clear_refs``), records
its RSS after building the inputs and reports ``VmHWM - baseline``: what the loss itself added on
top of the weights and hidden states. On CUDA it reports ``max_memory_allocated`` above the
baseline. The naive path is skipped for a ``T`` whose extrapolated peak (from the previous ``T``)
would exceed ``--max-naive-gb``.

Usage::

    python benchmarks/chunked_loss.py --T 512 1024 2048 4096 --vocab 151936 --hidden 2560

``--vocab-clip C`` runs ``naive`` and ``chunked`` with the per-vocabulary-entry clip (the OPSD
authors' ``jsd_token_clip``; TRL has none, so ``trl`` ignores it).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

METHODS = ("naive", "chunked", "trl")
REPO_ROOT = Path(__file__).resolve().parent.parent


def _proc_status_mb(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, flags=re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1)) / 1024


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _trl_function() -> Any:
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    return ChunkedDivergenceFunction


def _run_child(args: argparse.Namespace) -> dict[str, Any]:
    """Measure one (method, T) in this process and return the result row."""
    import torch

    from opsd_engine.chunked_loss import auto_chunk_size, rollout_loss_from_hidden
    from opsd_engine.losses import rollout_loss_from_logits

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    vocab, hidden = args.vocab, args.hidden
    generator = torch.Generator().manual_seed(0)
    # Logits with a realistic spread (std ~ 4) so the softmaxes are peaked, as in a trained LM.
    weight = (torch.randn(vocab, hidden, generator=generator) * (4.0 / math.sqrt(hidden))).to(
        device=device, dtype=dtype
    )
    trl_fn = _trl_function() if args.method == "trl" else None

    def make_inputs(n_tokens: int) -> tuple[Any, ...]:
        student = torch.randn(1, n_tokens, hidden, generator=generator)
        teacher = student + 0.5 * torch.randn(1, n_tokens, hidden, generator=generator)
        student = student.to(device=device, dtype=dtype).requires_grad_(True)
        teacher = teacher.to(device=device, dtype=dtype)
        ids = torch.randint(0, vocab, (1, n_tokens), generator=generator).to(device)
        mask = torch.ones(1, n_tokens, dtype=torch.bool, device=device)
        return student, teacher, ids, mask

    def step(student: Any, teacher: Any, ids: Any, mask: Any) -> float:
        n_tokens = student.shape[1]
        if args.method == "naive":
            student_logits = student @ weight.T
            with torch.no_grad():
                teacher_logits = teacher @ weight.T
            result = rollout_loss_from_logits(
                student_logits,
                teacher_logits,
                ids,
                mask,
                loss=args.loss,
                beta=args.beta,
                vocab_clip=args.vocab_clip,
                normalizer=n_tokens,
            )
            loss = result.loss
        elif args.method == "chunked":
            result = rollout_loss_from_hidden(
                student,
                teacher,
                weight,
                None,
                ids,
                mask,
                loss=args.loss,
                beta=args.beta,
                vocab_clip=args.vocab_clip,
                normalizer=n_tokens,
                chunk_size=args.chunk_size,
            )
            loss = result.loss
        else:
            divergence, _entropy = trl_fn.apply(
                student.reshape(n_tokens, hidden),
                weight,
                None,
                teacher.reshape(n_tokens, hidden),
                weight,
                None,
                args.beta,
                1.0,
            )
            loss = divergence.sum() / n_tokens
        loss.backward()
        return float(loss.detach())

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step(*make_inputs(16))  # warm-up: thread pools, allocator, lazy imports
    inputs = make_inputs(args.T)
    sync()
    exact_reset = True
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device) / 2**20
    else:
        exact_reset = _reset_peak_rss()
        baseline = _proc_status_mb("VmRSS")
    seconds = cpu_seconds = math.inf
    for _ in range(args.repeat):
        inputs[0].grad = None
        start, cpu_start = time.perf_counter(), time.process_time()
        loss_value = step(*inputs)
        sync()
        seconds = min(seconds, time.perf_counter() - start)
        cpu_seconds = min(cpu_seconds, time.process_time() - cpu_start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = _proc_status_mb("VmHWM")
    chunk = args.chunk_size
    if args.method == "chunked" and chunk is None:
        chunk = auto_chunk_size(vocab, hidden, device)
    return {
        "method": args.method,
        "T": args.T,
        "peak_mb": peak - baseline,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "loss": loss_value,
        "chunk_size": chunk,
        "exact_peak_reset": exact_reset,
    }


def _child_command(args: argparse.Namespace, method: str, n_tokens: int) -> list[str]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--method",
        method,
        "--T",
        str(n_tokens),
        "--vocab",
        str(args.vocab),
        "--hidden",
        str(args.hidden),
        "--dtype",
        args.dtype,
        "--device",
        args.device,
        "--loss",
        args.loss,
        "--beta",
        str(args.beta),
    ]
    command += ["--repeat", str(args.repeat)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.chunk_size is not None:
        command += ["--chunk-size", str(args.chunk_size)]
    if args.vocab_clip is not None:
        command += ["--vocab-clip", str(args.vocab_clip)]
    return command


def _measure(args: argparse.Namespace, method: str, n_tokens: int) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        _child_command(args, method, n_tokens),
        capture_output=True,
        text=True,
        env=env,
        timeout=args.child_timeout,
        check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"method": method, "T": n_tokens, "skipped": f"failed: {tail[0][:120]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _trl_status() -> str | None:
    """``None`` if TRL's chunked divergence is importable, else why not."""
    try:
        _trl_function()
    except ImportError as exc:
        return f"TRL not available ({exc})"
    except AttributeError as exc:
        return f"trl.kernels.chunked_divergence has no ChunkedDivergenceFunction ({exc})"
    return None


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _table(rows: list[dict[str, Any]], t_values: list[int]) -> str:
    """Markdown table; ratios are reference / this method (> 1: this one is better)."""
    by_key = {(row["method"], row["T"]): row for row in rows}
    lines = [
        "| method | T | peak memory (MB) | fwd+bwd wall (s) | fwd+bwd CPU (s) "
        "| memory: naive / this | time: naive / this (wall, CPU) "
        "| memory: TRL / this | time: TRL / this (wall, CPU) | chunk |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n_tokens in t_values:
        naive = by_key.get(("naive", n_tokens), {})
        trl = by_key.get(("trl", n_tokens), {})
        for method in METHODS:
            row = by_key.get((method, n_tokens))
            if row is None:
                continue
            if "skipped" in row:
                lines.append(f"| {method} | {n_tokens} | skipped: {row['skipped']} ||||||||")
                continue

            def ratio(ref: dict[str, Any], *keys: str, row: dict[str, Any] = row) -> str:
                if row is ref or any(key not in ref or key not in row for key in keys):
                    return "-"
                return ", ".join(f"{ref[key] / max(row[key], 1e-9):.2f}x" for key in keys)

            lines.append(
                f"| {method} | {n_tokens} | {_fmt(row['peak_mb'])} | {_fmt(row['seconds'], 1)} "
                f"| {_fmt(row.get('cpu_seconds'), 1)} "
                f"| {ratio(naive, 'peak_mb')} | {ratio(naive, 'seconds', 'cpu_seconds')} "
                f"| {ratio(trl, 'peak_mb')} | {ratio(trl, 'seconds', 'cpu_seconds')} "
                f"| {row.get('chunk_size') or '-'} |"
            )
    return "\n".join(lines)


def _growth(rows: list[dict[str, Any]], t_values: list[int]) -> str:
    """Peak-memory growth per added token: between successive T and a least-squares fit."""
    lines = ["| method | T range | memory growth per added token (MB) |", "|---|---|---:|"]
    for method in METHODS:
        points = sorted(
            (row["T"], row["peak_mb"])
            for row in rows
            if row["method"] == method and "peak_mb" in row and row["T"] in t_values
        )
        for (t0, m0), (t1, m1) in itertools.pairwise(points):
            lines.append(f"| {method} | {t0} -> {t1} | {(m1 - m0) / (t1 - t0):.4f} |")
        if len(points) > 2:
            mean_t = sum(t for t, _ in points) / len(points)
            mean_m = sum(m for _, m in points) / len(points)
            slope = sum((t - mean_t) * (m - mean_m) for t, m in points) / sum(
                (t - mean_t) ** 2 for t, _ in points
            )
            span = f"{points[0][0]} .. {points[-1][0]} (least squares)"
            lines.append(f"| {method} | {span} | {slope:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=2_560)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--loss", default="jsd", choices=["jsd", "forward_kl", "reverse_kl"])
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--chunk-size", type=int, default=None, help="default: auto")
    parser.add_argument(
        "--vocab-clip", type=float, default=None, help="per-vocabulary-entry clip (naive, chunked)"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--repeat", type=int, default=1, help="timed steps per child; the fastest is reported"
    )
    parser.add_argument("--max-naive-gb", type=float, default=18.0)
    parser.add_argument("--child-timeout", type=float, default=900.0)
    parser.add_argument("--rows-out", type=Path, help="also write every result row (JSON lines)")
    parser.add_argument("--render", type=Path, help="only print the tables of a --rows-out file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        args.T = args.T[0]
        print(json.dumps(_run_child(args)))
        return 0

    if args.render is not None:
        saved = [json.loads(line) for line in args.render.read_text().splitlines() if line]
        saved_t = sorted({row["T"] for row in saved})
        print(_table(saved, saved_t) + "\n\n" + _growth(saved, saved_t))
        return 0

    if args.loss != "jsd" and "trl" in args.methods:
        # TRL's kernel selects the divergence through beta only (0: forward, 1: reverse KL).
        args.beta = {"forward_kl": 0.0, "reverse_kl": 1.0}[args.loss]
    t_values = sorted(args.T)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    trl_missing = _trl_status() if "trl" in args.methods else None
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    previous_naive: tuple[int, float] | None = None
    for n_tokens in t_values:
        for method in args.methods:
            if method == "trl" and trl_missing:
                rows.append({"method": method, "T": n_tokens, "skipped": trl_missing})
                continue
            if method == "naive" and previous_naive is not None:
                t0, m0 = previous_naive
                predicted_gb = m0 * n_tokens / t0 / 1024
                if predicted_gb > args.max_naive_gb:
                    reason = (
                        f"predicted peak {predicted_gb:.1f} GB (linear in T from T={t0}) "
                        f"> --max-naive-gb {args.max_naive_gb:g}"
                    )
                    rows.append({"method": method, "T": n_tokens, "skipped": reason})
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                    continue
            row = _measure(args, method, n_tokens)
            rows.append(row)
            if method == "naive" and "peak_mb" in row:
                previous_naive = (n_tokens, row["peak_mb"])
            print(json.dumps(row), file=sys.stderr, flush=True)

    import torch

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    print(
        f"Date: {datetime.date.today().isoformat()}; torch {torch.__version__}; TRL "
        f"{trl_version}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, threads {args.threads or torch.get_num_threads()}; "
        f"device {args.device}, dtype {args.dtype}, V={args.vocab:,}, H={args.hidden:,}, "
        f"loss {args.loss} (beta {args.beta}); repeat {args.repeat}; total "
        f"{time.perf_counter() - started:.0f} s; 1-min load average {load_before:.1f} at start, "
        f"{os.getloadavg()[0] if hasattr(os, 'getloadavg') else math.nan:.1f} at end\n"
    )
    print(_table(rows, t_values))
    print()
    print(_growth(rows, t_values))
    if args.rows_out is not None:
        args.rows_out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
