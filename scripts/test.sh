#!/usr/bin/env bash
# Set up the virtualenv and run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${OPSD_VENV:-.venv}/bin/activate"
python -m pytest "$@"
