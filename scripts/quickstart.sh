#!/usr/bin/env bash
# Set up, build the offline tiny model and dataset, and run a local OPSD training job end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${OPSD_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p runs/tiny
opsd dev tiny-model runs/tiny/model
opsd dev tiny-dataset runs/tiny/train.jsonl --n 64
rm -rf runs/tiny/run
opsd train examples/tiny-opsd.yaml --out runs/tiny/run
opsd report runs/tiny/run --plot runs/tiny/run/metrics.png
