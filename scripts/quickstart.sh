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
python examples/quickstart_service.py "$@"
