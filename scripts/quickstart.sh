#!/usr/bin/env bash
# Set up, start the embedded service (no servers to install) and train one OPSD job end to end
# through the HTTP API on the toy reasoning task (its base model is pretrained here once and
# cached), with held-out evaluations before and after; then stop the service.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${OPSD_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# One torch thread in the service's worker too: a float32 reduction's rounding depends on how many
# threads split it, so this keeps the printed accuracies the same on any machine (and the toy is
# too small to gain from more threads).
export OMP_NUM_THREADS=1
python examples/quickstart_service.py "$@"
