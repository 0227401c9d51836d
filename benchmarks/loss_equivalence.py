"""Check: the OPSD step computes the same losses as before issue 15 on the same rollouts.

Issue 15 changed how rollouts are sampled: one call per step instead of one per micro-batch, and
each rollout from its own generator keyed by (seed, epoch, example, generation) instead of
torch's global generator consumed in micro-batch order. The sampled tokens therefore differ
from the old code's for the same seed (necessarily: the old stream depended on the micro-batch
split and on the number of processes, which is what the new seeding removes). What must not
change is what a step computes from its rollouts. This script shows it:

1. the old engine (``--base``, default the commit before issue 15, extracted with
   ``git archive`` into a scratch directory) trains ``--steps`` OPSD steps of a
   ``benchmarks/step_vs_trl.py`` configuration and records every rollout it sampled;
2. the current engine trains the same spec, its rollout backend replaying those recorded
   rollouts (matched by step and prompt), so both score exactly the same token ids;
3. the table compares, per step, loss, divergence and grad norm, and the final adapters.

Differences come only from float rounding (the new step groups rollouts of similar length into
micro-batches and pads each sequence differently, so the sums run in another order).

Usage::

    python benchmarks/loss_equivalence.py --config b --steps 6
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

import step_vs_trl  # noqa: E402  (a sibling script: the configurations and the model)

BASE_COMMIT = "06cec9c"
METRICS = ("loss", "divergence", "grad_norm", "generated_tokens")


def _record(args: argparse.Namespace) -> None:
    """Child, old engine: train, recording (step, prompt, rollout) of every sampled rollout."""
    import torch
    from safetensors.torch import load_file

    from opsd_engine.rollout import local_rollouts
    from opsd_engine.trainers.opsd import OPSDTrainer

    torch.set_num_threads(1)
    log: list[dict[str, Any]] = []

    def recording(view: Any) -> Any:
        inner = local_rollouts(view)

        class Recording:
            def generate(self, prompts: list[list[int]], params: Any, **kwargs: Any) -> Any:
                out = inner.generate(prompts, params, **kwargs)
                for rollout in out:
                    log.append(
                        {
                            "step": view.current_step(),
                            "prompt": prompts[rollout.prompt_index],
                            "ids": rollout.token_ids,
                            "finished": rollout.finished,
                        }
                    )
                return out

        return Recording()

    spec = step_vs_trl.our_spec(args.config, Path(args.workdir), args.steps)
    trainer = OPSDTrainer(spec, Path(args.out) / "run", rollout_backend=recording)
    metrics = [trainer.train_step() for _ in range(args.steps)]
    trainer.policy.peft_model.save_pretrained(str(Path(args.out) / "adapter"))
    adapter = load_file(str(Path(args.out) / "adapter" / "adapter_model.safetensors"))
    Path(args.out, "result.json").write_text(
        json.dumps({"rollouts": log, "metrics": metrics, "adapter_keys": sorted(adapter)})
    )


def _replay(args: argparse.Namespace) -> None:
    """Child, current engine: train the same spec on the recorded rollouts."""
    import torch

    from opsd_engine.rollout import Rollout
    from opsd_engine.trainers.opsd import OPSDTrainer

    torch.set_num_threads(1)
    recorded = json.loads(Path(args.recorded, "result.json").read_text())["rollouts"]
    queues: dict[tuple[int, tuple[int, ...]], list[dict[str, Any]]] = {}
    for row in recorded:
        queues.setdefault((row["step"], tuple(row["prompt"])), []).append(row)

    def replaying(view: Any) -> Any:
        class Replay:
            def generate(self, prompts: list[list[int]], params: Any, **_: Any) -> list[Rollout]:
                out = []
                for index, prompt in enumerate(prompts):
                    for _ in range(params.num_generations):
                        row = queues[(view.current_step(), tuple(prompt))].pop(0)
                        out.append(Rollout(index, row["ids"], row["finished"]))
                return out

        return Replay()

    spec = step_vs_trl.our_spec(args.config, Path(args.workdir), args.steps)
    trainer = OPSDTrainer(spec, Path(args.out) / "run", rollout_backend=replaying)
    metrics = [trainer.train_step() for _ in range(args.steps)]
    assert not any(queues.values()), "every recorded rollout is replayed once"
    trainer.policy.peft_model.save_pretrained(str(Path(args.out) / "adapter"))
    Path(args.out, "result.json").write_text(json.dumps({"metrics": metrics}))


def _run_child(mode: str, engine_root: Path, args: argparse.Namespace, out: Path) -> None:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        mode,
        "--config",
        args.config,
        "--steps",
        str(args.steps),
        "--workdir",
        args.workdir,
        "--out",
        str(out),
    ]
    if mode == "replay":
        command += ["--recorded", str(out.parent / "old")]
    env = {**os.environ, "PYTHONPATH": f"{engine_root}:{BENCH_DIR}", "OMP_NUM_THREADS": "1"}
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    subprocess.run(command, check=True, env=env, cwd=out.parent)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="b", choices=sorted(step_vs_trl.CONFIGS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--base", default=BASE_COMMIT, help="the engine before the change")
    parser.add_argument("--workdir", default=str(REPO_ROOT / "runs" / "step_vs_trl"))
    parser.add_argument("--child", choices=["record", "replay"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--recorded", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "record":
        _record(args)
        return 0
    if args.child == "replay":
        _replay(args)
        return 0

    import torch
    from safetensors.torch import load_file

    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    step_vs_trl.prepare(Path(args.workdir))
    with tempfile.TemporaryDirectory(prefix="opsd-loss-equivalence-") as scratch:
        root = Path(scratch)
        old_tree = root / "engine-before"
        old_tree.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "archive", args.base, "opsd_engine"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(old_tree)], input=archive, check=True)
        (root / "old").mkdir()
        (root / "new").mkdir()
        _run_child("record", old_tree, args, root / "old")
        _run_child("replay", REPO_ROOT, args, root / "new")
        old = json.loads((root / "old" / "result.json").read_text())
        new = json.loads((root / "new" / "result.json").read_text())
        a = load_file(str(root / "old" / "adapter" / "adapter_model.safetensors"))
        b = load_file(str(root / "new" / "adapter" / "adapter_model.safetensors"))
    adapter_diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    adapter_scale = max(float(a[k].abs().max()) for k in a)
    lines = [
        f"config {args.config} {step_vs_trl.CONFIGS[args.config]}, {args.steps} steps, "
        f"engine before = {args.base}",
        "",
        "| step | " + " | ".join(f"{m} before | {m} after" for m in METRICS) + " | max rel. diff |",
        "|---:|" + "---:|" * (2 * len(METRICS) + 1),
    ]
    worst = 0.0
    for step, (before, after) in enumerate(zip(old["metrics"], new["metrics"], strict=True), 1):
        cells, rel = [], 0.0
        for name in METRICS:
            x, y = before[name], after[name]
            cells += [f"{x:.7g}", f"{y:.7g}"]
            rel = max(rel, abs(x - y) / max(abs(x), 1e-12))
        worst = max(worst, rel)
        lines.append(f"| {step} | " + " | ".join(cells) + f" | {rel:.1e} |")
    lines += [
        "",
        f"largest relative difference of a step metric: {worst:.1e}; final adapters: max |diff| "
        f"{adapter_diff:.2e} (largest entry {adapter_scale:.3g}); torch {torch.__version__}",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
