#!/usr/bin/env bash
# One device check: the CUDA tests and the GPU benchmarks, ending with one table (benchmarks/device_check.py).
# On one GPU: about 8 minutes. Without a GPU it says so and runs a CPU fallback at smoke sizes (under a minute).
#   benchmarks/device_check.sh [--cpu] [--budget-s 450] [--json results.jsonl]
set -euo pipefail
cd "$(dirname "$0")/.."
# The repository's virtual environment when there is one (make creates it), else the python on PATH.
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
exec "$PY" benchmarks/device_check.py "$@"
