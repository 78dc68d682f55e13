#!/usr/bin/env bash
# Every speed figure side by side in one run; prints the table and writes bench-out/results.json.
# `bash scripts/bench.sh --quick` for a smoke run, `--only 1,5` for some figures.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m benchmarks.run_all "$@"
