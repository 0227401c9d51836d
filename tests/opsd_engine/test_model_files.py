"""Files the engine writes are usable by others: models, checkpoints and adapters get the mode a
plain `open()` gives (safetensors alone leaves weights 0600), and loading a model with a LoRA
adapter prints no library FutureWarning."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from tests.opsd_engine.test_cli import _spec_file


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _expected_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def test_model_checkpoint_and_adapter_files_are_readable_like_any_file(
    tmp_path: Path, tiny_dataset: Path
) -> None:
    from typer.testing import CliRunner

    from opsd_engine.cli import app

    runner = CliRunner()
    model = tmp_path / "model"
    assert runner.invoke(app, ["dev", "tiny-model", str(model)]).exit_code == 0
    expected = _expected_file_mode()
    assert _mode(model / "model.safetensors") == expected
    spec = _spec_file(tmp_path, model, tiny_dataset, checkpoint_every=1)
    out = tmp_path / "run"
    result = runner.invoke(
        app, ["train", str(spec), "--out", str(out), "--max-steps", "1", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    weights = [
        out / "adapter" / "adapter_model.safetensors",
        out / "checkpoints" / "step-000001" / "adapter" / "adapter_model.safetensors",
        out / "checkpoints" / "step-000001" / "optimizer.pt",
    ]
    for path in weights:
        assert _mode(path) == expected, path


LOAD = """
import sys
from opsd_engine.config import parse_spec
from opsd_engine.modeling import load_policy
runtime = {"device": "cpu", "gradient_checkpointing": True}
spec = parse_spec({"base_model": sys.argv[1], "dataset_uri": "unused.jsonl",
                   "lora": {"r": 2, "alpha": 4}, "runtime": runtime})
policy = load_policy(spec)
policy.peft_model.save_pretrained(sys.argv[2])
from peft import PeftModel
from transformers import AutoModelForCausalLM
PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sys.argv[1]), sys.argv[2])
print("loaded")
"""


def test_loading_a_model_with_lora_prints_no_future_warning(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(
        [
            sys.executable,
            "-W",
            "error::FutureWarning",
            "-c",
            LOAD,
            str(tiny_model_dir),
            str(tmp_path / "a"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "FutureWarning" not in result.stderr and result.stdout.strip() == "loaded"
