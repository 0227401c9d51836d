#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv and install the project with its dev extra.
# torch is installed first and pinned, so pip takes the CPU build lying on this machine's disk
# instead of pulling a multi-GB CUDA build; on a GPU host set OPSD_TORCH_SPEC (e.g. "torch")
# or pre-install the torch build you want in the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${OPSD_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "${OPSD_TORCH_SPEC:-torch==2.13.0}" 2>&1 | grep -v "is ignored" || true
fi
python -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" || true
python -c "import torch, opsd_engine; print(f'setup ok: torch {torch.__version__}')"
