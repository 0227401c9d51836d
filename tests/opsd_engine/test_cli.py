"""The `opsd` command: local train/resume files, dev helpers and readable user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from opsd_engine.cli import app

runner = CliRunner()


def _spec_file(tmp_path: Path, model: Path, data: Path, **extra) -> Path:
    body = {
        "base_model": str(model),
        "dataset_uri": str(data),
        "max_new_tokens": 8,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "optim": {
            "learning_rate": 5e-3,
            "batch_size": 2,
            "grad_accum": 1,
            "max_steps": 4,
            "warmup_ratio": 0.0,
        },
        "runtime": {"dtype": "float32", "device": "cpu", "gradient_checkpointing": False},
        **extra,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dev_helpers_write_a_loadable_model_and_dataset(tmp_path) -> None:
    result = runner.invoke(app, ["dev", "tiny-model", str(tmp_path / "m"), "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "config.json").is_file() and (
        tmp_path / "m" / "tokenizer.json"
    ).is_file()
    result = runner.invoke(app, ["dev", "tiny-dataset", str(tmp_path / "d.jsonl"), "--n", "5"])
    assert result.exit_code == 0, result.output
    rows = _rows(tmp_path / "d.jsonl")
    assert len(rows) == 5 and {"problem", "solution", "answer"} <= rows[0].keys()


def test_train_then_resume_writes_each_step_once(tmp_path, tiny_model_dir, tiny_dataset) -> None:
    spec = _spec_file(tmp_path, tiny_model_dir, tiny_dataset, checkpoint_every=2)
    out = tmp_path / "run"
    result = runner.invoke(
        app, ["train", str(spec), "--out", str(out), "--max-steps", "3", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "succeeded" and summary["step"] == 3
    assert [r["step"] for r in _rows(out / "metrics.jsonl")] == [1, 2, 3]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "checkpoints" / "step-000002" / "adapter" / "adapter_config.json").is_file()

    # a second plain run into the same directory is refused, not silently mixed
    again = runner.invoke(app, ["train", str(spec), "--out", str(out), "--no-progress"])
    assert again.exit_code == 2 and "--resume" in again.output

    # --resume of a finished run is a no-op that keeps every row once
    resumed = runner.invoke(
        app, ["train", str(spec), "--out", str(out), "--resume", "--max-steps", "3"]
    )
    assert resumed.exit_code == 0, resumed.output
    assert [r["step"] for r in _rows(out / "metrics.jsonl")] == [1, 2, 3]


def test_resume_after_a_crash_drops_rows_past_the_checkpoint(
    tmp_path, tiny_model_dir, tiny_dataset
) -> None:
    spec = _spec_file(tmp_path, tiny_model_dir, tiny_dataset, checkpoint_every=2)
    out = tmp_path / "run"
    assert (
        runner.invoke(app, ["train", str(spec), "--out", str(out), "--no-progress"]).exit_code == 0
    )
    # Simulate a crash after step 3: only step-2's checkpoint survived, rows 1-3 were written.
    import shutil

    for name in ("step-000004",):
        shutil.rmtree(out / "checkpoints" / name)
    rows = _rows(out / "metrics.jsonl")
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    result = runner.invoke(
        app, ["train", str(spec), "--out", str(out), "--resume", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in _rows(out / "metrics.jsonl")] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"divergence": "kl"}, "divergence"),
        ({"optim": {"learning_rate": -1}}, "optim.learning_rate"),
        ({"dataset": {"problem_field": "question"}}, "question"),
    ],
)
def test_user_errors_exit_2_with_the_field_named(
    tmp_path, tiny_model_dir, tiny_dataset, patch, needle
) -> None:
    spec = _spec_file(tmp_path, tiny_model_dir, tiny_dataset, **patch)
    result = runner.invoke(app, ["train", str(spec), "--out", str(tmp_path / "o"), "--no-progress"])
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert "Traceback" not in result.output


def test_missing_model_is_a_readable_error(tmp_path, tiny_dataset) -> None:
    spec = _spec_file(tmp_path, tmp_path / "no-such-model", tiny_dataset)
    result = runner.invoke(app, ["train", str(spec), "--out", str(tmp_path / "o"), "--no-progress"])
    assert result.exit_code == 2 and "cannot load tokenizer" in result.output


def test_report_prints_a_table_and_plots(tmp_path, tiny_model_dir, tiny_dataset) -> None:
    spec = _spec_file(tmp_path, tiny_model_dir, tiny_dataset)
    out = tmp_path / "run"
    assert (
        runner.invoke(app, ["train", str(spec), "--out", str(out), "--no-progress"]).exit_code == 0
    )
    result = runner.invoke(app, ["report", str(out), "--plot", str(tmp_path / "m.png")])
    assert result.exit_code == 0, result.output
    assert "divergence" in result.output
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_spec_show_fills_defaults(tmp_path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"base_model": "m", "dataset_uri": "d.jsonl"}))
    result = runner.invoke(app, ["spec", "show", str(path), "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["lora"]["r"] == 64


def test_preflight_prints_a_report_and_exits_1_on_a_failed_check(
    tmp_path, qwen3_base_model_dir, tiny_dataset
) -> None:
    options = ["--sample-size", "4", "--profile-rollouts", "2"]
    good = _spec_file(tmp_path, qwen3_base_model_dir, tiny_dataset)
    result = runner.invoke(app, ["preflight", str(good), *options])
    assert result.exit_code == 0, result.output
    assert "[PASS] generation_prompt_state" in result.output
    assert "pre-flight: student samples 4/4" in result.output  # progress (stderr, mixed here)
    result = runner.invoke(app, ["preflight", str(good), *options, "--json", "--no-progress"])
    report = json.loads(result.stdout)  # (stderr: the model's loading bar)
    assert report["n_problems"] == 4 and len(report["checks"]) == 4
    # random model: no gap, a warning, so --strict fails
    result = runner.invoke(app, ["preflight", str(good), *options, "--strict", "--no-progress"])
    assert result.exit_code == 1 and "[WARN] privileged_gap" in result.output

    mismatch = {"student_thinking": False, "teacher_thinking": True}
    bad = _spec_file(
        tmp_path,
        qwen3_base_model_dir,
        tiny_dataset,
        prompts={**mismatch, "allow_thinking_mismatch": True},
    )
    result = runner.invoke(app, ["preflight", str(bad), *options, "--no-progress"])
    assert result.exit_code == 1, result.output
    assert "[FAIL] generation_prompt_state" in result.output and "fix:" in result.output

    result = runner.invoke(app, ["preflight", str(good), "--sample-size", "0"])
    assert result.exit_code == 2 and "sample_size" in result.output


def test_spec_show_prints_each_value_with_its_source(tmp_path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("base_model: m\ndataset_uri: d.jsonl\nrecipe: official-2026-04\nbeta: 0.5\n")
    result = runner.invoke(app, ["spec", "show", str(path)])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()}
    assert lines["#"][:2] == ["recipe", "official-2026-04:"]
    assert lines["beta"] == ["0.5", "user"]
    assert lines["loss.vocab_clip"] == ["0.05", "recipe", "official-2026-04"]
    assert lines["optim.weight_decay"] == ["0.0", "default"]
