#!/usr/bin/env bash
# The GPU check of issue 15 in one call; benchmarks/gpu/check.py says what it measures.
#
#   bash benchmarks/gpu/check.sh [--dry-run] [--out FILE]   # default FILE: $OUT/gpu-check.md
#                                                           # or benchmarks/gpu/results.md
#   bash benchmarks/gpu/check.sh --fetch-wheels             # here, where PyPI is reachable
#
# With a CUDA device it runs at full size (Qwen3-4B shape; under 8 minutes on one H200); without
# one, or with --dry-run, the same code runs at tiny shapes on the CPU. It needs torch,
# transformers, peft and accelerate, plus pydantic (the engine's job spec): a lent GPU machine has
# no pydantic and no network, so `--fetch-wheels` first downloads pydantic's wheels for CPython
# 3.12 / x86-64 Linux into .whl/ (git-ignored); carried there, they are installed into a scratch
# directory (/tmp/opsd-site), never into the machine's environment. Nothing is downloaded there.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python3}"
MODE=auto
OUT="${OUT:+$OUT/gpu-check.md}"
OUT="${OUT:-benchmarks/gpu/results.md}"
WHEELS=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5)
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) MODE=dry-run ;;
        --out) OUT="$2"; shift ;;
        --fetch-wheels)
            "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
                --implementation cp --platform manylinux_2_28_x86_64 \
                --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
                -d .whl "${WHEELS[@]}"
            exit 0 ;;
        *) echo "usage: $0 [--dry-run] [--out FILE] | --fetch-wheels" >&2; exit 2 ;;
    esac
    shift
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
if ! "$PY" -c "import pydantic" 2>/dev/null; then
    if ! ls .whl/pydantic-*.whl >/dev/null 2>&1; then
        echo "pydantic is missing: run '$0 --fetch-wheels' where PyPI is reachable, carry .whl/" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/opsd-site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/opsd-site"
fi
if [ "$MODE" = auto ]; then
    MODE=$("$PY" -c "import torch; print('gpu' if torch.cuda.is_available() else 'dry-run')")
fi
exec "$PY" benchmarks/gpu/check.py --mode "$MODE" --out "$OUT"
