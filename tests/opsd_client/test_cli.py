"""The client half of `opsd` (`opsd jobs ...`) against the real running service.

Commands run in-process through typer's CliRunner on the real `opsd` app (and once through the
installed console script), checking human output, `--json` output and the documented exit codes.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from opsd_cli import app
from opsd_client.cli import (
    EXIT_AUTH,
    EXIT_JOB_FAILED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)
from tests.opsd_client.service import LiveService, closed_port, tiny_body
from tests.worker.helpers import opsd_command

runner = CliRunner()


def run(service: LiveService, *args: str, key: str | None = None, **env: str) -> Any:
    environment = {
        "OPSD_BASE_URL": service.base_url,
        "OPSD_API_KEY": key if key is not None else service.api_key,
        **env,
    }
    return runner.invoke(app, list(args), env=environment)


def ok_json(result: Any) -> Any:
    assert result.exit_code == EXIT_OK, (result.exit_code, result.output, result.stderr)
    return json.loads(result.stdout)


def test_submit_a_spec_file_and_wait_for_it(
    service: LiveService, tiny_model_dir: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    specs = tmp_path / "specs"
    specs.mkdir()
    body = tiny_body(tiny_model_dir, tiny_dataset)
    # paths relative to the spec file, as a user writes them
    body["base_model"] = os.path.relpath(tiny_model_dir, specs)
    body["dataset_uri"] = os.path.relpath(tiny_dataset, specs)
    (specs / "job.yaml").write_text(yaml.safe_dump(body))

    result = run(
        service,
        "jobs",
        "submit",
        str(specs / "job.yaml"),
        "--max-steps",
        "2",
        "--set",
        "loss.temperature=1.0",
        "--recipe",
        "paper-v1",
        "-m",
        "team=cli",
        "--wait",
        "--json",
    )
    job = ok_json(result)
    assert job["status"] == "succeeded" and job["progress"] == {
        "step": 2,
        "total_steps": 2,
        "eval": None,
    }
    assert job["spec"]["base_model"] == str(tiny_model_dir.resolve())
    assert job["spec"]["dataset_uri"] == str(tiny_dataset.resolve())
    assert job["metadata"] == {"team": "cli"}
    assert job["spec"]["recipe"] == "paper-v1"  # a label here: the file sets every field

    plain = run(
        service,
        "jobs",
        "submit",
        "--base-model",
        str(tiny_model_dir),
        "--dataset-uri",
        str(tiny_dataset),
        "--set",
        "optim.max_steps=1",
        "--set",
        'runtime={"dtype": "float32", "device": "cpu", "gradient_checkpointing": false}',
    )
    assert plain.exit_code == EXIT_OK, plain.output
    job_id = plain.stdout.split()[1]
    assert job_id.startswith("job_") and "opsd jobs wait" in plain.stdout
    waited = run(service, "jobs", "wait", job_id, "--poll", "0.2")
    assert waited.exit_code == EXIT_OK, (waited.output, waited.stderr)
    assert f"{job_id} succeeded (1/1 steps, final loss" in waited.stdout


def test_read_commands_in_tables_and_json(
    service: LiveService, done_job: dict[str, Any], tmp_path: Path
) -> None:
    job_id = done_job["id"]
    with service.http() as http:
        raw_metrics = http.get(f"/jobs/{job_id}/metrics").json()
        raw_events = http.get(f"/jobs/{job_id}/events").json()["data"]

    listed = ok_json(run(service, "jobs", "list", "--json", "--all"))
    assert job_id in [j["id"] for j in listed]
    table = run(service, "jobs", "list", "--status", "succeeded")
    assert table.exit_code == 0 and job_id in table.stdout and "succeeded" in table.stdout
    assert "ID" in table.stdout.splitlines()[0]

    assert ok_json(run(service, "jobs", "show", job_id, "--json")) == done_job
    sheet = run(service, "jobs", "show", job_id).stdout
    assert "succeeded" in sheet and "4/4 steps" in sheet and f"opsd jobs download {job_id}" in sheet
    assert "recipe" in sheet  # none for this job

    assert ok_json(run(service, "jobs", "metrics", job_id, "--json")) == raw_metrics
    metrics = run(service, "jobs", "metrics", job_id)
    lines = metrics.stdout.splitlines()
    assert metrics.exit_code == 0 and lines[0].split()[:3] == ["step", "loss", "divergence"]
    assert [line.split()[0] for line in lines[1:]] == ["1", "2", "3", "4"]
    tail = run(service, "jobs", "metrics", job_id, "--name", "loss", "--tail", "2").stdout
    assert [line.split()[0] for line in tail.splitlines()] == ["step", "3", "4"]
    plot = tmp_path / "plots" / "metrics.png"
    plotted = run(service, "jobs", "metrics", job_id, "--plot", str(plot))
    assert plotted.exit_code == 0 and f"wrote {plot}" in plotted.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000

    assert ok_json(run(service, "jobs", "events", job_id, "--json")) == raw_events
    log = run(service, "jobs", "logs", job_id).stdout.splitlines()
    # the job's lifecycle ends in `succeeded`; evals other tests ran on this shared finished job
    # log their eval_* events after it
    lifecycle = [line for line in log if " eval_" not in line]
    assert len(log) == len(raw_events) and "succeeded" in lifecycle[-1]
    first = str(raw_events[0]["id"])
    followed = run(service, "jobs", "events", job_id, "--follow", "--json", "--after", first)
    assert followed.exit_code == 0
    assert [json.loads(line) for line in followed.stdout.splitlines()] == raw_events[1:]

    folder = tmp_path / "adapter"
    downloaded = run(service, "jobs", "download", job_id, "-o", str(folder))
    assert downloaded.exit_code == 0 and downloaded.stdout.strip() == str(folder)
    assert (folder / "adapter_config.json").exists()
    archive = ok_json(
        run(service, "jobs", "download", job_id, "--archive", "-o", str(tmp_path), "--json")
    )
    assert Path(archive["path"]).name == f"{job_id}-adapter.tar.gz" and archive["archive"]

    assert ok_json(run(service, "jobs", "wait", job_id, "--json"))["status"] == "succeeded"


def test_exit_codes_that_scripts_rely_on(
    service: LiveService, done_job: dict[str, Any], tiny_model_dir: Path, tiny_dataset: Path
) -> None:
    missing = run(service, "jobs", "show", "job_nothere")
    assert missing.exit_code == EXIT_NOT_FOUND
    assert "404 job_not_found" in missing.stderr and not missing.stdout
    as_json = run(service, "jobs", "metrics", "job_nothere", "--json")
    assert as_json.exit_code == EXIT_NOT_FOUND
    assert json.loads(as_json.stderr)["error"] == {
        "code": "job_not_found",
        "message": "no job 'job_nothere'",
        "param": "job_id",
        "status": 404,
    }

    rejected = run(service, "jobs", "list", key="opsd_wrong")
    assert rejected.exit_code == EXIT_AUTH and "OPSD_API_KEY" in rejected.stderr

    invalid = run(
        service,
        "jobs",
        "submit",
        "--base-model",
        "m",
        "--dataset-uri",
        "/d.jsonl",
        "--set",
        "optim.learning_rate=-1",
    )
    assert invalid.exit_code == EXIT_USAGE and "optim.learning_rate" in invalid.stderr
    assert run(service, "jobs", "submit").exit_code == EXIT_USAGE
    assert run(service, "jobs", "list", "--limit", "zero").exit_code == EXIT_USAGE

    unreachable = run(service, "jobs", "list", OPSD_BASE_URL=f"http://127.0.0.1:{closed_port()}")
    assert unreachable.exit_code == EXIT_UNAVAILABLE and "could not reach" in unreachable.stderr

    body = tiny_body(tiny_model_dir, tiny_dataset, optim={"max_steps": 500})
    with service.http() as http:
        job_id = http.post("/jobs", json=body).json()["id"]
    timed_out = run(service, "jobs", "wait", job_id, "--timeout", "0.3", "--poll", "0.1")
    assert timed_out.exit_code == EXIT_TIMEOUT, timed_out.output
    assert ok_json(run(service, "jobs", "cancel", job_id, "--json"))["status"] in {
        "cancelled",
        "cancelling",
    }
    cancelled = run(service, "jobs", "wait", job_id, "--poll", "0.2")
    assert cancelled.exit_code == EXIT_JOB_FAILED and "was cancelled" in cancelled.stderr
    not_ready = run(service, "jobs", "download", job_id)
    assert not_ready.exit_code == EXIT_USAGE and "adapter_not_ready" in not_ready.stderr


def test_the_installed_console_script(service: LiveService, done_job: dict[str, Any]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPSD_")}
    env.update(OPSD_BASE_URL=service.base_url, OPSD_HOME=str(service.home))
    # no OPSD_API_KEY: for a local service the key `opsd up` saved in OPSD_HOME is used
    listed = subprocess.run(
        [*opsd_command(), "jobs", "list", "--json"], env=env, capture_output=True, timeout=60
    )
    assert listed.returncode == EXIT_OK, listed.stderr.decode()
    assert done_job["id"] in [j["id"] for j in json.loads(listed.stdout)]
    missing = subprocess.run(
        [*opsd_command(), "jobs", "show", "job_nothere"], env=env, capture_output=True, timeout=60
    )
    assert missing.returncode == EXIT_NOT_FOUND


@pytest.mark.parametrize("command", ["jobs", "evals"])
def test_help_lists_the_exit_codes(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Exit codes" in result.stdout
