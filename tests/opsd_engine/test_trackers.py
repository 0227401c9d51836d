"""`report_to: [tensorboard, wandb, mlflow]` on a real tiny run, each tracker in its offline mode
and read back with its own library: TensorBoard event files (EventAccumulator), a W&B offline run
directory (its run log holds the spec and every metric), an MLflow file store
(MlflowClient). Locations and modes come from the environment, never from the spec."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from opsd_engine.cli import app
from tests.opsd_engine.test_cli import _rows, _spec_file

runner = CliRunner()
STEPS = 2


@pytest.fixture
def tracked_run(tmp_path, tiny_model_dir, tiny_dataset, monkeypatch) -> tuple[Path, list[dict]]:
    pytest.importorskip("tensorboard", reason="the trackers extra: pip install 'opsd[trackers]'")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_PROJECT", "opsd-tests")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3: file stores by opt-in
    (tmp_path / "wandb").mkdir()
    spec = _spec_file(
        tmp_path, tiny_model_dir, tiny_dataset, report_to=["tensorboard", "wandb", "mlflow"]
    )
    out = tmp_path / "run"
    result = runner.invoke(
        app, ["train", str(spec), "--out", str(out), "--max-steps", str(STEPS), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    return tmp_path, _rows(out / "metrics.jsonl")


def test_every_metric_and_the_spec_reach_all_three_trackers(tracked_run) -> None:
    root, rows = tracked_run
    assert [r["step"] for r in rows] == [1, 2]
    names = [k for k in rows[0] if k != "step"]

    # TensorBoard: the event files of run "run", read back with tensorboard's own reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(root / "tb" / "run"), size_guidance={"scalars": 0})
    events.Reload()
    assert set(names) <= set(events.Tags()["scalars"])
    for name in names:
        logged = [(e.step, e.value) for e in events.Scalars(name)]
        assert logged == [(r["step"], pytest.approx(r[name], rel=1e-6)) for r in rows], name
    assert "spec/text_summary" in events.Tags()["tensors"]

    # W&B: an offline run directory (what `wandb sync` uploads); its .wandb log holds the
    # config (the spec) and every history row, as JSON text inside protobuf records
    runs = list((root / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    log = next(runs[0].glob("*.wandb")).read_bytes()
    assert re.search(rb'"max_steps":\s*2\b', log) and b"report_to" in log
    for name in names:
        assert name.encode() in log, name

    # MLflow: a file store, read back with MlflowClient
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(root / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("opsd")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["optim.max_steps"] == str(STEPS)
    for name in names:
        history = client.get_metric_history(run.info.run_id, name)
        assert [(m.step, m.value) for m in history] == [
            (r["step"], pytest.approx(r[name], rel=1e-6)) for r in rows
        ], name


def test_report_to_rejects_unknown_trackers_naming_the_field(tmp_path) -> None:
    from opsd_engine.config import SpecError, parse_spec

    with pytest.raises(SpecError) as raised:
        parse_spec({"base_model": "m", "dataset_uri": "d", "report_to": ["neptune"]})
    assert raised.value.first_field == "report_to.0"
