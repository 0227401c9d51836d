"""The `opsd` command line: local training and developer helpers.

`opsd train SPEC --out DIR [--resume]` runs a job locally (Ctrl-C stops it after the current
step with a checkpoint, records an `interrupted` event, prints the command that resumes it and
exits 130); `opsd spec show SPEC` prints the
resolved spec with every default; `opsd dev tiny-model DIR` / `opsd dev tiny-dataset FILE` build
an offline tiny Qwen3-architecture model and a matching dataset. User mistakes (bad spec, bad
dataset, missing model) print one readable error and exit with status 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(
    help="On-Policy Self-Distillation (OPSD) of LLMs.", no_args_is_help=True, add_completion=False
)
spec_app = typer.Typer(help="Inspect and validate job specs.", no_args_is_help=True)
dev_app = typer.Typer(
    help="Developer helpers: offline tiny model and dataset.", no_args_is_help=True
)
app.add_typer(spec_app, name="spec")
app.add_typer(dev_app, name="dev")

EXIT_USER_ERROR = 2


def register(parent: typer.Typer) -> None:
    """Mount the engine's commands on the top-level `opsd` command."""
    parent.command("train")(train)
    parent.command("report")(report)
    parent.add_typer(spec_app, name="spec")
    parent.add_typer(dev_app, name="dev")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(EXIT_USER_ERROR)


def _user_errors() -> tuple[type[Exception], ...]:
    from opsd_engine.checkpoint import ResumeMismatchError
    from opsd_engine.config import SpecError
    from opsd_engine.data import DatasetError
    from opsd_engine.local_run import RunDirectoryError
    from opsd_engine.modeling import ModelLoadError

    return (SpecError, DatasetError, ModelLoadError, RunDirectoryError, ResumeMismatchError)


@app.command()
def train(
    spec_file: Path = typer.Argument(
        ..., help="Job spec (YAML or JSON), same shape as POST /jobs."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from the latest complete checkpoint in --out."
    ),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Override optim.max_steps."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Train a LoRA adapter locally."""
    import shlex

    from opsd_engine.config import load_spec, parse_spec, spec_to_dict
    from opsd_engine.local_run import RunInterrupted, run_local

    try:
        spec = load_spec(spec_file)
        if max_steps is not None:
            data = spec_to_dict(spec)
            data["optim"]["max_steps"], data["optim"]["epochs"] = max_steps, None
            spec = parse_spec(data, source=str(spec_file))
        result = run_local(spec, out, resume=resume, progress=not no_progress)
    except _user_errors() as exc:
        _fail(str(exc))
        return
    except RunInterrupted as exc:
        again = ["opsd", "train", str(spec_file), "--out", str(out), "--resume"]
        if max_steps is not None:
            again += ["--max-steps", str(max_steps)]
        where = (
            f"the latest checkpoint is {exc.checkpoint}"
            if exc.checkpoint
            else "no checkpoint was written yet, so a resume starts from step 0"
        )
        typer.secho(
            f"interrupted after step {exc.step}; {where}.\nresume with: {shlex.join(again)}",
            fg=typer.colors.YELLOW,
            err=True,
        )
        raise typer.Exit(130) from None
    typer.echo(
        json.dumps(
            {
                "status": result.status,
                "step": result.step,
                "adapter": str(result.adapter_dir) if result.adapter_dir else None,
                "checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
                "metrics": str(Path(out) / "metrics.jsonl"),
            }
        )
    )


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="Output directory of `opsd train`."),
    plot: Path | None = typer.Option(
        None, "--plot", help="Also write the metric curves to this PNG."
    ),
) -> None:
    """Summarize a local run's metrics (and plot them)."""
    from opsd_engine.local_run import read_metrics
    from opsd_engine.report import format_table, plot_metrics, summarize

    rows = read_metrics(run_dir)
    if not rows:
        _fail(f"no metrics in {run_dir} (expected {run_dir}/metrics.jsonl)")
    typer.echo(f"{run_dir}: {len(rows)} steps")
    typer.echo(format_table(summarize(rows)))
    if plot is not None:
        typer.echo(f"plot: {plot_metrics(rows, plot, title=str(run_dir))}")


@spec_app.command("show")
def spec_show(spec_file: Path) -> None:
    """Validate a spec and print it with every default filled in."""
    from opsd_engine.config import load_spec, spec_to_dict

    try:
        spec = load_spec(spec_file)
    except _user_errors() as exc:
        _fail(str(exc))
        return
    typer.echo(json.dumps(spec_to_dict(spec), indent=2))


@dev_app.command("tiny-model")
def dev_tiny_model(
    directory: Path,
    seed: int = typer.Option(0, help="Weights are deterministic for a seed."),
) -> None:
    """Write a tiny Qwen3-architecture model + tokenizer built offline."""
    from opsd_engine.tiny import build_tiny_model

    path = build_tiny_model(directory, seed=seed)
    typer.echo(str(path))


@dev_app.command("tiny-dataset")
def dev_tiny_dataset(
    file: Path,
    n: int = typer.Option(64, "--n", help="Number of problems."),
    seed: int = typer.Option(0),
) -> None:
    """Write a small problem/solution/answer JSONL for the tiny model."""
    from opsd_engine.tiny import write_tiny_dataset

    path = write_tiny_dataset(file, n=n, seed=seed)
    typer.echo(str(path))


if __name__ == "__main__":
    app()
