"""Summaries and plots of a run's per-step metrics (rows of `metrics.jsonl`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_PLOTS: tuple[str, ...] = (
    "loss",
    "divergence",
    "student_entropy",
    "teacher_entropy",
    "grad_norm",
    "lr",
    "rollout_len_mean",
    "generated_tokens_total",
    "tokens_per_s",
)


def summarize(
    rows: Sequence[dict[str, Any]], names: Sequence[str] = DEFAULT_PLOTS
) -> list[dict[str, Any]]:
    """Per metric: first and last value and the mean of the first and last quarter of steps."""
    out = []
    quarter = max(1, len(rows) // 4)
    for name in names:
        values = [float(r[name]) for r in rows if name in r and r[name] is not None]
        values = [v for v in values if not math.isnan(v)]
        if not values:
            continue
        out.append(
            {
                "metric": name,
                "first": values[0],
                "last": values[-1],
                "first_quarter_mean": sum(values[:quarter]) / len(values[:quarter]),
                "last_quarter_mean": sum(values[-quarter:]) / len(values[-quarter:]),
            }
        )
    return out


def format_table(summary: list[dict[str, Any]]) -> str:
    header = f"{'metric':<24}{'first':>12}{'last':>12}{'first 25%':>12}{'last 25%':>12}"
    lines = [header, "-" * len(header)]
    for row in summary:
        lines.append(
            f"{row['metric']:<24}{row['first']:>12.4g}{row['last']:>12.4g}"
            f"{row['first_quarter_mean']:>12.4g}{row['last_quarter_mean']:>12.4g}"
        )
    return "\n".join(lines)


def plot_metrics(
    rows: Sequence[dict[str, Any]],
    path: str | Path,
    names: Sequence[str] = DEFAULT_PLOTS,
    *,
    title: str = "",
) -> Path:
    """One small panel per metric against the optimizer step, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [n for n in names if any(n in r for r in rows)]
    if not present:
        raise ValueError("no metrics to plot")
    cols = min(3, len(present))
    nrows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.8 * nrows), squeeze=False)
    for axis, name in zip(axes.flat, present, strict=False):
        points = [(r["step"], r[name]) for r in rows if name in r and r[name] is not None]
        axis.plot(
            [p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 60 else None
        )
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("step", fontsize=8)
        axis.tick_params(labelsize=8)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(present) :]:
        axis.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
