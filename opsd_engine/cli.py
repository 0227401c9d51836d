"""The `opsd` command line: local training and developer helpers.

`opsd preflight SPEC` checks, before training, that self-distillation has something to teach
and that the two roles are aligned (:mod:`opsd_engine.preflight`; exit 1 when a check fails).
`opsd train SPEC --out DIR [--resume]` runs a job locally (Ctrl-C stops it after the current
step with a checkpoint, records an `interrupted` event, prints the command that resumes it and
exits 130); `opsd spec show SPEC` prints the
resolved spec with every default; `opsd dev tiny-model DIR` / `opsd dev tiny-dataset FILE` build
an offline tiny Qwen3-architecture model and a matching dataset. User mistakes (bad spec, bad
dataset, missing model) print one readable error and exit with status 2.

Several processes: ``torchrun --nproc_per_node N -m opsd_engine.cli train SPEC --out DIR`` or
``accelerate launch --num_processes N [--multi_gpu] -m opsd_engine.cli train ...`` form one
data-parallel group (gloo on the CPU, NCCL on GPUs). ``accelerate launch --cpu --num_processes
N`` starts a single process unless MPI is configured (accelerate's multi-CPU path), so `train`
hands such a launch to ``torch.distributed.run`` with the N read from the launcher's own
arguments (:func:`_relaunch_accelerate_cpu`). Rank 0 alone writes DIR's files and prints the
result line; SIGTERM or ``--stop-file`` stop every rank at the next poll, with a checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import sys
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
    parent.command("preflight")(preflight)
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
    from opsd_engine.preflight import PreflightFailed

    return (
        SpecError,
        DatasetError,
        ModelLoadError,
        RunDirectoryError,
        ResumeMismatchError,
        PreflightFailed,
    )


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
    stop_file: Path | None = typer.Option(
        None,
        "--stop-file",
        help="Stop (with a checkpoint) when this file appears; SIGTERM does the same.",
    ),
) -> None:
    """Train a LoRA adapter locally (or as one rank of a torchrun / accelerate launch group)."""
    import shlex

    _relaunch_accelerate_cpu()
    from opsd_engine.config import load_spec, parse_spec, spec_to_dict
    from opsd_engine.local_run import RunInterrupted, StopRequest, interrupted_at, run_local

    stop = StopRequest(stop_file)
    stop.handle_signals()
    try:
        spec = load_spec(spec_file)
        if max_steps is not None:
            data = spec_to_dict(spec)
            data["optim"]["max_steps"], data["optim"]["epochs"] = max_steps, None
            spec = parse_spec(data, source=str(spec_file))
        result = run_local(spec, out, resume=resume, progress=not no_progress, stop=stop)
    except _user_errors() as exc:
        _fail(str(exc))
        return
    except (RunInterrupted, KeyboardInterrupt) as caught:
        # The run has stopped: a further Ctrl-C (the second press of "stop at once" arriving
        # after the first one's graceful stop) must not cut the resume instructions short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        exc = caught if isinstance(caught, RunInterrupted) else interrupted_at(out)
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
    rank = next(
        (os.environ[n] for n in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK") if n in os.environ),
        "0",
    )
    if int(rank) != 0:
        return  # rank 0 reports the group's result
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


def _relaunch_accelerate_cpu() -> None:
    """``accelerate launch --cpu --num_processes N`` (N > 1) without MPI starts this one process
    with a rendezvous address but no rank: replace it by ``torch.distributed.run`` with
    ``--nproc_per_node N`` on the same address, N read from the launcher's arguments with
    accelerate's own parser. Anything else returns at once; exits with status 2 when N cannot
    be known."""
    env = os.environ
    launched_cpu = env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    ranked = any(name in env for name in ("RANK", "WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))
    if not launched_cpu or "MASTER_ADDR" not in env or ranked:
        return
    processes = _accelerate_launch_processes(os.getppid())
    if processes is None:
        _fail(
            "accelerate launch --cpu asked for several processes but started one (accelerate "
            "needs MPI for that); run `torchrun --nproc_per_node N -m opsd_engine.cli train ...`"
        )
    if processes is None or processes <= 1:
        return
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={processes}",
        f"--master_addr={env['MASTER_ADDR']}",
        f"--master_port={env.get('MASTER_PORT', '29500')}",
        "-m",
        "opsd_engine.cli",
        *sys.argv[1:],
    ]
    os.execv(sys.executable, command)


def _accelerate_launch_processes(pid: int) -> int | None:
    """``--num_processes`` of the ``accelerate launch`` process ``pid`` (its command line parsed
    by accelerate's parser; its ``--config_file`` consulted when the flag is absent)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return None
    if "launch" not in argv:
        return None
    from accelerate.commands.launch import launch_command_parser

    arguments = [a for a in argv[argv.index("launch") + 1 :] if a]
    try:
        parsed, _ = launch_command_parser().parse_known_args(arguments)
    except SystemExit:
        return None
    if parsed.num_processes is None and parsed.config_file:
        from accelerate.commands.config.config_args import load_config_from_file

        parsed.num_processes = load_config_from_file(parsed.config_file).num_processes
    return int(parsed.num_processes) if parsed.num_processes else None


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


EXIT_PREFLIGHT_FAILED = 1


@app.command()
def preflight(
    spec_file: Path = typer.Argument(
        ..., help="Job spec (YAML or JSON), same shape as POST /jobs."
    ),
    sample_size: int | None = typer.Option(
        None, "--sample-size", help="Problems sampled (1-256; default: the spec's preflight, 16)."
    ),
    samples_per_problem: int | None = typer.Option(
        None, "--samples-per-problem", help="Samples per problem and role (1-16; default 1)."
    ),
    profile_rollouts: int | None = typer.Option(
        None, "--profile-rollouts", help="Student rollouts in the divergence profile (1-32; 4)."
    ),
    max_new_tokens: int | None = typer.Option(
        None, "--max-new-tokens", help="Rollout length; default: the spec's max_new_tokens."
    ),
    min_gap: float | None = typer.Option(
        None, "--min-gap", help="Smallest privileged gap that passes (default: spec, 0.10)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 on a warning too."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress lines."),
) -> None:
    """Before training: the privileged gap, the divergence profile and the alignment checks.

    Exit status 0 when no check fails (warnings allowed unless --strict), 1 when one fails,
    2 for a bad spec, dataset, model or option.
    """
    from opsd_engine.config import load_spec
    from opsd_engine.preflight import format_report, run_preflight, settings_from_spec

    try:
        spec = load_spec(spec_file)
        settings = settings_from_spec(
            spec,
            sample_size=sample_size,
            samples_per_problem=samples_per_problem,
            profile_rollouts=profile_rollouts,
            max_new_tokens=max_new_tokens,
            min_gap=min_gap,
        )
    except (*_user_errors(), ValueError) as exc:
        _fail(str(exc))
        return

    def progress(phase: str, done: int, total: int) -> None:
        if not no_progress:
            what = {"student": "student samples", "teacher": "teacher samples"}.get(
                phase, "divergence profile"
            )
            typer.echo(f"pre-flight: {what} {done}/{total}", err=True)

    try:
        if not no_progress:
            typer.echo(f"pre-flight: loading {spec.base_model} and {spec.dataset_uri}", err=True)
        report = run_preflight(spec, settings, on_progress=progress)
    except (*_user_errors(), ValueError) as exc:
        _fail(str(exc))
        return
    typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else format_report(report))
    if report.status == "fail" or (strict and report.status == "warn"):
        raise typer.Exit(EXIT_PREFLIGHT_FAILED)


@spec_app.command("show")
def spec_show(
    spec_file: Path,
    json_output: bool = typer.Option(
        False, "--json", help="Print the whole spec as JSON (no sources)."
    ),
) -> None:
    """Validate a spec and print every value with what set it: you, its recipe, or the default."""
    from opsd_engine.config import load_spec_with_sources, spec_to_dict
    from opsd_engine.recipes import RECIPES

    try:
        spec, sources = load_spec_with_sources(spec_file)
    except _user_errors() as exc:
        _fail(str(exc))
        return
    if json_output:
        typer.echo(json.dumps(spec_to_dict(spec), indent=2))
        return
    if spec.recipe is not None:
        typer.echo(f"# recipe {spec.recipe}: {RECIPES[spec.recipe].source}")
    width = max(len(path) for path in sources)
    for path, (value, source) in sources.items():
        typer.echo(f"{path:<{width}}  {json.dumps(value):<24}  {source}")


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
