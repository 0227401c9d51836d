"""The GPU check (`benchmarks/gpu/check.sh`, issue 15) runs: its dry run at tiny shapes on the CPU
writes all four sections, so the script is known to work before device time is spent on it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_writes_every_section(tmp_path) -> None:
    out = tmp_path / "results.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", "benchmarks/gpu/check.sh", "--dry-run", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    for heading in (
        "# GPU check (dry-run)",
        "## 1. Chunked loss vs naive",
        "## 2. One OPSD step",
        "## 3. In-process rollouts",
        "## 4. CUDA-only tests",
    ):
        assert heading in text, heading
    # both loss paths measured at both sizes
    assert len(re.findall(r"^\| (naive|chunked) \| (64|128) \| [\d.]+ \|", text, re.M)) == 4
    # every phase of the step has a time, and the sampling phase a rate
    for phase in ("sampling", "teacher", "student fwd\\+bwd", "optimizer"):
        assert re.search(rf"^\| {phase} \| \d+\.\d{{3}} \|", text, re.M), phase
    assert re.search(r"8 rollouts of mean length \d+", text)
    assert re.search(r"one call of 8 prompts x 16 new tokens: [\d,]+ tokens", text)
    assert re.search(r"exited 0:", text), "the CUDA-only tests ran (skipped here) without errors"
