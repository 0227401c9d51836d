"""Resuming with a changed spec, and Ctrl-C on `opsd train`.

A resume may extend the run (more steps or epochs) and change what does not alter the steps
already done (eval and checkpoint cadence, retention, trackers, metadata); the change is
recorded as a `spec_changed` event. Any other difference is refused naming each field. Ctrl-C
stops after the current step with a checkpoint, records `interrupted` and says how to resume.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from opsd_engine.cli import app
from tests.opsd_engine.test_cli import _rows, _spec_file

runner = CliRunner()


def _events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


def _train(spec: Path, out: Path, *args: str):
    return runner.invoke(app, ["train", str(spec), "--out", str(out), "--no-progress", *args])


def test_a_run_can_be_extended_and_the_change_is_an_event(
    tmp_path, tiny_model_dir, tiny_dataset
) -> None:
    spec = _spec_file(tmp_path, tiny_model_dir, tiny_dataset, checkpoint_every=2)
    out = tmp_path / "run"
    first = _train(spec, out, "--max-steps", "2")
    assert first.exit_code == 0, first.output

    # the spec file says max_steps 4: resuming without --max-steps extends the run to 4 steps
    resumed = _train(spec, out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["step"] == 4
    assert [r["step"] for r in _rows(out / "metrics.jsonl")] == [1, 2, 3, 4]
    changed = [e for e in _events(out) if e["kind"] == "spec_changed"]
    assert len(changed) == 1
    assert changed[0]["data"]["changes"] == [{"field": "optim.max_steps", "old": 2, "new": 4}]
    assert "optim.max_steps 2 -> 4" in changed[0]["message"]
    # the extended run's learning rate follows the 4-step schedule from step 3 on
    lrs = [r["lr"] for r in _rows(out / "metrics.jsonl")]
    assert lrs[2] > lrs[3] > 0.0


def test_eval_and_checkpoint_cadence_can_change_on_resume(
    tmp_path, tiny_model_dir, tiny_dataset
) -> None:
    spec = _spec_file(tmp_path, tiny_model_dir, tiny_dataset, checkpoint_every=2)
    out = tmp_path / "run"
    assert _train(spec, out, "--max-steps", "2").exit_code == 0
    body = yaml.safe_load(spec.read_text())
    body.update(checkpoint_every=1, metadata={"note": "resumed"}, checkpoint={"keep_last": 3})
    body["optim"]["max_steps"] = 3
    spec.write_text(yaml.safe_dump(body))
    resumed = _train(spec, out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    fields = [
        c["field"]
        for e in _events(out)
        if e["kind"] == "spec_changed"
        for c in e["data"]["changes"]
    ]
    assert fields == [
        "checkpoint.keep_last",
        "checkpoint_every",
        "metadata.note",
        "optim.max_steps",
    ]


def test_a_resume_that_would_rewrite_the_past_names_every_differing_field(
    tmp_path, tiny_model_dir, tiny_dataset
) -> None:
    spec = _spec_file(tmp_path, tiny_model_dir, tiny_dataset, checkpoint_every=2)
    out = tmp_path / "run"
    assert _train(spec, out, "--max-steps", "2").exit_code == 0
    body = yaml.safe_load(spec.read_text())
    body["optim"]["learning_rate"] = 1e-3
    body["beta"] = 0.25
    spec.write_text(yaml.safe_dump(body))
    refused = _train(spec, out, "--resume")
    assert refused.exit_code == 2, refused.output
    assert "optim.learning_rate: 0.005 -> 0.001" in refused.output
    assert "beta: 0.5 -> 0.25" in refused.output
    assert "Traceback" not in refused.output
    assert [r["step"] for r in _rows(out / "metrics.jsonl")] == [1, 2]  # nothing was touched


def test_a_resume_cannot_end_before_its_checkpoint(tmp_path, tiny_model_dir, tiny_dataset) -> None:
    spec = _spec_file(tmp_path, tiny_model_dir, tiny_dataset, checkpoint_every=2)
    out = tmp_path / "run"
    assert _train(spec, out).exit_code == 0  # 4 steps
    refused = _train(spec, out, "--resume", "--max-steps", "2")
    assert refused.exit_code == 2, refused.output
    assert (
        "checkpoint is at step 4" in refused.output and "optim.max_steps: 4 -> 2" in refused.output
    )


def test_a_checkpoint_without_a_recorded_spec_resumes_only_with_the_same_spec(
    tmp_path, tiny_model_dir, tiny_dataset
) -> None:
    """Checkpoints of older versions carry only the fingerprint: same spec resumes, another is
    refused with a message that says why no field can be named."""
    spec = _spec_file(tmp_path, tiny_model_dir, tiny_dataset, checkpoint_every=2)
    out = tmp_path / "run"
    assert _train(spec, out, "--max-steps", "2").exit_code == 0
    state_file = out / "checkpoints" / "step-000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state.pop("spec")
    state_file.write_text(json.dumps(state))
    refused = _train(spec, out, "--resume", "--max-steps", "3")
    assert refused.exit_code == 2 and "predates" in refused.output
    assert _train(spec, out, "--resume", "--max-steps", "2").exit_code == 0


# ------------------------------------------------------------------------------------ Ctrl-C
def _opsd_train(spec: Path, out: Path, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "opsd_cli", "train", str(spec), "--out", str(out), *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_rows(out: Path, process: subprocess.Popen[str], count: int) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        path = out / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        if process.poll() is not None:
            raise AssertionError(process.communicate())
        time.sleep(0.05)
    process.kill()
    raise AssertionError("the run wrote no metrics")


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_records_interrupted_and_says_how_to_resume(
    tmp_path, tiny_model_dir, tiny_dataset, presses
) -> None:
    spec = _spec_file(tmp_path, tiny_model_dir, tiny_dataset, checkpoint_every=1)
    out = tmp_path / "run"
    process = _opsd_train(spec, out, "--max-steps", "200", "--no-progress")
    _wait_for_rows(out, process, 1)
    for _ in range(presses):
        process.send_signal(signal.SIGINT)
        time.sleep(0.05)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    resume_line = stderr.strip().splitlines()[-1]
    assert resume_line == f"resume with: opsd train {spec} --out {out} --resume --max-steps 200"
    kinds = [e["kind"] for e in _events(out)]
    assert kinds[-1] == "interrupted" and "cancelled" not in kinds
    interrupted = _events(out)[-1]
    done = _rows(out / "metrics.jsonl")[-1]["step"]
    assert interrupted["data"]["step"] == done
    assert f"interrupted after step {done}" in stderr

    resumed = _train(spec, out, "--resume", "--max-steps", str(done + 1))
    assert resumed.exit_code == 0, resumed.output
    assert [r["step"] for r in _rows(out / "metrics.jsonl")] == list(range(1, done + 2))


def test_a_second_ctrl_c_while_the_run_winds_down_still_exits_130(
    tmp_path, tiny_model_dir, tiny_dataset, monkeypatch
) -> None:
    """The race CI met: the first Ctrl-C's graceful stop was already over when the second press
    arrived, while the resume instructions were printed, and the process died of SIGINT (-2).
    Here the second press lands exactly there, every time."""
    import threading

    import typer

    spec = _spec_file(tmp_path, tiny_model_dir, tiny_dataset, checkpoint_every=1)
    out = tmp_path / "run"
    real_secho = typer.secho

    def secho_with_a_second_press(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the second press, while the run winds down
        return real_secho(*args, **kwargs)

    def first_press() -> None:
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(typer, "secho", secho_with_a_second_press)
    previous = signal.getsignal(signal.SIGINT)
    presser = threading.Thread(target=first_press, daemon=True)
    presser.start()
    try:
        result = _train(spec, out, "--max-steps", "200")
    finally:
        signal.signal(signal.SIGINT, previous)
        presser.join(timeout=5)
    assert result.exit_code == 130, result.output
    assert f"resume with: opsd train {spec} --out {out} --resume --max-steps 200" in result.output
    assert [e["kind"] for e in _events(out)][-1] == "interrupted"


# ------------------------------------------------------------------------ checkpoint retention
def test_keep_last_keeps_the_newest_checkpoints_plus_the_final_one(
    tmp_path, tiny_model_dir, tiny_dataset
) -> None:
    spec = _spec_file(
        tmp_path, tiny_model_dir, tiny_dataset, checkpoint_every=1, checkpoint={"keep_last": 2}
    )
    out = tmp_path / "run"
    assert _train(spec, out, "--max-steps", "3").exit_code == 0
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-000001", "step-000002", "step-000003"]  # 2 periodic + the final
    resumed = _train(spec, out, "--resume", "--max-steps", "5")
    assert resumed.exit_code == 0, resumed.output
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-000003", "step-000004", "step-000005"]  # nothing half-removed left
    removed = [e["data"]["step"] for e in _events(out) if e["kind"] == "checkpoint_removed"]
    assert removed == [1, 2]
