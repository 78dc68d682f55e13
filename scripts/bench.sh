#!/usr/bin/env bash
# Every speed figure side by side in one run; prints the table and writes bench-out/results.json.
# `bash scripts/bench.sh --quick` for a smoke run, `--only 1,5` for some figures.
# PYTHON=/path/to/venv/bin/python uses that environment as it is (no setup); by default .venv is set up.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    bash scripts/setup.sh
    PYTHON=.venv/bin/python
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m benchmarks.run_all "$@"
