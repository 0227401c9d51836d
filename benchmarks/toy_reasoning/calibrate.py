"""Calibration of a base's pretraining length: student/teacher held-out accuracy during pretraining.

    python -m benchmarks.toy_reasoning.calibrate --family carries --steps 2400 --every 300

Pretrains a base (``BaseConfig`` of ``run.FAMILY_BASES[family]`` with a constant learning rate
after warmup, so the model at step ``s`` is exactly the base a ``steps=s`` run gives) and every
``--every`` steps prints, on the first ``--problems`` validation problems (never the held-out
ones): the student's avg@4 and worked-style share, and the teacher's avg@4 with the reference
in the foreign and in the worked style. Used once to choose ``steps``; not part of the benchmark.
"""

from __future__ import annotations

import argparse
import collections
import time
from dataclasses import replace

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", default="carries")
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--every", type=int, default=300)
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--drill", type=float, default=None)
    parser.add_argument("--save", action="store_true", help="Cache the base at each eval step.")
    parser.add_argument("--teacher", type=float, default=None)
    parser.add_argument("--foreign", type=float, default=None)
    args = parser.parse_args()

    from benchmarks.toy_reasoning.base import FAMILY_BASES, TOY_PROMPTS, pretrain
    from benchmarks.toy_reasoning.run import teacher_view_examples
    from benchmarks.toy_reasoning.task import FAMILIES, classify, make_splits
    from opsd_engine.data import Example
    from opsd_engine.evaluation import EvalSettings, evaluate_model

    config = replace(FAMILY_BASES[args.family], steps=args.steps, cosine=False)
    if args.layers:
        config = replace(config, num_layers=args.layers)
    for name, value in (
        ("drill_share", args.drill),
        ("teacher_share", args.teacher),
        ("foreign_reference_share", args.foreign),
    ):
        if value is not None:
            config = replace(config, **{name: value})
    if args.lr:
        config = replace(config, learning_rate=args.lr)
    if args.hidden:
        config = replace(config, hidden_size=args.hidden)
    _, validation, _ = make_splits(
        seed=0, n_train=512, n_validation=128, n_heldout=128, family=FAMILIES[args.family]
    )
    validation = validation[: args.problems]

    def examples(style: str) -> list[Example]:
        return [Example(**p.row(style), index=i) for i, p in enumerate(validation)]

    settings = EvalSettings(n=4, max_new_tokens=64, temperature=0.6, top_p=0.95, batch_size=256)
    tokenizer_box = []
    started = time.perf_counter()

    def on_step(step: int, model: torch.nn.Module) -> None:
        if step % args.every:
            return
        from benchmarks.toy_reasoning.base import save_base
        from benchmarks.toy_reasoning.run import DEFAULT_CACHE
        from opsd_engine.tiny import build_tiny_tokenizer

        if not tokenizer_box:
            tokenizer_box.append(build_tiny_tokenizer())
        tokenizer = tokenizer_box[0]
        model.eval()
        if args.save:  # the base a steps=step run pretrains (constant rate), into the cache
            saved = replace(config, steps=step)
            save_base(DEFAULT_CACHE, saved, model, tokenizer, time.perf_counter() - started)
        line = [f"step {step:>5} ({time.perf_counter() - started:.0f}s)"]
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.manual_seed(1)
            student = evaluate_model(
                model, tokenizer, examples("worked"), settings, prompts=TOY_PROMPTS
            )
            kinds = collections.Counter(
                classify(validation[s.problem_index].problem, s.text) for s in student.samples
            )
            total = sum(kinds.values())
            line.append(f"student {student.summary.avg_at_n:.3f}")
            line.append(f"worked {1 - kinds['not_worked'] / total:.3f}")
            line.append(" ".join(f"{k}={v}" for k, v in sorted(kinds.items())))
            for style in ("foreign", "worked"):
                rendered, prompts = teacher_view_examples(examples(style))
                teacher = evaluate_model(model, tokenizer, rendered, settings, prompts=prompts)
                line.append(f"teacher[{style}] {teacher.summary.avg_at_n:.3f}")
        print("  ".join(line), flush=True)

    torch.set_num_threads(1)
    init = None
    if config.init_from is not None:
        from benchmarks.toy_reasoning.base import build_base
        from benchmarks.toy_reasoning.run import DEFAULT_CACHE

        init, _ = build_base(DEFAULT_CACHE, config.init_from)
    pretrain(config, progress=lambda m: print(m, flush=True), on_step=on_step, init=init)


if __name__ == "__main__":
    main()
