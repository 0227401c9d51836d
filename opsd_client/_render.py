"""How the `opsd jobs` / `opsd evals` commands show things to people: tables, a job sheet, an
events log, and a metrics plot (matplotlib, the optional `plot` extra).

Scripts use `--json` instead; nothing here is parsed by machines.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from opsd_client.models import Eval, Event, Job, Metrics

STATUS_STYLES = {
    "queued": "cyan",
    "running": "blue",
    "cancelling": "yellow",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "yellow",
}
# Shown by `opsd jobs metrics` and plotted by `--plot` unless names are given.
DEFAULT_METRICS = (
    "loss",
    "divergence",
    "student_entropy",
    "teacher_entropy",
    "lr",
    "grad_norm",
    "generated_tokens",
    "tokens_per_s",
)


class UsageError(Exception):
    """A mistake in the command line, the spec file or the local setup (exit code 2)."""


def console(*, stderr: bool = False) -> Console:
    return Console(stderr=stderr)


def show(renderable: Any) -> None:
    """Print to stdout: styled for a terminal; for a pipe or a file, plain lines that never
    wrap (long paths stay whole) and carry no trailing padding."""
    out = console()
    if out.is_terminal:
        out.print(renderable)
        return
    wide = Console(width=10_000, color_system=None, force_terminal=False, highlight=False)
    with wide.capture() as captured:
        wide.print(renderable)
    for line in captured.get().splitlines():
        out.print(line.rstrip(), markup=False, highlight=False, soft_wrap=True)


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLES.get(status, ""))


def when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def duration(seconds: float) -> str:
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    if isinstance(value, int) or (float(value).is_integer() and abs(value) < 1e9):
        return f"{int(value):,}" if abs(value) >= 10_000 else str(int(value))
    return f"{value:.4g}"


def progress(job: Job) -> str:
    total = job.progress.total_steps
    return f"{job.progress.step}/{total}" if total else str(job.progress.step)


def jobs_table(jobs: Iterable[Job]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("ID", "STATUS", "STEP", "METHOD", "BASE MODEL", "CREATED"):
        table.add_column(column, no_wrap=column in ("ID", "CREATED"))
    for job in jobs:
        table.add_row(
            job.id,
            status_text(job.status),
            progress(job),
            str(job.spec.get("method", "-")),
            _short(str(job.spec.get("base_model", "-")), 48),
            when(job.created_at),
        )
    return table


def job_sheet(job: Job) -> Table:
    spec = job.spec
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    method = str(spec.get("method", "-"))
    if method == "opsd" and spec.get("divergence"):
        method += f" ({spec['divergence']}, beta {spec.get('beta', '-')})"
    rows: list[tuple[str, Any]] = [
        ("status", status_text(job.status)),
        ("method", method),
        ("recipe", spec.get("recipe") or "-"),
        ("base model", spec.get("base_model", "-")),
        ("dataset", spec.get("dataset_uri", "-")),
        ("progress", f"{progress(job)} steps"),
        ("attempt", str(job.attempt)),
        ("created", when(job.created_at)),
        ("started", when(job.started_at)),
    ]
    if job.finished_at is not None:
        took = ""
        if job.started_at is not None:
            took = f" (ran {duration((job.finished_at - job.started_at).total_seconds())})"
        rows.append(("finished", when(job.finished_at) + took))
    if job.error is not None:
        rows.append(
            ("error", Text(f"{job.error.code}: {job.error.message} ({job.error.category})", "red"))
        )
    if job.adapter_uri:
        rows.append(("adapter", job.adapter_uri))
        rows.append(("download", f"opsd jobs download {job.id}"))
    if job.metadata:
        rows.append(("metadata", ", ".join(f"{k}={v}" for k, v in job.metadata.items())))
    table.add_row("job", Text(job.id, style="bold"))
    for name, value in rows:
        table.add_row(name, value if isinstance(value, Text) else str(value))
    return table


def chosen_metrics(metrics: Metrics, names: Sequence[str] | None, everything: bool) -> list[str]:
    """The metrics to show: the ones asked for, all, or the usual ones plus any eval scores."""
    if names:
        return [n for n in names if n in metrics.metrics]
    if everything:
        return metrics.names
    usual = [n for n in DEFAULT_METRICS if n in metrics.metrics]
    evals = [n for n in metrics.names if n.startswith("eval/")]
    return usual + evals or metrics.names


def metrics_table(metrics: Metrics, names: Sequence[str], tail: int | None = None) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("step", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    rows = list(metrics.rows(list(names)))
    if tail is not None:
        rows = rows[-tail:] if tail > 0 else []
    for step, values in rows:
        table.add_row(str(step), *(number(values.get(name)) for name in names))
    return table


def event_line(event: Event) -> Text:
    stamp = event.created_at.astimezone().strftime("%H:%M:%S") if event.created_at else "--:--:--"
    line = Text()
    line.append(f"{event.id:>5}  {stamp}  ", style="dim")
    line.append(f"{event.kind:<12}", style=STATUS_STYLES.get(event.kind, "bold"))
    line.append(f" {event.message}")
    return line


def flatten(summary: dict[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (summary or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif not isinstance(value, list):
            out[name] = value
    return out


def eval_sheet(evaluation: Eval) -> Group:
    """A heading line and a metric | adapter | base table of the summaries."""
    heading = Text()
    heading.append(evaluation.id, style="bold")
    heading.append("  ")
    heading.append_text(status_text(evaluation.status))
    heading.append(f"  job {evaluation.job_id}", style="dim")
    table = Table(box=None, header_style="bold", pad_edge=False)
    adapter = flatten(evaluation.results.adapter if evaluation.results else None)
    base = flatten(evaluation.results.base if evaluation.results else None)
    table.add_column("metric")
    table.add_column("adapter", justify="right")
    if base:
        table.add_column("base", justify="right")
    for name in list(dict.fromkeys([*adapter, *base])):
        row = [name, number(adapter.get(name))]
        if base:
            row.append(number(base.get(name)))
        table.add_row(*row)
    parts: list[Any] = [heading]
    if adapter or base:
        parts.append(table)
    if evaluation.error:
        error = evaluation.error
        message = error if isinstance(error, str) else f"{error.code}: {error.message}"
        parts.append(Text(f"error: {message}", style="red"))
    return Group(*parts)


def evals_table(evaluations: Iterable[Eval]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("ID", "STATUS", "DATASET", "N", "AVG@N", "PASS@1", "CREATED"):
        table.add_column(column, no_wrap=column in ("ID", "CREATED"))
    for evaluation in evaluations:
        adapter = (evaluation.results.adapter if evaluation.results else None) or {}
        pass_at = adapter.get("pass_at_k") or {}
        table.add_row(
            evaluation.id,
            status_text(evaluation.status),
            _short(str(evaluation.config.get("dataset_uri", "-")), 40),
            str(evaluation.config.get("n", "-")),
            number(adapter.get("avg_at_n")),
            number(pass_at.get("1") if isinstance(pass_at, dict) else None),
            when(evaluation.created_at),
        )
    return table


def plot_metrics(metrics: Metrics, names: Sequence[str], path: Path, title: str) -> Path:
    """One small line chart per metric, in a grid, saved as an image (PNG by the suffix)."""
    try:
        import matplotlib
    except ModuleNotFoundError as exc:
        raise UsageError(
            "plotting needs matplotlib: pip install 'opsd[plot]' (or matplotlib)"
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = list(names) or metrics.names
    cols = min(3, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for index, ax in enumerate(axes.flat):
        if index >= len(names):
            ax.set_visible(False)
            continue
        series = metrics.metrics[names[index]]
        points = [(s, v) for s, v in series.points() if v is not None]
        marker = "." if len(points) < 40 else ""
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(names[index], fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short(value: str, width: int) -> str:
    return value if len(value) <= width else "…" + value[-(width - 1) :]
