"""The client half of the `opsd` command: `opsd jobs ...` and `opsd evals ...` over HTTP.

Human-readable tables by default; `--json` prints JSON on stdout (errors as JSON on stderr) for
scripts. The service and key come from `--base-url` / `--api-key` (given before the
subcommand: `opsd jobs --base-url URL list`), else `OPSD_BASE_URL` / `OPSD_API_KEY`, else the
local `opsd up` default (`http://127.0.0.1:8000`, key from `$OPSD_HOME/api_key`).

Exit codes (stable, for scripts):

    0  success
    1  the job or eval ended failed or cancelled (`wait`, `submit --wait`, `evals wait`), or
       a pre-flight found a failing check or could not run (`jobs preflight`)
    2  usage or request error: bad flags or spec file, invalid field (422), conflict (409)
    3  not found (404; another tenant's ids are not found too)
    4  authentication: missing or rejected API key (401/403)
    5  the service is unreachable or failing (connection errors, 429/5xx after retries)
    6  `wait --timeout` ran out before the job finished
  130  interrupted (Ctrl-C); the job itself keeps running
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import typer
import yaml

from opsd_client import _render as render
from opsd_client._base import DEFAULT_BASE_URL, resolve_base_url
from opsd_client._client import Client
from opsd_client._files import UnsafeArchiveError
from opsd_client._render import UsageError
from opsd_client.errors import (
    APIConnectionError,
    APIStatusError,
    AuthenticationError,
    EvalFailedError,
    JobCancelledError,
    JobFailedError,
    NotFoundError,
    OPSDError,
    PermissionDeniedError,
    WaitTimeoutError,
)
from opsd_client.models import Event, Job, Metrics

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_AUTH = 4
EXIT_UNAVAILABLE = 5
EXIT_TIMEOUT = 6
EXIT_INTERRUPTED = 130

jobs_app = typer.Typer(
    help="Submit and follow training jobs on an OPSD service.",
    no_args_is_help=True,
    epilog="Exit codes: 0 ok, 1 job failed/cancelled, 2 usage or request error, 3 not found, "
    "4 authentication, 5 service unreachable or failing, 6 wait timed out, 130 interrupted.",
)
evals_app = typer.Typer(
    help="Evaluate trained adapters (avg@n, pass@k on a benchmark).",
    no_args_is_help=True,
    epilog="Exit codes: 0 ok, 1 eval failed, 2 usage or request error, 3 not found, "
    "4 authentication, 5 service unreachable or failing, 6 wait timed out, 130 interrupted.",
)

files_app = typer.Typer(
    help="Upload datasets (validated by the service); their ids are what dataset_uri takes.",
    no_args_is_help=True,
    epilog="Exit codes: 0 ok, 2 usage or invalid file (422), 3 not found, 4 authentication, "
    "5 service unreachable or failing.",
)

usage_app = typer.Typer(
    help="What this tenant used (device-seconds, tokens) over a time range.",
    invoke_without_command=True,
    epilog="Exit codes: 0 ok, 2 bad range (422), 4 authentication, 5 service unreachable.",
)

F = TypeVar("F", bound=Callable[..., Any])

JSON_OPTION = typer.Option(False, "--json", help="Print JSON (for scripts) instead of tables.")


def register(app: typer.Typer) -> None:
    """Mount `jobs` and `evals` on the top-level `opsd` command."""
    app.add_typer(jobs_app, name="jobs")
    app.add_typer(evals_app, name="evals")
    app.add_typer(files_app, name="files")
    app.add_typer(usage_app, name="usage")


# ----------------------------------------------------------------------------------- plumbing
@dataclass
class Connection:
    base_url: str | None
    api_key: str | None
    timeout: float

    def client(self) -> Client:
        base_url = resolve_base_url(self.base_url)
        return Client(
            base_url=base_url,
            api_key=self.api_key or _local_key(base_url),
            timeout=self.timeout,
        )


def _local_key(base_url: str) -> str | None:
    """The key `opsd up` saved, for a service on this machine only (never sent elsewhere)."""
    host = urlsplit(base_url).hostname or ""
    if host not in ("127.0.0.1", "localhost", "::1"):
        return None
    path = Path(os.environ.get("OPSD_HOME") or "~/.opsd").expanduser() / "api_key"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _connection_callback(
    ctx: typer.Context,
    base_url: str | None = typer.Option(
        None,
        "--base-url",
        envvar="OPSD_BASE_URL",
        help=f"Service URL (default: {DEFAULT_BASE_URL}).",
        show_default=False,
    ),
    api_key: str | None = typer.Option(
        None,
        "--api-key",
        envvar="OPSD_API_KEY",
        help="API key (default: the one `opsd up` saved, for a local service).",
        show_default=False,
        show_envvar=True,
    ),
    timeout: float = typer.Option(60.0, "--timeout-s", help="Seconds per HTTP request."),
) -> None:
    ctx.obj = Connection(base_url=base_url, api_key=api_key, timeout=timeout)


jobs_app.callback()(_connection_callback)
evals_app.callback()(_connection_callback)
files_app.callback()(_connection_callback)


def _client(ctx: typer.Context) -> Client:
    connection = ctx.obj if isinstance(ctx.obj, Connection) else Connection(None, None, 60.0)
    return connection.client()


def exit_code_for(exc: BaseException) -> int:
    """The documented exit code for an SDK exception."""
    if isinstance(exc, JobFailedError | JobCancelledError | EvalFailedError):
        return EXIT_JOB_FAILED
    if isinstance(exc, WaitTimeoutError):
        return EXIT_TIMEOUT
    if isinstance(exc, AuthenticationError | PermissionDeniedError):
        return EXIT_AUTH
    if isinstance(exc, NotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(exc, APIStatusError):
        return EXIT_UNAVAILABLE if exc.status == 429 or exc.status >= 500 else EXIT_USAGE
    if isinstance(exc, APIConnectionError):
        return EXIT_UNAVAILABLE
    return EXIT_USAGE


def _error_json(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, APIStatusError):
        detail = {"code": exc.code, "message": exc.message, "param": exc.param}
        return {"error": {**detail, "status": exc.status}}
    code = {
        JobFailedError: "job_failed",
        JobCancelledError: "job_cancelled",
        EvalFailedError: "eval_failed",
        WaitTimeoutError: "wait_timeout",
    }.get(type(exc), "connection_error" if isinstance(exc, APIConnectionError) else "error")
    body: dict[str, Any] = {"code": code, "message": str(exc), "param": None, "status": None}
    job = getattr(exc, "job", None)
    if job is not None:
        body["job"] = job.model_dump(mode="json")
    return {"error": body}


def handle_errors(func: F) -> F:
    """Turn SDK and usage errors into one line on stderr (JSON with `--json`) and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("json_output"))
        try:
            return func(*args, **kwargs)
        except (OPSDError, UsageError, FileExistsError, UnsafeArchiveError) as exc:
            if as_json:
                typer.echo(json.dumps(_error_json(exc)), err=True)
            else:
                message = str(exc)
                if isinstance(exc, AuthenticationError):
                    message += " (set OPSD_API_KEY or pass --api-key)"
                typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
            raise typer.Exit(exit_code_for(exc)) from None
        except KeyboardInterrupt:
            typer.echo("interrupted (a job keeps running on the service)", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))


def _dump(model: Any) -> Any:
    return model.model_dump(mode="json")


# ------------------------------------------------------------------------------------ submit
def _parse_assignment(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"expected FIELD=VALUE, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _assign(body: dict[str, Any], path: list[str], value: Any) -> None:
    node = body
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[path[-1]] = value


def _local_path(value: Any, base: Path) -> Any:
    """A relative local path made absolute (the service may run elsewhere); other values as is."""
    if not isinstance(value, str) or not value or "://" in value or value.startswith("~"):
        return str(Path(value).expanduser()) if isinstance(value, str) and value else value
    path = Path(value)
    if path.is_absolute():
        return value
    candidate = base / path
    return str(candidate.resolve()) if candidate.exists() else value


def load_spec_file(path: Path) -> dict[str, Any]:
    """A spec file (YAML or JSON) as a dict, local paths made absolute relative to the file."""
    try:
        body = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"cannot read spec {path}: {exc}") from None
    if not isinstance(body, dict):
        raise UsageError(f"{path}: a job spec is a mapping of fields (see POST /jobs)")
    base = path.resolve().parent
    for key in ("base_model", "dataset_uri"):
        if key in body:
            body[key] = _local_path(body[key], base)
    if isinstance(body.get("eval"), dict) and body["eval"].get("dataset_uri"):
        body["eval"]["dataset_uri"] = _local_path(body["eval"]["dataset_uri"], base)
    return body


@jobs_app.command("submit")
@handle_errors
def submit(
    ctx: typer.Context,
    spec_file: Path | None = typer.Argument(
        None,
        help="Job spec (YAML or JSON), the same document as the body of POST /jobs.",
        exists=True,
        dir_okay=False,
        show_default=False,
    ),
    base_model: str | None = typer.Option(None, "--base-model", help="Model id or path."),
    dataset_uri: str | None = typer.Option(None, "--dataset-uri", help="Training data URI."),
    method: str | None = typer.Option(None, "--method", help="opsd (default), sft or grpo."),
    recipe: str | None = typer.Option(
        None, "--recipe", help="Defaults preset: paper-v1 or official-2026-04 (fields win)."
    ),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Sets optim.max_steps."),
    overrides: list[str] = typer.Option(
        [], "--set", help="Set any field, e.g. --set optim.learning_rate=1e-5 (repeatable)."
    ),
    metadata: list[str] = typer.Option(
        [], "--metadata", "-m", help="Attach key=value metadata (repeatable)."
    ),
    idempotency_key: str | None = typer.Option(
        None, "--idempotency-key", help="Resubmitting with the same key returns the same job."
    ),
    wait: bool = typer.Option(False, "--wait", help="Then wait for the job, as `opsd jobs wait`."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Submit a training job from a spec file and/or flags (flags win).

    Relative local paths (model, dataset) are made absolute, since the service may run
    elsewhere. Prints the job id; with --wait, waits as `opsd jobs wait` does.
    """
    body = load_spec_file(spec_file) if spec_file is not None else {}
    cwd = Path.cwd()
    if base_model is not None:
        body["base_model"] = _local_path(base_model, cwd)
    if dataset_uri is not None:
        body["dataset_uri"] = _local_path(dataset_uri, cwd)
    if method is not None:
        body["method"] = method
    if recipe is not None:
        body["recipe"] = recipe
    if max_steps is not None:
        _assign(body, ["optim", "max_steps"], max_steps)
    for item in overrides:
        _assign(body, *_parse_assignment(item))
    for item in metadata:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--metadata expects key=value, got {item!r}")
        body.setdefault("metadata", {})[key] = value
    if not body.get("base_model") or not body.get("dataset_uri"):
        raise UsageError("give a spec file, or --base-model and --dataset-uri")
    with _client(ctx) as client:
        job = client.jobs.create(spec=body, idempotency_key=idempotency_key)
        if wait:
            _wait(client, job.id, timeout=None, poll=2.0, json_output=json_output, quiet=False)
            return
    if json_output:
        _print_json(_dump(job))
        return
    typer.echo(f"submitted {job.id} ({job.status})")
    typer.echo(f"  follow it: opsd jobs wait {job.id}   (or: opsd jobs events {job.id} --follow)")


# ----------------------------------------------------------------------------- list and show
@jobs_app.command("list")
@handle_errors
def list_jobs(
    ctx: typer.Context,
    status: str | None = typer.Option(None, "--status", help="Only jobs in this state."),
    limit: int = typer.Option(20, "--limit", "-n", min=1, help="How many jobs (newest first)."),
    every: bool = typer.Option(False, "--all", help="Every job (all pages)."),
    json_output: bool = JSON_OPTION,
) -> None:
    """List your jobs, newest first."""
    with _client(ctx) as client:
        jobs = list(
            client.jobs.list(
                status=status, limit=min(limit, 100), max_items=None if every else limit
            )
        )
    if json_output:
        _print_json([_dump(j) for j in jobs])
    elif not jobs:
        typer.echo("no jobs" + (f" with status {status}" if status else ""))
    else:
        render.show(render.jobs_table(jobs))


@jobs_app.command("show")
@handle_errors
def show(
    ctx: typer.Context,
    job_id: str = typer.Argument(..., help="Job id (job_...)."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Show one job: status, progress, spec summary, error, adapter."""
    with _client(ctx) as client:
        job = client.jobs.retrieve(job_id)
    if json_output:
        _print_json(_dump(job))
    else:
        render.show(render.job_sheet(job))


@jobs_app.command("cancel")
@handle_errors
def cancel(
    ctx: typer.Context,
    job_id: str = typer.Argument(..., help="Job id (job_...)."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Cancel a job (a running one stops at its next step, keeping a checkpoint)."""
    with _client(ctx) as client:
        job = client.jobs.cancel(job_id)
    if json_output:
        _print_json(_dump(job))
    else:
        typer.echo(f"{job.id}: {job.status}")


# --------------------------------------------------------------------------------- pre-flight
_BADGES = {"pass": "PASS", "warn": "WARN", "fail": "FAIL"}


def preflight_text(found: Any) -> str:
    """A finished pre-flight for people: the gap, the first profile positions, one line per
    check (with its fix when it did not pass)."""
    if found.status == "failed":
        error = found.error
        detail = f"{error.code}: {error.message}" if hasattr(error, "code") else str(error)
        return f"{found.id}: the pre-flight could not run ({detail})"
    report = found.report
    if report is None:
        return f"{found.id}: {found.status}"

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1%}"

    lines = [
        f"{found.id} (job {found.job_id}): {_BADGES.get(report.status or '', report.status)} "
        f"({report.n_problems} problems x {report.samples_per_problem} samples)",
        f"  student without the reference: {pct(report.student_accuracy)}",
        f"  teacher with the reference:    {pct(report.teacher_accuracy)}",
    ]
    if report.gap is not None:
        lines.append(f"  privileged gap:                {report.gap:+.1%}")
    if report.divergence_profile:
        first = " ".join(f"{v:.3f}" for v in report.divergence_profile[:8])
        lines.append(f"  {report.divergence} per position (nats), first tokens: {first}")
    for check in report.checks:
        lines.append(f"  [{_BADGES[check.status]}] {check.name}: {check.message}")
        if check.status != "pass" and check.fix:
            lines.append(f"         fix: {check.fix}")
    return "\n".join(lines)


@jobs_app.command("preflight")
@handle_errors
def preflight(
    ctx: typer.Context,
    job_id: str = typer.Argument(..., help="Job id (job_...)."),
    sample_size: int | None = typer.Option(None, "--sample-size", help="Problems (1-256)."),
    samples_per_problem: int | None = typer.Option(
        None, "--samples-per-problem", help="Samples per problem and role (1-16)."
    ),
    profile_rollouts: int | None = typer.Option(
        None, "--profile-rollouts", help="Rollouts in the divergence profile (1-32)."
    ),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens"),
    min_gap: float | None = typer.Option(None, "--min-gap", help="Gap that passes (0.10)."),
    show_only: bool = typer.Option(
        False, "--show", help="Show the latest pre-flight instead of starting one."
    ),
    no_wait: bool = typer.Option(False, "--no-wait", help="Start it and return."),
    timeout: float | None = typer.Option(None, "--timeout", min=0, help="Exit 6 after this."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Run a job's pre-flight (privileged gap, divergence profile, alignment checks) and print
    its report; exit 1 when a check fails or the pre-flight could not run."""
    with _client(ctx) as client:
        if show_only:
            found = client.jobs.retrieve_preflight(job_id)
        else:
            found = client.jobs.preflight(
                job_id,
                sample_size=sample_size,
                samples_per_problem=samples_per_problem,
                profile_rollouts=profile_rollouts,
                max_new_tokens=max_new_tokens,
                min_gap=min_gap,
            )
            if not json_output:
                typer.echo(f"{found.id}: {found.status}", err=True)
            if not no_wait:
                found = client.jobs.wait_preflight(job_id, timeout=timeout, poll=1.0)
    if json_output:
        _print_json(_dump(found))
    else:
        typer.echo(preflight_text(found))
    verdict = found.report.status if found.report is not None else None
    if found.status == "failed" or verdict == "fail":
        raise typer.Exit(EXIT_JOB_FAILED)


# ------------------------------------------------------------------------------------ metrics
@jobs_app.command("metrics")
@handle_errors
def metrics(
    ctx: typer.Context,
    job_id: str = typer.Argument(..., help="Job id (job_...)."),
    names: list[str] = typer.Option(
        [], "--name", "-n", help="Metric name (repeatable); default: the usual ones."
    ),
    every: bool = typer.Option(False, "--all", help="Every metric the job logged."),
    step_min: int | None = typer.Option(None, "--step-min", min=0),
    step_max: int | None = typer.Option(None, "--step-max", min=0),
    max_points: int | None = typer.Option(
        None, "--max-points", min=2, help="Downsample long runs (bucket means)."
    ),
    tail: int | None = typer.Option(None, "--tail", min=0, help="Only the last N steps."),
    plot: Path | None = typer.Option(
        None, "--plot", help="Also write a chart of the metrics to this PNG file."
    ),
    json_output: bool = JSON_OPTION,
) -> None:
    """Training metrics per optimizer step, as a table, JSON or a PNG chart."""
    with _client(ctx) as client:
        data = client.jobs.metrics(
            job_id,
            names=names or None,
            step_min=step_min,
            step_max=step_max,
            max_points=max_points,
        )
    chosen = render.chosen_metrics(data, names, every)
    if plot is not None:
        render.plot_metrics(data, chosen, plot, title=job_id)
    if json_output:
        _print_json(_dump(data))
        return
    if not data.metrics:
        typer.echo("no metrics yet")
    else:
        render.show(render.metrics_table(data, chosen, tail))
    if plot is not None:
        typer.echo(f"wrote {plot}", err=True)


# ------------------------------------------------------------------------------------- events
@handle_errors
def events(
    ctx: typer.Context,
    job_id: str = typer.Argument(..., help="Job id (job_...)."),
    follow: bool = typer.Option(
        False, "--follow", "-f", help="Keep streaming new events until the job is final."
    ),
    after: int = typer.Option(0, "--after", min=0, help="Only events after this event id."),
    json_output: bool = typer.Option(
        False, "--json", help="Print JSON: an array, or one object per line with --follow."
    ),
) -> None:
    """The job's events (queued, running, checkpoints, errors, ...); --follow streams them."""
    with _client(ctx) as client:
        if follow:
            for event in client.jobs.stream_events(job_id, after_id=after):
                if json_output:
                    typer.echo(event.model_dump_json())
                else:
                    render.show(render.event_line(event))
            return
        found: list[Event] = client.jobs.events(job_id, after_id=after)
    if json_output:
        _print_json([_dump(e) for e in found])
        return
    for event in found:
        render.show(render.event_line(event))


jobs_app.command("events")(events)
jobs_app.command("logs", help="Same as `events` (the job's log of events).")(events)


# --------------------------------------------------------------------------------------- wait
def _latest_loss(client: Client, job: Job, seen: dict[str, Any]) -> float | None:
    """The loss at the job's latest step (one small metrics request when the step changed)."""
    step = job.progress.step
    if step and seen.get("step") != step:
        data: Metrics = client.jobs.metrics(job.id, names=["loss"], step_min=step)
        if "loss" in data and data["loss"].values:
            seen["loss"] = data["loss"].last
        seen["step"] = step
    return seen.get("loss")


def _wait(
    client: Client,
    job_id: str,
    *,
    timeout: float | None,
    poll: float,
    json_output: bool,
    quiet: bool,
) -> Job:
    from rich.progress import (
        BarColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    seen: dict[str, Any] = {}
    started = time.monotonic()
    err = render.console(stderr=True)
    show_bar = not quiet and err.is_terminal
    bar = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        TextColumn("{task.fields[status]}"),
        BarColumn(),
        TextColumn("step {task.fields[steps]}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=not show_bar,
    )
    task = bar.add_task(job_id, total=None, status="", steps="-", loss="-")
    last_status: list[str] = []

    def update(job: Job) -> None:
        loss = _latest_loss(client, job, seen) if job.status == "running" else seen.get("loss")
        total = job.progress.total_steps
        evaluating = job.progress.eval if job.status == "running" else None
        status = f"{job.status} · {evaluating.describe()}" if evaluating else job.status
        bar.update(
            task,
            total=total,
            completed=job.progress.step,
            status=status,
            steps=render.progress(job),
            loss=render.number(loss),
        )
        # without a terminal: a line per status change, and per tenth of a running eval
        tenth = evaluating.done * 10 // max(evaluating.total, 1) if evaluating else -1
        key = f"{job.status}/{evaluating.role if evaluating else ''}/{tenth}"
        if not show_bar and not quiet and not json_output and last_status[-1:] != [key]:
            err.print(f"{job.id}: {status} (step {render.progress(job)})")
        last_status.append(key)

    try:
        with bar:
            job = client.jobs.wait(job_id, timeout=timeout, poll=poll, on_update=update)
    except (JobFailedError, JobCancelledError) as exc:
        if not json_output:
            render.show(render.job_sheet(exc.job))
        raise
    if json_output:
        _print_json(_dump(job))
    else:
        # A short job can go from queued to succeeded between two polls: read its last loss now.
        loss = _latest_loss(client, job, seen)
        took = render.duration(time.monotonic() - started)
        detail = f"{render.progress(job)} steps" + (
            f", final loss {render.number(loss)}" if loss is not None else ""
        )
        typer.echo(f"{job.id} succeeded ({detail}; waited {took})")
    return job


@jobs_app.command("wait")
@handle_errors
def wait(
    ctx: typer.Context,
    job_id: str = typer.Argument(..., help="Job id (job_...)."),
    timeout: float | None = typer.Option(
        None, "--timeout", min=0, help="Give up after this many seconds (exit code 6)."
    ),
    poll: float = typer.Option(2.0, "--poll", min=0.05, help="Seconds between checks."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Wait for a job, with a progress bar (step, loss, ETA).

    Exit code 0 when it succeeded, 1 when it failed or was cancelled, 6 on --timeout.
    """
    with _client(ctx) as client:
        _wait(client, job_id, timeout=timeout, poll=poll, json_output=json_output, quiet=quiet)


# ----------------------------------------------------------------------------------- download
@jobs_app.command("download")
@handle_errors
def download(
    ctx: typer.Context,
    job_id: str = typer.Argument(..., help="Job id of a succeeded job."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Folder for the adapter [default: ./<job id>-adapter]."
    ),
    archive: bool = typer.Option(
        False, "--archive", help="Keep the .tar.gz as sent instead of unpacking it."
    ),
    json_output: bool = JSON_OPTION,
) -> None:
    """Download the trained LoRA adapter (PEFT format: load it with PeftModel.from_pretrained)."""
    default = Path(f"{job_id}-adapter.tar.gz" if archive else f"{job_id}-adapter")
    with _client(ctx) as client:
        path = client.jobs.download_adapter(job_id, out or default, extract=not archive)
    if json_output:
        _print_json({"job_id": job_id, "path": str(path.resolve()), "archive": archive})
    else:
        typer.echo(str(path))


# -------------------------------------------------------------------------------------- evals
@evals_app.command("create")
@handle_errors
def evals_create(
    ctx: typer.Context,
    job_id: str = typer.Argument(..., help="Job whose adapter to evaluate."),
    dataset_uri: str | None = typer.Option(None, "--dataset-uri", help="Benchmark file."),
    problem_field: str | None = typer.Option(None, "--problem-field"),
    answer_field: str | None = typer.Option(None, "--answer-field"),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Only the first N problems."),
    n: int | None = typer.Option(None, "--n", min=1, help="Samples per problem (avg@n)."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", min=1),
    temperature: float | None = typer.Option(None, "--temperature", min=0),
    top_p: float | None = typer.Option(None, "--top-p"),
    top_k: int | None = typer.Option(None, "--top-k", min=0),
    thinking: bool | None = typer.Option(
        None, "--thinking/--no-thinking", help="Qwen3 thinking mode.", show_default=False
    ),
    include_base: bool | None = typer.Option(
        None, "--include-base/--adapter-only", help="Also evaluate the base model."
    ),
    checkpoint_step: int | None = typer.Option(
        None, "--checkpoint-step", min=0, help="Evaluate this checkpoint instead of the end."
    ),
    wait: bool = typer.Option(False, "--wait", help="Then wait for the results."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Start an evaluation of a job's adapter."""
    with _client(ctx) as client:
        evaluation = client.evals.create(
            job_id,
            dataset_uri=_local_path(dataset_uri, Path.cwd()) if dataset_uri else None,
            problem_field=problem_field,
            answer_field=answer_field,
            limit=limit,
            n=n,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            thinking=thinking,
            include_base=include_base,
            checkpoint_step=checkpoint_step,
        )
        if wait:
            evaluation = _wait_eval(client, evaluation.id, None, 2.0, json_output)
    if json_output:
        _print_json(_dump(evaluation))
    elif not wait:
        typer.echo(f"created {evaluation.id} ({evaluation.status})")
        typer.echo(f"  follow it: opsd evals wait {evaluation.id}")


def _eval_status(evaluation: Any) -> str:
    """`running: evaluating the adapter: 40/128 problems, 12.3 samples/s` (or the status)."""
    if evaluation.status == "running" and evaluation.progress is not None:
        return f"running: {evaluation.progress.describe()}"
    return str(evaluation.status)


def _wait_eval(
    client: Client, eval_id: str, timeout: float | None, poll: float, json_output: bool
) -> Any:
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    err = render.console(stderr=True)
    show_bar = not json_output and err.is_terminal
    bar = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=err,
        disable=not show_bar,
    )
    task = bar.add_task(eval_id, total=None, status="")
    shown: list[str] = []

    def update(evaluation: Any) -> None:
        progress = evaluation.progress if evaluation.status == "running" else None
        bar.update(
            task,
            total=progress.total if progress else None,
            completed=progress.done if progress else 0,
            status=_eval_status(evaluation),
        )
        # without a terminal (logs, CI): a line when the status or the sampled model changes
        # and at every tenth of the problems
        if not show_bar and not json_output:
            tenth = progress.done * 10 // max(progress.total, 1) if progress else -1
            key = f"{evaluation.status}/{progress.role if progress else ''}/{tenth}"
            if shown[-1:] != [key]:
                shown.append(key)
                err.print(f"{eval_id}: {_eval_status(evaluation)}")

    try:
        with bar:
            evaluation = client.evals.wait(eval_id, timeout=timeout, poll=poll, on_update=update)
    except EvalFailedError as exc:
        if not json_output:
            render.show(render.eval_sheet(exc.eval))
        raise
    if not json_output:
        render.show(render.eval_sheet(evaluation))
    return evaluation


@evals_app.command("list")
@handle_errors
def evals_list(
    ctx: typer.Context,
    job_id: str = typer.Argument(..., help="Job id (job_...)."),
    json_output: bool = JSON_OPTION,
) -> None:
    """List a job's evaluations, oldest first."""
    with _client(ctx) as client:
        evaluations = client.evals.list(job_id)
    if json_output:
        _print_json([_dump(e) for e in evaluations])
    elif not evaluations:
        typer.echo(f"no evals of {job_id} yet")
    else:
        render.show(render.evals_table(evaluations))


@evals_app.command("show")
@handle_errors
def evals_show(
    ctx: typer.Context,
    eval_id: str = typer.Argument(..., help="Eval id (eval_...)."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Show an evaluation and its results."""
    with _client(ctx) as client:
        evaluation = client.evals.retrieve(eval_id)
    if json_output:
        _print_json(_dump(evaluation))
    else:
        render.show(render.eval_sheet(evaluation))


@evals_app.command("wait")
@handle_errors
def evals_wait(
    ctx: typer.Context,
    eval_id: str = typer.Argument(..., help="Eval id (eval_...)."),
    timeout: float | None = typer.Option(None, "--timeout", min=0, help="Exit 6 after this."),
    poll: float = typer.Option(2.0, "--poll", min=0.05),
    json_output: bool = JSON_OPTION,
) -> None:
    """Wait for an evaluation; exit 0 when it succeeded, 1 when it failed."""
    with _client(ctx) as client:
        evaluation = _wait_eval(client, eval_id, timeout, poll, json_output)
    if json_output:
        _print_json(_dump(evaluation))


# ------------------------------------------------------------------------------------ files
def _file_row(file: Any) -> str:
    created = file.created_at.isoformat(timespec="seconds")
    fields = ",".join(file.fields)
    return f"{file.id}\t{file.filename}\t{file.rows} rows\t{file.bytes} B\t{fields}\t{created}"


@files_app.command("upload")
@handle_errors
def files_upload(
    ctx: typer.Context,
    path: Path = typer.Argument(..., exists=True, dir_okay=False, help="JSONL/JSON/CSV/Parquet."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Upload a dataset; prints its id (use it as dataset_uri)."""
    with _client(ctx) as client:
        file = client.files.create(path)
    if json_output:
        _print_json(_dump(file))
    else:
        typer.echo(f"uploaded {file.filename}: {file.rows} rows, fields {', '.join(file.fields)}")
        typer.echo(file.id)


@files_app.command("list")
@handle_errors
def files_list(ctx: typer.Context, json_output: bool = JSON_OPTION) -> None:
    """This tenant's files, newest first."""
    with _client(ctx) as client:
        files = client.files.list()
    if json_output:
        _print_json([_dump(f) for f in files])
        return
    for file in files:
        typer.echo(_file_row(file))


@files_app.command("show")
@handle_errors
def files_show(
    ctx: typer.Context, file_id: str = typer.Argument(...), json_output: bool = JSON_OPTION
) -> None:
    """One file: name, format, rows, fields, size, checksum."""
    with _client(ctx) as client:
        file = client.files.retrieve(file_id)
    if json_output:
        _print_json(_dump(file))
    else:
        typer.echo(_file_row(file) + f"\tsha256 {file.sha256}")


@files_app.command("delete")
@handle_errors
def files_delete(ctx: typer.Context, file_id: str = typer.Argument(...)) -> None:
    """Delete a file (jobs that have not read it yet will fail)."""
    with _client(ctx) as client:
        client.files.delete(file_id)
    typer.echo(f"deleted {file_id}")


@usage_app.callback()
@handle_errors
def usage(
    ctx: typer.Context,
    start: str | None = typer.Option(
        None, "--start", help="ISO 8601, inclusive (default: 30 days before --end)."
    ),
    end: str | None = typer.Option(None, "--end", help="ISO 8601, exclusive (default: now)."),
    base_url: str | None = typer.Option(
        None, "--base-url", envvar="OPSD_BASE_URL", show_default=False, help="Service URL."
    ),
    api_key: str | None = typer.Option(
        None, "--api-key", envvar="OPSD_API_KEY", show_default=False, help="API key."
    ),
    timeout: float = typer.Option(60.0, "--timeout-s", help="Seconds per HTTP request."),
    json_output: bool = JSON_OPTION,
) -> None:
    """`GET /usage`: device-seconds, generated / scored / eval tokens, in total and per job."""
    ctx.obj = Connection(base_url=base_url, api_key=api_key, timeout=timeout)
    with _client(ctx) as client:
        report = client.usage.retrieve(start=start, end=end)
    if json_output:
        _print_json(_dump(report))
        return
    typer.echo(f"usage from {report.start.isoformat()} to {report.end.isoformat()}")
    header = ("job", "steps", "device_s", "generated", "teacher", "student", "eval")
    rows = [(j.job_id, j) for j in report.jobs] + [("total", report.totals)]
    typer.echo("  ".join(f"{h:>12}" if i else f"{h:<30}" for i, h in enumerate(header)))
    for name, u in rows:
        values = (
            u.steps,
            f"{u.device_seconds:.1f}",
            u.generated_tokens,
            u.teacher_scored_tokens,
            u.student_scored_tokens,
            u.eval_tokens,
        )
        typer.echo(f"{name:<30}  " + "  ".join(f"{v:>12}" for v in values))


def main() -> None:  # pragma: no cover - `python -m opsd_client.cli` without the engine
    app = typer.Typer(no_args_is_help=True, add_completion=False)
    register(app)
    app(prog_name="opsd")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
